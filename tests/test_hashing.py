"""DJSRH and SGRN end to end: feature shards -> 2-process training -> hashing evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xmdist.cli import extract_features
from test_smoke import final_model
from test_tools import launch
from test_smoke import train as _train

HASH = ["data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=50", "model.bits=16",
        "model.text_hidden=64", "train.log_every=2", "train.ckpt_every=3", "train.eval_every=4",
        "eval.batch_size=32", "data.labels=[circle, square, triangle, star, cross, diamond, hexagon, heart, "
        "ring, crescent]"]


def train(*args, **kwargs):
    return _train(*args, common=(), **kwargs)


@pytest.fixture(scope="module")
def feature_shards(tiny_shards, tmp_path_factory) -> Path:
    """The tiny shards' images through a random ResNet-18 (mechanics only: no retrieval signal)."""
    out = tmp_path_factory.mktemp("features") / "tiny-resnet18"
    assert extract_features.main(["--shards", str(tiny_shards), "--out", str(out), "--backbone", "resnet18",
                                  "--layer", "pool", "--weights", "random", "--image-size", "32",
                                  "--resize", "32", "--num-workers", "0", "--batch-size", "64",
                                  "--samples-per-shard", "40"]) == 0
    return out


@pytest.mark.parametrize("method", ["djsrh", "sgrn"])
def test_train_evaluate_and_resume(feature_shards, tmp_path, method):
    config = f"configs/{method}_synthetic.yaml"
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(feature_shards, straight, *HASH, "train.max_steps=8", config=config)
    train(feature_shards, split, *HASH, "train.max_steps=5", config=config)
    proc = train(feature_shards, split, *HASH, "train.max_steps=8", config=config)
    assert "resumed from step_00000005: step 5" in proc.stdout
    a, b = final_model(straight), final_model(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    result = json.loads((straight / "eval.json").read_text())
    assert result["method"] == method and result["score_key"] == "map" and result["bits"] == 16
    assert result["num_queries"] == 40 and result["num_database"] == 280
    for name in ("i2t", "t2i"):
        assert 0 < result[f"map_{name}"] <= 1 and 0 < result[f"map50_window_{name}"] <= 1
        curves = result[f"curves_{name}"]
        assert len(curves["pr_precision"]) == 17 and curves["k"][0] == 1
    assert 0 < result["chance"] < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight / "tb"))
    acc.Reload()
    assert "val/bit_balance_image" in acc.Tags()["histograms"]
    assert {"val/map", "test/map_i2t", "train/loss", "test/pr_t2i/precision_by_radius"} <= set(acc.Tags()["scalars"])
    # TensorBoard PR curves (PR Curves tab) per direction and code length, and examples, at validation too
    assert {"val/pr_i2t_16bit", "test/pr_t2i_16bit"} <= set(acc.Tags()["tensors"])
    assert {"val/examples/i2t/text_summary", "test/examples/t2i/text_summary"} <= set(acc.Tags()["tensors"])
    # launch/eval.py on the same checkpoint: the same scores, curves and code statistics in TensorBoard
    out = tmp_path / "eval.json"
    launch("eval.py", "--checkpoint", straight, "--split", "test", "--out", out, "--tb", tmp_path / "tb_eval")
    got = json.loads(out.read_text())
    assert got["mode"] == "hamming" and got["database_split"] == "train"
    for k in ("map_i2t", "map_t2i", "map50_window_i2t", "map50_first_t2i", "chance"):
        assert got[k] == pytest.approx(result[k], abs=1e-12), k
    acc = EventAccumulator(str(tmp_path / "tb_eval"))
    acc.Reload()
    assert {"test/pr_curve", "test/precision_at_k"} <= set(acc.Tags()["images"])
    assert {"codes/bit_balance_image", "codes/bit_balance_text"} <= set(acc.Tags()["histograms"])
    assert "examples/i2t/text_summary" in acc.Tags()["tensors"]
    assert {"test/pr_i2t_16bit", "test/pr_t2i_16bit"} <= set(acc.Tags()["tensors"])


def test_hashing_on_shards_without_features_says_so(tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", *HASH, "train.max_steps=2", config="configs/sgrn_synthetic.yaml",
                 check=False)
    assert proc.returncode != 0
    assert "holds no precomputed image features" in proc.stderr


def test_unknown_label_name_is_named(feature_shards, tmp_path):
    proc = train(feature_shards, tmp_path / "run", *HASH, "data.labels=[circle, dodecahedron]",
                 config="configs/djsrh_synthetic.yaml", check=False, nproc=1)
    assert proc.returncode == 2
    assert "data.labels: unknown label(s) ['dodecahedron']" in proc.stderr


def test_end_to_end_fine_tuning_from_pixels(tiny_shards, tmp_path):
    """model.image_input=pixels: the image shards' JPEGs through a trainable AlexNet; its weights
    move with training while the graph's features come from a frozen copy."""
    out = tmp_path / "run"
    train(tiny_shards, out, *HASH, "model.image_input=pixels", "model.weights=random", "model.image_size=64",
          "train.max_steps=3", "train.ckpt_every=1", "train.keep_last=5", "train.eval_every=1000",
          "data.features=", config="configs/djsrh_synthetic.yaml", nproc=1)
    ckpt = lambda s: torch.load(out / "checkpoints" / f"step_{s:08d}" / "shared.pt",  # noqa: E731
                                weights_only=True)["nets"]["model"]["model"]
    first, last = ckpt(1), ckpt(3)
    trunk = [k for k in last if k.startswith("trunk.")]
    assert trunk and any(not torch.equal(first[k], last[k]) for k in trunk)
    result = json.loads((out / "eval.json").read_text())
    assert result["num_queries"] == 40 and 0 < result["map_i2t"] <= 1
