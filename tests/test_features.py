"""Feature extractors (layer cuts, shapes) and launch/extract_features.py on 1 and 2 processes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import ROOT
from xmdist.data.decode import decode_meta
from xmdist.data.info import ShardSet
from xmdist.data.loader import iter_raw_samples
from xmdist.dist import DistEnv
from xmdist.models.backbones import FeatureError, build_extractor, describe_weights, feature_shape

from xmdist.cli import extract_features

CHEAP = ["--backbone", "resnet18", "--layer", "pool", "--weights", "random", "--image-size", "32",
         "--resize", "32", "--batch-size", "8", "--num-workers", "0", "--dtype", "float32"]


def extract(shards: Path, out: Path, *args: str, nproc: int = 1, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--standalone"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, str(ROOT / "launch/extract_features.py"), "--shards", str(shards), "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"extract_features.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def read_set(root: Path, split: str, layer: str) -> dict[int, dict]:
    """{id: {"feat", "meta", "labels", "tags"}} of a feature set; fails on a repeated id."""
    out = {}
    for sample in iter_raw_samples(list(ShardSet.open(root).split(split).paths)):
        meta = decode_meta(sample)
        assert sample["__key__"] == f"{meta['id']:09d}" and meta["id"] not in out
        load = lambda m: np.load(io.BytesIO(sample[m]), allow_pickle=False)  # noqa: E731
        out[meta["id"]] = {"feat": load(f"{layer}.npy"), "meta": meta, "labels": load("labels.npy"),
                           "tags": load("tags.npy")}
    return out


def test_extractor_shapes_at_224():
    images = torch.randn(2, 3, 224, 224)
    for backbone, layers in [("alexnet", ["fc7"]), ("vgg19", ["fc7", "pool5"]), ("resnet50", ["pool"])]:
        feats = build_extractor(backbone, layers, "random")(images)
        assert set(feats) == set(layers)
        for layer in layers:
            assert feats[layer].shape == (2, *feature_shape(backbone, layer)), (backbone, layer)
    assert feature_shape("vgg19", "pool5") == (49, 512) and feature_shape("alexnet", "fc7") == (4096,)
    assert feature_shape("resnet50", "pool") == (2048,) and feature_shape("resnet18", "pool") == (512,)


def test_layer_cuts_match_torchvision_modules():
    """fc7 is the output of the classifier's second ReLU; pool is the input of resnet's fc."""
    x = torch.randn(2, 3, 64, 64)  # adaptive pooling makes both nets size-agnostic (alexnet >= 63 px)
    for name, relu_index, builder in [("alexnet", 5, torchvision.models.alexnet),
                                      ("resnet18", None, torchvision.models.resnet18)]:
        layer = "fc7" if relu_index else "pool"
        got = build_extractor(name, [layer], "random", seed=3).eval()(x)[layer]
        torch.manual_seed(3)
        ref = builder().eval()
        seen = {}
        if relu_index:
            relus = [i for i, m in enumerate(ref.classifier) if isinstance(m, nn.ReLU)]
            assert relus[1] == relu_index
            ref.classifier[relu_index].register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
        else:
            ref.fc.register_forward_hook(lambda m, i, o: seen.update(out=i[0].clone()))
        with torch.no_grad():
            ref(x)
        torch.testing.assert_close(got, seen["out"], rtol=0, atol=0)
    vgg = build_extractor("vgg19", ["pool5"], "random")(torch.randn(1, 3, 64, 64))["pool5"]
    assert vgg.shape == (1, 4, 512) == (1, *feature_shape("vgg19", "pool5", 64))


def test_unknown_names_and_small_inputs_are_reported():
    with pytest.raises(FeatureError, match="known backbones and layers: alexnet: fc7; vgg16"):
        build_extractor("vit_b_16", ["fc7"])
    with pytest.raises(FeatureError, match="resnet50 has no layer 'fc7' \\(has: pool\\)"):
        feature_shape("resnet50", "fc7")
    with pytest.raises(FeatureError, match="at least 63 px"):
        feature_shape("alexnet", "fc7", 32)


def test_one_and_two_processes_write_the_same_feature_set(tiny_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = extract(tiny_shards, one, *CHEAP, "--splits", "val")
    assert "RANDOM WEIGHTS" in proc.stdout
    extract(tiny_shards, two, *CHEAP, "--splits", "val", nproc=2)
    source = ShardSet.open(tiny_shards)
    src = {decode_meta(s)["id"]: s for s in iter_raw_samples(list(source.split("val").paths))}
    sets = [read_set(root, "val", "pool") for root in (one, two)]
    for root, feats in zip((one, two), sets):
        info = json.loads((root / "_info.json").read_text())
        assert info["splits"]["val"]["num_samples"] == source.split("val").num_samples == len(feats)
        assert sum(s["num_samples"] for s in info["splits"]["val"]["shards"]) == len(feats)
        assert info["splits"]["train"] == {"num_samples": 0, "shards": []}  # not asked for
        assert set(feats) == set(src)
        assert (info["source"], info["backbone"], info["layer"], info["dtype"]) == ("features", "resnet18",
                                                                                    "pool", "float32")
        assert info["feature_shape"] == [512] and info["captions_per_image"] == source.captions_per_image
        assert info["weights"] == "random" and info["random_weights"] is True and "RANDOM" in info["WARNING"]
        for i, sample in feats.items():
            assert sample["feat"].dtype == np.float32 and sample["feat"].shape == (512,)
            assert sample["labels"].tobytes() == np.load(io.BytesIO(src[i]["labels.npy"])).tobytes()
            assert sample["meta"]["captions"] == decode_meta(src[i])["captions"]
    assert len(json.loads((two / "_info.json").read_text())["splits"]["val"]["shards"]) == 2  # one per rank
    for i in src:
        np.testing.assert_allclose(sets[0][i]["feat"], sets[1][i]["feat"], rtol=0, atol=1e-5)


def test_default_weights_offline_fail_with_the_file_to_fetch(tiny_shards, tmp_path):
    # An empty torch hub directory and a dead proxy: the real offline path, whatever the machine
    # has cached and even where it has a network (nothing is downloaded).
    dead = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(tmp_path / "hub"), "https_proxy": dead, "HTTPS_PROXY": dead}
    proc = extract(tiny_shards, tmp_path / "out", "--backbone", "resnet18", "--layer", "pool", "--splits", "val",
                   "--weights", "DEFAULT", check=False, env=env)
    url = torchvision.models.get_model_weights("resnet18")["DEFAULT"].url
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: could not load resnet18 weights DEFAULT")
    assert Path(url).name in proc.stderr and "--weights=/path/to/file.pth" in proc.stderr
    assert not (tmp_path / "out" / "_info.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--backbone", "resnet50", "--layer", "fc7"], "error: resnet50 has no layer 'fc7' (has: pool); known"),
    (["--backbone", "vit", "--layer", "pool"], "error: unknown backbone 'vit'; known backbones and layers: alexnet"),
    (["--splits", "dev"], "error: split 'dev' not in"),
    (["--precision", "fp16", "--device", "cpu"], "error: --precision fp16 needs CUDA"),
])
def test_bad_arguments_exit_2(tiny_shards, tmp_path, capsys, args, message):
    base = ["--shards", str(tiny_shards), "--out", str(tmp_path / "out"), *CHEAP]
    assert extract_features.main(base + args) == 2
    assert capsys.readouterr().err.startswith(message)


def test_missing_source_and_same_directory_exit_2(tiny_shards, tmp_path, capsys):
    assert extract_features.main(["--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *CHEAP]) == 2
    assert "shard directory" in capsys.readouterr().err
    assert extract_features.main(["--shards", str(tiny_shards), "--out", str(tiny_shards), *CHEAP]) == 2
    assert "--out must differ from --shards" in capsys.readouterr().err


def test_weights_from_a_file_are_loaded_and_recorded(tmp_path):
    path = tmp_path / "resnet18.pth"
    with torch.random.fork_rng():
        torch.manual_seed(5)
        torch.save(torchvision.models.resnet18().state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    got = build_extractor("resnet18", ["pool"], str(path))(x)["pool"]
    torch.testing.assert_close(got, build_extractor("resnet18", ["pool"], "random", seed=5)(x)["pool"])
    info = describe_weights("resnet18", str(path))
    assert info["weights"] == str(path) and len(info["weights_sha256"]) == 64 and not info["random_weights"]
    assert describe_weights("resnet18", "DEFAULT")["weights"].startswith("ResNet18_Weights.IMAGENET1K_")
    with pytest.raises(FeatureError, match="is not a torchvision resnet50 state dict: .* missing"):
        build_extractor("resnet50", ["pool"], str(path))


def test_all_source_splits_by_default(tiny_shards, tmp_path):
    args = extract_features.parse_args(["--shards", str(tiny_shards), "--out", str(tmp_path / "o"), *CHEAP])
    _, splits = extract_features.check_args(args, DistEnv())
    assert list(splits) == ["train", "val", "test"] and splits["train"].num_samples == 280


def test_run_backbone_embed_and_regions(tiny_shards, tmp_path):
    """A trained run as the encoder: ``embed`` is its image embedding of the evaluation view,
    ``regions`` its last spatial feature map as (h * w, channels) rows."""
    from test_smoke import train
    from xmdist.tools.query import encode_images
    from xmdist.tools.runs import load_run

    run = tmp_path / "run"
    train(tiny_shards, run, "train.max_steps=2", "model.backbone=small_cnn", "model.weights=null", nproc=1)
    common = ["--backbone", "run", "--weights", str(run), "--image-size", "32", "--resize", "32",
              "--num-workers", "0", "--dtype", "float32", "--splits", "test"]
    extract(tiny_shards, tmp_path / "embed", *common, "--layer", "embed")
    extract(tiny_shards, tmp_path / "regions", *common, "--layer", "regions")
    info = json.loads((tmp_path / "regions" / "_info.json").read_text())
    assert info["feature_shape"] == [16, 256]  # small CNN: 32 px -> 4 x 4 map of 256 channels
    regions, embed = read_set(tmp_path / "regions", "test", "regions"), read_set(tmp_path / "embed", "test", "embed")
    assert len(regions) == len(embed) == 40 and regions[min(regions)]["feat"].shape == (16, 256)
    loaded = load_run(run)
    sample = next(iter_raw_samples(list(ShardSet.open(tiny_shards).split("test").paths)))
    sid = decode_meta(sample)["id"]
    want = encode_images(loaded, [loaded.decoder.eval_view(sample)])[0].numpy()
    np.testing.assert_allclose(embed[sid]["feat"], want, rtol=1e-4, atol=1e-5)
