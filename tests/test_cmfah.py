"""CMFAH end to end: region feature shards -> 2-process training (DDP, DeepSpeed) -> hashing
evaluation (Hamming and asymmetric) -> exact resume of every network and optimiser; bad samples
skipped and counted; a changed semantic expansion refused; text queries through the search tools."""
from __future__ import annotations

import io
import json
import re
import tarfile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_smoke import train as _train
from test_tools import launch
from xmdist.data.writer import ShardSetWriter, encode_json, encode_npy

VOCAB = [f"w{i}" for i in range(20)]
LABELS = ["a", "b", "c", "d", "e", "f"]
REGIONS = (6, 16)
CM = ["data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=50", "data.labels=[]", "model.bits=16",
      "model.dim=16", "model.feature_dim=16", "model.text_channels=8", "model.disc_hidden=[8, 8]",
      "model.word_dim=8", "model.max_words=6", "model.skipgram_epochs=2", "optim.lr=0.005", "train.log_every=2",
      "train.ckpt_every=3", "train.eval_every=4", "eval.batch_size=32"]
CONFIG = "configs/cmfah_synthetic.yaml"


def train(shards, out, *args, **kwargs):
    return _train(shards, out, *CM, *args, common=(), config=CONFIG, **kwargs)


def item(i: int, rng: np.random.Generator, split: str, **bad: bytes) -> dict[str, bytes]:
    """Labels drive both modalities: regions are label prototypes plus noise, tags hold label words."""
    labels = (rng.random(len(LABELS)) < 0.1).astype(np.uint8)
    labels[i % len(LABELS)] = 1
    protos = np.random.default_rng(99).standard_normal((len(LABELS), *REGIONS))
    regions = (labels[:, None, None] * protos).sum(0) + 0.5 * rng.standard_normal(REGIONS)
    tags = np.zeros(len(VOCAB), np.uint8)
    tags[np.flatnonzero(labels) * 3] = 1
    tags[rng.integers(0, len(VOCAB), 2)] = 1
    sample = {"json": encode_json({"id": i, "captions": [" ".join(VOCAB[w] for w in np.flatnonzero(tags))]}),
              "tags.npy": encode_npy(tags), "labels.npy": encode_npy(labels),
              "pool5.npy": encode_npy(regions.astype(np.float16))}
    return {**sample, **bad}


def write_regions(root: Path, damaged: bool = False) -> Path:
    """200 train, 40 val, 40 test; ``damaged``: 3 training samples with regions of another shape,
    no words, no labels."""
    rng = np.random.default_rng(0)
    writer = ShardSetWriter(root, ["json", "labels.npy", "tags.npy", "pool5.npy"], samples_per_shard=40,
                            splits=("train", "val", "test"))
    bad = {7: {"pool5.npy": encode_npy(np.zeros((5, 16), np.float16))},
           11: {"tags.npy": encode_npy(np.zeros(len(VOCAB), np.uint8))}} if damaged else {}
    for i in range(280):
        split = "test" if i < 40 else "val" if i < 80 else "train"
        writer.write(split, f"{i:09d}", item(i, rng, split, **bad.get(i - 80, {})))
    info = writer.finish({"source": "features", "captions_per_image": 1, "label_names": LABELS, "tag_vocab": VOCAB,
                          "layer": "pool5", "feature_shape": list(REGIONS)})
    if damaged:
        drop_member(root / info["splits"]["train"]["shards"][0]["name"], f"{80 + 13:09d}.labels.npy")
    return root


@pytest.fixture(scope="module")
def region_shards(tmp_path_factory) -> Path:
    return write_regions(tmp_path_factory.mktemp("cmfah") / "regions")


def drop_member(shard: Path, name: str) -> None:
    """Rewrite a tar shard without member ``name`` (a sample whose labels are missing)."""
    with tarfile.open(shard) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name != name]
    with tarfile.open(shard, "w") as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))


def nets_state(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every network's weights and optimizer state in the latest checkpoint."""
    ck = run / "checkpoints"
    shared = torch.load(ck / (ck / "latest").read_text().strip() / "shared.pt", weights_only=True)
    flat = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for k, v in enumerate(node):
                walk(f"{prefix}/{k}", v)

    walk("nets", shared["nets"])
    return flat


@pytest.mark.parametrize("backend", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow)])  # deepspeed: the slow step
def test_train_evaluate_and_resume(region_shards, tmp_path, backend):
    extra = [f"train.backend={backend}"] + (["train.zero_stage=1"] if backend == "deepspeed" else [])
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(region_shards, straight, "train.max_steps=8", *extra)
    train(region_shards, split, "train.max_steps=5", *extra)
    built = (split / "expansion.json").stat().st_mtime_ns
    proc = train(region_shards, split, "train.max_steps=8", *extra)
    assert "resumed from step_00000005: step 5" in proc.stdout
    assert "semantic expansion of" not in proc.stdout + proc.stderr  # reused, never rebuilt on resume
    assert (split / "expansion.json").stat().st_mtime_ns == built
    a, b = nets_state(straight), nets_state(split)
    assert {k.split("/")[1] for k in a} == {"model", "d_v", "d_t"} and len(a) == len(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    result = json.loads((straight / "eval.json").read_text())
    assert result["method"] == "cmfah" and result["score_key"] == "map" and result["bits"] == 16
    assert result["num_queries"] == 40 and result["num_database"] == 200
    for name in ("i2t", "t2i"):
        for prefix in ("", "asym_"):
            assert 0 < result[f"{prefix}map_{name}"] <= 1
            assert len(result[f"{prefix}curves_{name}"]["precision_at_k"]) >= 3
    out = tmp_path / "eval.json"
    launch("eval.py", "--checkpoint", straight, "--split", "test", "--out", out, "--tb", "none")
    got = json.loads(out.read_text())
    assert got["mode"] == "hamming_asymmetric"
    for k in ("map_i2t", "map_t2i", "asym_map_i2t", "asym_map_t2i", "chance"):
        assert got[k] == pytest.approx(result[k], abs=1e-12), k


def test_damaged_samples_are_skipped_and_counted(tmp_path):
    shards = write_regions(tmp_path / "damaged", damaged=True)
    proc = train(shards, tmp_path / "run", "train.max_steps=12", "train.log_every=1", "train.eval_every=0",
                 "eval.validation=false", nproc=1)  # one epoch: every training sample is read
    log = proc.stdout + proc.stderr
    for what in ("pool5.npy", "no words", "labels.npy"):  # each named, with its sample
        assert re.search(rf"skipping sample .*{re.escape(what)}", log), what
    skipped = sum(float(m) for m in re.findall(r"skipped_samples (\d+)", log))
    assert skipped == 3
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_database"] == 197


def test_labels_carry_through(region_shards, tmp_path):
    """Trained for 10 epochs (120 steps) on label-driven data, CMFAH ranks far above chance both ways."""
    run = tmp_path / "run"
    train(region_shards, run, "train.epochs=10", "train.eval_every=0", "eval.validation=false", nproc=1)
    r = json.loads((run / "eval.json").read_text())
    assert min(r["map_i2t"], r["map_t2i"], r["asym_map_i2t"], r["asym_map_t2i"]) > r["chance"] + 0.25, r


def test_a_changed_expansion_is_refused_on_resume(region_shards, tmp_path):
    run = tmp_path / "run"
    train(region_shards, run, "train.max_steps=3", nproc=1)
    meta = json.loads((run / "expansion.json").read_text())
    (run / "expansion.json").write_text(json.dumps({**meta, "walk_length": 3}))
    proc = train(region_shards, run, "train.max_steps=6", nproc=1, check=False)
    assert proc.returncode == 2
    assert "semantic expansion in" in proc.stderr and "built with walk_length=3, the config says 5" in proc.stderr


def test_text_queries_through_encode_and_search(region_shards, tmp_path):
    run, index = tmp_path / "run", tmp_path / "index"
    train(region_shards, run, "train.max_steps=4", nproc=1)
    launch("encode.py", "--run-dir", run, "--shards", region_shards, "--split", "test", "--out", index, "--codes")
    proc = subprocess.run([sys.executable, str(ROOT / "launch/search.py"), "--run", str(run), "--index", str(index),
                           "--text", "w0 w3 unknownword", "-k", "3"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "unknownword" in proc.stderr and len(re.findall(r"^\s+\d\. id \d+", proc.stdout, re.M)) == 3
    proc = subprocess.run([sys.executable, str(ROOT / "launch/search.py"), "--run", str(run), "--index", str(index),
                           "--image", str(ROOT / "README.md")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "encodes no image queries" in proc.stderr
