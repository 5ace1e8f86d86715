"""End to end: torchrun with 2 processes on tiny shards, DDP and DeepSpeed, resume, TensorBoard."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

COMMON = ["data.batch_size=8", "data.num_workers=1", "data.crop_size=32", "data.eval_resize=32",
          "data.caption_mode=random", "data.min_word_count=1", "model.embed_dim=32", "model.word_dim=16",
          "train.log_every=2", "train.ckpt_every=3", "train.eval_every=4", "eval.batch_size=16"]


def train_command(shards: Path, out: Path, *overrides: str, nproc: int = 2, torchrun_args: tuple = (),
                  config: str = "configs/demo_vsepp_synthetic.yaml", common: tuple = tuple(COMMON),
                  extra: tuple = ()) -> list[str]:
    sets = [a for o in (*common, f"data.shards={shards}", *overrides) for a in ("--set", o)]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *torchrun_args,
                "--standalone"] if nproc > 1 else [sys.executable]
    return [*launcher, str(ROOT / "launch/train.py"), "--config", str(ROOT / config), "--out", str(out), *sets, *extra]


def train(shards: Path, out: Path, *overrides: str, nproc: int = 2, check: bool = True,
          config: str = "configs/demo_vsepp_synthetic.yaml", fault: str = "", torchrun_args: tuple = (),
          common: tuple = tuple(COMMON), extra: tuple = ()) -> subprocess.CompletedProcess:
    """Run launch/train.py on ``shards`` with the ``common`` overrides first; ``fault`` sets
    XMDIST_FAULT (xmdist/faults.py); ``extra``: more arguments of train.py."""
    cmd = train_command(shards, out, *overrides, nproc=nproc, torchrun_args=torchrun_args, config=config,
                        common=common, extra=extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "XMDIST_FAULT": fault}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)  # every rank's
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n"
                             f"errors:\n{errors}")
    return proc


def final_model(out: Path) -> dict:
    name = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / name / "shared.pt", weights_only=True)["nets"]["model"]["model"]


def tb_scalars(out: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_deepspeed_without_zero_reports_the_grad_norm(tiny_shards, tmp_path):
    """DeepSpeed keeps no grad norm for a plain optimizer at ZeRO 0 in fp32: the backend computes
    it, so no step is taken for non-finite and the run trains like DDP."""
    logs = {}
    for backend in ("ddp", "deepspeed"):
        proc = train(tiny_shards, tmp_path / backend, "train.max_steps=6", "train.log_every=1",
                     f"train.backend={backend}", "train.zero_stage=0", "train.eval_every=0", "eval.validation=false")
        assert "update skipped" not in proc.stdout + proc.stderr
        logs[backend] = [float(line.split("grad_norm ")[1].split()[0]) for line in proc.stdout.splitlines()
                         if "grad_norm " in line]
    assert len(logs["deepspeed"]) == 6
    assert logs["deepspeed"] == pytest.approx(logs["ddp"], rel=1e-3)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_train_resume_and_outputs(tiny_shards, tmp_path, backend):
    extra = [f"train.backend={backend}"] + (["train.zero_stage=1"] if backend == "deepspeed" else [])
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_shards, straight, "train.max_steps=8", *extra)
    train(tiny_shards, split, "train.max_steps=4", *extra)
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    proc = train(tiny_shards, split, "train.max_steps=8", *extra)
    assert "resumed from step_00000004: step 4" in proc.stdout
    # Resuming mid-epoch continues the same data and optimizer trajectory exactly.
    a, b = final_model(straight), final_model(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")

    result = json.loads((split / "eval.json").read_text())
    assert result["step"] == 8 and result["split"] == "test"
    assert {"i2t_r1", "i2t_r10", "t2i_r10", "rsum", "i2t_medr"} <= set(result)
    assert (split / "config.yaml").is_file() and (split / "vocab.json").is_file()
    scalars = tb_scalars(split)
    assert scalars["train/loss"] == [2, 4, 6, 8]
    for tag in ("train/grad_norm", "perf/lr", "perf/samples_per_s", "perf/data_wait_s", "val/rsum", "test/rsum"):
        assert tag in scalars, tag
    # no duplicates: VSE++'s loss is its one term (train/vse was train/loss again); no GPU, no per-GPU rate
    assert "train/vse" not in scalars and "perf/samples_per_s_per_gpu" not in scalars
    assert "hparam/test_rsum" in scalars  # the run's HParams entry: settings and final metrics
    # retrieval examples at each validation (steps 4, 8) and the final test: strips and text tables
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(split / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images, texts = acc.Tags()["images"], acc.Tags()["tensors"]
    for j in range(4):
        assert f"val/examples/t2i_{j}" in images and f"test/examples/i2t_{j}/image" in images
        assert f"val/examples/i2t_{j}/captions/text_summary" in texts
    assert [e.step for e in acc.Images("val/examples/t2i_0")] == [4, 8]


def test_bf16_single_process_with_a_given_vocabulary(tiny_shards, tmp_path):
    (tmp_path / "vocab.json").write_text('{"words": ["<pad>", "<start>", "<end>", "<unk>", "red", "circle"]}')
    train(tiny_shards, tmp_path / "bf16", "train.max_steps=3", "train.precision=bf16",
          f"data.vocab={tmp_path / 'vocab.json'}", nproc=1)
    assert (tmp_path / "bf16" / "eval.json").is_file()
    assert json.loads((tmp_path / "bf16" / "vocab.json").read_text())["words"][4:] == ["red", "circle"]


@pytest.mark.parametrize("override,message", [
    ("optim.lr=fast", "optim.lr: expected float"),
    ("data.bogus=1", "data.bogus: unknown key"),
    ("train.zero_stage=3", "train.zero_stage: must be 0, 1 or 2"),
    ("method=clip", "method: unknown method 'clip'"),
])
def test_bad_config_fails_before_work(tiny_shards, tmp_path, override, message):
    proc = train(tiny_shards, tmp_path / "bad", override, nproc=1, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_missing_shards_exit_with_message(tmp_path):
    proc = train(tmp_path / "nowhere", tmp_path / "run", nproc=1, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_resume_with_another_model_is_refused_on_every_rank(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", "train.max_steps=2")
    proc = train(tiny_shards, tmp_path / "run", "train.max_steps=4", "model.embed_dim=48", check=False)
    assert proc.returncode != 0
    assert "model: differs from the run being resumed" in proc.stderr
    assert "Connection closed by peer" not in proc.stderr  # both ranks stopped on their own


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_shards, out, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=1000", nproc=1)
    latest = out / "checkpoints" / "step_00000004" / "shared.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    proc = train(tiny_shards, out, "train.max_steps=6", "train.ckpt_every=2", "train.eval_every=1000", nproc=1)
    assert "checkpoint step_00000004 unreadable" in proc.stdout
    assert "resumed from step_00000002: step 2" in proc.stdout
    assert json.loads((out / "eval.json").read_text())["step"] == 6
