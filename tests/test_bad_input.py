"""Bad input through the real entry point (launch/train.py): each case ends with a clear message
and a non-zero exit status before any work, or training goes on past the bad sample and counts
it (``skipped_samples``). Each test also checks what must survive: an existing run directory,
its checkpoints, or the training run itself. Cases covered elsewhere (test_smoke.py: unknown
key, wrong type, resume with another model, truncated checkpoint; test_loader.py: the same data
damage at the loader level) are not repeated; RELIABILITY.md lists them all.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_image_limits import bomb_png
from test_smoke import train, train_command
from xmdist.train.lock import LOCK_NAME

QUIET = ["train.ckpt_every=2", "train.eval_every=1000"]


class Trigger:
    """Unpickling this creates ``path``: proof that something was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Custom:
    """An arbitrary class instance, as a careless ``torch.save`` of a trainer object would hold."""

    def __init__(self):
        self.value = 1


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def base_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished 1-process run of 4 steps with checkpoints step_00000002 and step_00000004."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(tiny_shards, out, "train.max_steps=4", *QUIET, nproc=1)
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def snapshot(run: Path) -> dict[str, str]:
    """Every file's hash, but the run lock's (it names whichever job last held the directory)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def assert_kept(before: dict[str, str], run: Path, but: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` is still there, byte for byte (``but``: these may be rewritten)."""
    after = snapshot(run)
    changed = [k for k, v in before.items() if k not in but and after.get(k) != v]
    assert not changed, f"changed or deleted: {changed}"


def read_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples in order: {key: {extension: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def write_samples(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def damaged_copy(src: Path, dst: Path, edits: dict[int, callable], splits: tuple[str, ...] = ("train",)) -> Path:
    """Copy a shard set; in every shard of ``splits``, sample number i goes through ``edits[i]``
    (members dict -> members dict). Every shard is damaged alike, so whichever shard a run
    reads first holds the damage."""
    shutil.copytree(src, dst)
    for split in splits:
        for path in sorted(dst.glob(f"{split}-*.tar")):
            samples = read_samples(path)
            for i, key in enumerate(list(samples)):
                if i in edits:
                    samples[key] = edits[i](dict(samples[key]))
            write_samples(path, samples)
    return dst


def object_npy(marker: Path) -> bytes:
    """np.save of an object array (allow_pickle=True): loading it would run Trigger."""
    buf = io.BytesIO()
    np.save(buf, np.array([Trigger(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def tb_values(out: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def train_on_damage(shards: Path, out: Path, *sets: str, **kwargs) -> subprocess.CompletedProcess:
    """4 steps, 1 process, no shuffle buffer: the first batch holds sample 1 of the first shard read."""
    proc = train(shards, out, "train.max_steps=4", "data.shuffle_buffer=1", *QUIET, *sets, nproc=1, **kwargs)
    assert json.loads((out / "eval.json").read_text())["step"] == 4  # trained to the end, then tested
    return proc


# ------------------------------------------------------------------ paths and shard sets


def test_missing_shard_directory_keeps_an_existing_run(base_run, tmp_path):
    # A fresh run: test_smoke.py::test_missing_shards_exit_with_message; a shard file listed in
    # _info.json but missing: test_loader.py::test_missing_shards_give_clear_errors.
    run = copy_run(base_run, tmp_path)
    before = snapshot(run)
    proc = train(tmp_path / "nowhere", run, "train.max_steps=6", *QUIET, nproc=1, check=False)
    message = (f"error: shard directory {tmp_path / 'nowhere'} does not exist (data.shards); create one with "
               f"`python launch/make_shards.py synthetic --out {tmp_path / 'nowhere'}`")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_kept(before, run)


@pytest.mark.parametrize("case", ["split without shards", "empty tar files"])
def test_shard_set_without_samples(tiny_shards, tmp_path, case):
    shards = tmp_path / "empty"
    shutil.copytree(tiny_shards, shards)
    if case == "split without shards":  # a valid _info.json whose train split lists nothing
        info = json.loads((shards / "_info.json").read_text())
        info["splits"]["train"] = {"num_samples": 0, "shards": []}
        (shards / "_info.json").write_text(json.dumps(info))
        message = f"error: split 'train' in {shards} has no samples"
    else:  # _info.json promises samples, the files hold none
        for tar in shards.glob("train-*.tar"):
            tar.write_bytes(b"")
        message = "error: split 'train' has no readable sample in its 7 shard(s)"
    proc = train(shards, tmp_path / "run", "train.max_steps=2", nproc=1, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # the refused start left no run directory (no vocab.json, no lock)


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=400", "error: split 'train' has 280 training pairs, fewer than one global batch (400"),
    ("data.shards=/nonexistent/shards", "error: shard directory /nonexistent/shards does not exist"),
])
@pytest.mark.slow
def test_start_checks_run_before_any_pass_over_the_data(tiny_shards, tmp_path, override, message):
    proc = train(tiny_shards, tmp_path / "run", "train.max_steps=2", override, nproc=1, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "vocabulary:" not in proc.stdout  # refused before the vocabulary pass
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("override,message", [
    ("data.shards=", "error: data.shards: required: the shard set directory (launch/make_shards.py writes one)"),
    (None, "error: the following arguments are required: --out"),
])
def test_missing_required_value(base_run, tmp_path, override, message):
    # Unknown keys and wrong types: test_smoke.py::test_bad_config_fails_before_work.
    run = copy_run(base_run, tmp_path)
    before = snapshot(run)
    cmd = train_command(Path("unused"), run, *([override] if override else []), nproc=1)
    if override is None:
        i = cmd.index("--out")
        del cmd[i:i + 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XMDIST_FAULT": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert_kept(before, run)  # config errors stop before the run directory is touched, config.yaml included


def test_global_batch_not_divisible_by_world_size(tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", "data.global_batch_size=9", "train.max_steps=2", check=False)
    assert proc.returncode != 0  # the ranks exit 2, torchrun reports 1
    message = ("error: data.global_batch_size: 9 is not divisible by the world size 2; use a multiple of 2 "
               "or another number of processes")
    assert message in proc.stderr and proc.stderr.count("error: ") == 1  # printed once, by rank 0
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("case", ["another method", "another batch size"])
def test_incompatible_resume_is_refused(base_run, tiny_shards, tmp_path, case):
    # Another model shape on 2 ranks: test_smoke.py::test_resume_with_another_model_is_refused_on_every_rank.
    run = copy_run(base_run, tmp_path)
    sets, config = ["train.max_steps=6", *QUIET], "configs/demo_vsepp_synthetic.yaml"
    if case == "another batch size":
        sets.append("data.batch_size=4")
        message = ("error: checkpoint step_00000004 has 35 steps per epoch, this config 70: the batch size or the "
                   "data changed")
    else:
        config = "configs/mfsr_synthetic.yaml"
        sets.append("model.feature_dim=32")  # the tests' embed_dim: mFSR's residual `se` needs them equal
        message = f"error: method: differs from the run being resumed in {run} (vsepp != mfsr); use a new --out"
    before = snapshot(run)
    proc = train(tiny_shards, run, *sets, config=config, nproc=1, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    # The method is checked before config.yaml is rewritten, the steps per epoch after.
    assert_kept(before, run)


def test_resume_with_more_ranks_is_refused(base_run, tiny_shards, tmp_path):
    """A 1-process run continued by 2 processes: refused (rank 1 has no state to load), never
    started over from step 0."""
    run = copy_run(base_run, tmp_path)
    before = snapshot(run)
    proc = train(tiny_shards, run, "train.max_steps=6", *QUIET, check=False)
    assert proc.returncode != 0
    assert (f"error: checkpoint step_00000004 in {run / 'checkpoints'} was written by 1 rank(s), this run has 2: "
            f"resume with as many") in proc.stderr, proc.stderr[-2000:]
    assert "step 2 ep" not in proc.stdout  # no training step ran
    assert_kept(before, run)


@pytest.mark.parametrize("value,message", [
    ("Latest", None), ("AUTO", None), ("best", None), ("step_00000002", None),
    ("/elsewhere/run/checkpoints/step_00000004", "is a path: --resume takes a checkpoint name of --out"),
    ("latset", "expected auto, latest, none, best or step_XXXXXXXX"),
])
def test_resume_values(value, message):
    from xmdist.cli.train import parse_args
    if message is None:
        expected = value if value.startswith("step_") else value.lower()
        assert parse_args(["--out", "x", "--resume", value]).resume == expected
        return
    with pytest.raises(SystemExit) as e:
        parse_args(["--out", "x", "--resume", value])
    assert e.value.code == 2


def _train_resume(shards: Path, out: Path, which: str, *sets: str) -> subprocess.CompletedProcess:
    cmd = [*train_command(shards, out, *sets, nproc=1), "--resume", which]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
def test_resume_latest_and_best_need_a_checkpoint(base_run, tiny_shards, tmp_path):
    for which in ("latest", "best"):
        out = tmp_path / which
        proc = _train_resume(tiny_shards, out, which, "train.max_steps=2", *QUIET)
        assert proc.returncode == 2 and f"--resume {which}: {out / 'checkpoints'} holds no" in proc.stderr, \
            proc.stderr[-2000:]
    # latest on a run with checkpoints resumes from the newest
    run = copy_run(base_run, tmp_path)
    proc = _train_resume(tiny_shards, run, "latest", "train.max_steps=6", *QUIET)
    assert proc.returncode == 0 and "resumed from step_00000004: step 4" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_changed_shard_set_is_refused_on_resume(tiny_shards, tmp_path):
    """Shards regenerated or edited between a stop and its resume (same steps per epoch): refused,
    naming what changed and the override; with the override the run resumes with a warning."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    run = tmp_path / "run"
    train(shards, run, "train.max_steps=2", *QUIET, nproc=1)
    info = json.loads((shards / "_info.json").read_text())
    info["seed"] = 7  # as if regenerated with another seed
    (shards / "_info.json").write_text(json.dumps(info))
    first = shards / info["splits"]["train"]["shards"][0]["name"]
    data = bytearray(first.read_bytes())
    data[1000] ^= 0xFF  # one byte of the first member's payload: same size, other content
    first.write_bytes(bytes(data))
    before = snapshot(run)
    proc = train(shards, run, "train.max_steps=4", *QUIET, nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"error: the training shards of {shards} changed since checkpoint step_00000002 (the set's seed 0 -> 7; "
            f"{first.name}: content)") in proc.stderr, proc.stderr[-2000:]
    assert "--set data.allow_changed_shards=true" in proc.stderr
    assert_kept(before, run)
    proc = train(shards, run, "train.max_steps=4", *QUIET, "data.allow_changed_shards=true", nproc=1)
    assert "resuming on changed training shards" in proc.stdout and "resumed from step_00000002" in proc.stdout


def test_checkpoint_needing_unpickling_is_refused_and_the_previous_used(base_run, tiny_shards, tmp_path):
    run = copy_run(base_run, tmp_path)
    marker = tmp_path / "unpickled"
    path = run / "checkpoints" / "step_00000004" / "shared.pt"
    torch.save({**torch.load(path, weights_only=True), "extra": Trigger(marker)}, path)
    proc = train(tiny_shards, run, "train.max_steps=6", *QUIET, nproc=1)
    assert ("checkpoint step_00000004 refused on rank 0: it needs unpickling io.open, which is neither a tensor "
            "nor an allow-listed class") in proc.stdout, proc.stdout[-2000:]
    assert "resumed from step_00000002: step 2" in proc.stdout
    assert not marker.exists()
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_no_loadable_checkpoint_stops_instead_of_starting_over(base_run, tiny_shards, tmp_path):
    run = copy_run(base_run, tmp_path)
    ckpt = run / "checkpoints"
    torch.save({**torch.load(ckpt / "step_00000004" / "shared.pt", weights_only=True), "extra": Custom()},
               ckpt / "step_00000004" / "shared.pt")
    truncated = ckpt / "step_00000002" / "shared.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    before = snapshot(run)
    proc = train(tiny_shards, run, "train.max_steps=6", *QUIET, nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "checkpoint step_00000004 refused on rank 0: it needs unpickling test_bad_input.Custom" in proc.stdout
    assert "checkpoint step_00000002 unreadable on rank 0" in proc.stdout
    assert f"error: none of the 2 checkpoint(s) in {ckpt} could be loaded on every rank" in proc.stderr
    assert_kept(before, run)


# ------------------------------------------------------------------ damaged samples: training goes on


def _corrupt_jpeg(s):
    s["jpg"] = b"\xff\xd8\xff not a jpeg"
    return s


def _without(member):
    def edit(s):
        del s[member]
        return s
    return edit


@pytest.fixture(scope="module")
def damaged_run(tiny_shards, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """One 4-step run on shards whose samples 1-6 (of every train shard) are damaged: a corrupt
    JPEG, no json, no jpg, an extra pickle member (.pyd), an object-array labels.npy, a
    decompression-bomb PNG. All six are in the first batch (shuffle buffer 1). -> (process, run directory, unpickling marker)."""
    tmp = tmp_path_factory.mktemp("damaged")
    marker = tmp / "unpickled"

    def add_pyd(s):
        s["pyd"] = pickle.dumps(Trigger(marker))
        return s

    def object_labels(s):
        s["labels.npy"] = object_npy(marker)
        return s

    def bomb(s):  # a 20000 x 20000 PNG of a few hundred KB in place of the JPEG
        del s["jpg"]
        s["png"] = bomb_png()
        return s

    shards = damaged_copy(tiny_shards, tmp / "shards", {1: _corrupt_jpeg, 2: _without("json"), 3: _without("jpg"),
                                                        4: add_pyd, 5: object_labels, 6: bomb})
    out = tmp / "run"
    return train_on_damage(shards, out), out, marker


def test_damaged_samples_are_skipped_counted_and_training_goes_on(damaged_run):
    proc, out, _ = damaged_run
    assert "skipped_samples 6 " in proc.stdout, proc.stdout[-3000:]  # the step-2 console line
    assert tb_values(out, "train/skipped_samples") == {2: 6.0, 4: 0.0}


def test_decompression_bomb_is_skipped_before_decoding(damaged_run):
    assert "20000 x 20000 = 400,000,000 pixels is above data.max_pixels = 100,000,000" in damaged_run[0].stdout


def test_corrupt_jpeg_is_skipped(damaged_run):
    # The loader alone: test_loader.py::test_corrupt_sample_is_skipped_not_fatal.
    assert "UnidentifiedImageError: cannot identify image file" in damaged_run[0].stdout


def test_sample_missing_a_member_is_skipped(damaged_run):
    assert "has no json member'" in damaged_run[0].stdout
    assert "has no image member (jpg/jpeg/png/webp)'" in damaged_run[0].stdout


def test_member_needing_unpickling_is_refused_never_unpickled(damaged_run):
    # The loader alone: test_loader.py::test_member_needing_unpickling_is_refused.
    proc, _, marker = damaged_run
    assert "member(s) pyd are not formats xmdist reads (nothing is ever unpickled)" in proc.stdout
    assert "member(s) labels.npy hold pickled Python objects (object arrays) (nothing is ever unpickled)" in proc.stdout
    assert not marker.exists()


def test_truncated_shard_is_read_up_to_the_damage(tiny_shards, tmp_path):
    # The loader alone: test_loader.py::test_truncated_shard_is_skipped.
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    for tar in shards.glob("train-*.tar"):
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size * 3 // 10])  # about 12 of 40 samples each
    out = tmp_path / "run"
    proc = train_on_damage(shards, out)
    assert "skipping unreadable shard data" in proc.stdout and "unexpected end of data" in proc.stdout
    assert sum(tb_values(out, "train/skipped_samples").values()) >= 1


def test_damaged_sample_in_evaluation_splits_is_left_out(tiny_shards, tmp_path):
    shards = damaged_copy(tiny_shards, tmp_path / "shards", {1: _corrupt_jpeg, 2: _without("json")},
                          splits=("val", "test"))
    out = tmp_path / "run"
    proc = train(shards, out, "train.max_steps=2", "train.eval_every=2", nproc=1)
    assert "evaluation of split 'val': skipping sample" in proc.stdout
    assert "evaluation of split 'test': skipping sample" in proc.stdout
    assert "eval val (38 images" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 2 and result["num_images"] == 38


# ------------------------------------------------------------------ hashing: feature shards


HASH = ["data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=1", "data.labels=[]", "model.bits=8",
        "model.text_hidden=16", "train.log_every=1", "train.max_steps=3", "eval.batch_size=32", *QUIET]


@pytest.fixture(scope="module")
def feature_shards(tmp_path_factory) -> Path:
    """A small feature shard set written directly: 80 train samples (4 shards), 20 val, 20 test."""
    from xmdist.data.writer import ShardSetWriter, encode_json, encode_npy

    out = tmp_path_factory.mktemp("features") / "set"
    rng = np.random.default_rng(0)
    writer = ShardSetWriter(out, ["fc7.npy", "json", "labels.npy", "tags.npy"], samples_per_shard=20)
    for i in range(120):
        split = "test" if i < 20 else "val" if i < 40 else "train"
        writer.write(split, f"{i:09d}", {
            "fc7.npy": encode_npy(rng.standard_normal(8).astype(np.float16)),
            "json": encode_json({"id": i, "split": split, "captions": []}),
            "labels.npy": encode_npy((rng.random(4) < 0.5).astype(np.uint8)),
            "tags.npy": encode_npy((rng.random(6) < 0.3).astype(np.uint8))})
    writer.finish({"captions_per_image": 0, "layer": "fc7", "label_names": ["a", "b", "c", "d"]})
    return out


def test_pickled_npy_in_feature_shards_is_refused(feature_shards, tmp_path):
    """DJSRH: object-array features (in the first sample, which also gives the model its input
    sizes), tags and labels; refused and counted, never unpickled."""
    marker = tmp_path / "unpickled"
    edits = {0: "fc7.npy", 1: "tags.npy", 2: "labels.npy"}

    def replace(member):
        def edit(s):
            s[member] = object_npy(marker)
            return s
        return edit

    shards = damaged_copy(feature_shards, tmp_path / "shards", {i: replace(m) for i, m in edits.items()},
                          splits=("train",))
    out = tmp_path / "run"
    proc = train(shards, out, *HASH, config="configs/djsrh_synthetic.yaml", common=(), nproc=1)
    for member in edits.values():
        assert f"member(s) {member} hold pickled Python objects" in proc.stdout, proc.stdout[-3000:]
    # Batches of 16 from 20-sample shards: every step opens a shard and meets its 3 bad samples.
    assert tb_values(out, "train/skipped_samples") == {1: 3.0, 2: 3.0, 3: 3.0}
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 3 and result["num_database"] == 80 - 4 * 3  # 4 train shards
    assert not marker.exists()
