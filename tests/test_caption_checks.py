"""Malformed captions are refused per sample (a counted skip), and config/CLI mistakes found early."""
import subprocess
import sys

import pytest

from conftest import ROOT
from xmdist.config import ConfigError
from xmdist.data.decode import DECODE_ERRORS, checked_captions
from xmdist.methods import build_config


@pytest.mark.parametrize("captions,message", [
    ("a red circle", "json 'captions' must be a non-empty list of strings, got str 'a red circle'"),
    ([], "must be a non-empty list"),
    (None, "got NoneType"),
    (["a red circle", "  "], "caption 1 is empty or not a string ('  ')"),
    (["ok", 3], "caption 1 is empty or not a string (3)"),
])
def test_malformed_captions_are_refused(captions, message):
    with pytest.raises(DECODE_ERRORS) as e:
        checked_captions({"captions": captions}, {"__key__": "k1"})
    assert message in str(e.value) and "sample k1" in str(e.value)
    assert checked_captions({"captions": ["a", "b c"]}, {}) == ["a", "b c"]


def test_unknown_backbone_is_a_config_error():
    for method in ("vsepp", "mfsr"):
        with pytest.raises(ConfigError, match="model.backbone: unknown backbone 'resnet5'; known: small_cnn, resnet18"):
            build_config({"method": method, "model": {"backbone": "resnet5"}})


@pytest.mark.slow
def test_print_config_needs_no_out():
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo_vsepp_synthetic.yaml")]
    shown = subprocess.run([*cmd, "--print-config"], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and "method: vsepp" in shown.stdout, shown.stderr[-2000:]
    missing = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "the following arguments are required: --out" in missing.stderr


@pytest.mark.slow
def test_caption_method_on_a_feature_set_is_refused_before_any_pass(tiny_shards, tmp_path):
    import json
    import shutil

    from test_smoke import train

    shards = tmp_path / "features"
    shutil.copytree(tiny_shards, shards)
    info = json.loads((shards / "_info.json").read_text())
    info["members"] = ["fc7.npy", "json", "labels.npy", "tags.npy"]  # what extract_features.py writes
    (shards / "_info.json").write_text(json.dumps(info))
    proc = train(shards, tmp_path / "run", "train.max_steps=2", nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"error: {shards} holds fc7.npy, json, labels.npy, tags.npy per sample and no image (jpg/jpeg/png/webp): "
            f"method vsepp trains on image shards") in proc.stderr
    assert "vocabulary:" not in proc.stdout and not (tmp_path / "run").exists()
