"""Faults injected into real 2-process runs (xmdist/faults.py): signals, killed workers, NaN
losses, hangs. Each test states what must survive; RELIABILITY.md lists the outcomes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_smoke import final_model, train, train_command

QUIET = ["train.ckpt_every=1000", "train.eval_every=1000", "train.log_every=1"]


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the worker process with RANK=rank among ``parent``'s children."""
    pids = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among the children {pids} of {parent}")


def _assert_same_model(a: Path, b: Path) -> None:
    x, y = final_model(a), final_model(b)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


def _stop_with_signal(shards: Path, out: Path, sig: signal.Signals, sets: list[str], **kwargs) -> str:
    """Rank 0 pauses after step 3 (fault), the test sends ``sig`` to rank 0's process only;
    ``kwargs`` go to ``train_command`` (config, common)."""
    cmd = train_command(shards, out, *sets, **kwargs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "XMDIST_FAULT": "pause@3:0"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "pausing after step 3" in line:
            os.kill(_rank_pid(proc.pid, 0), sig)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) != 0, "".join(lines)[-3000:]  # torchrun: 1 when a worker fails
    return "".join(lines)


def test_signal_checkpoints_then_resume_matches(tiny_shards, tmp_path):
    """SIGTERM to one rank mid-run: every rank stops after the same step with a checkpoint, the
    job exits 128 + 15, and rerunning the command ends with the parameters of an uninterrupted run."""
    sets = ["train.max_steps=8", *QUIET]
    train(tiny_shards, tmp_path / "straight", *sets)
    out = tmp_path / "stopped"
    text = _stop_with_signal(tiny_shards, out, signal.SIGTERM, sets)
    assert "received SIGTERM" in text and "stopped by SIGTERM at step 3" in text, text[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    proc = train(tiny_shards, out, *sets)
    assert "resumed from step_00000003: step 3" in proc.stdout
    _assert_same_model(tmp_path / "straight", out)


@pytest.mark.slow
def test_resume_with_dropout_matches(tiny_shards, tmp_path):
    """DJSRH fine-tuning a random AlexNet from pixels (dropout active in fc6/fc7) on 2 ranks,
    stopped by SIGTERM after step 3 and resumed: the dropout masks after the resume are those of
    an uninterrupted run (every rank's generators are restored), so the parameters are equal."""
    from xmdist.models.backbones import build_extractor

    trunk = build_extractor("alexnet", ["fc7"], "random", trainable=True)
    assert trunk.training and all(m.training for m in trunk.modules() if isinstance(m, torch.nn.Dropout))
    hashing = dict(config="configs/djsrh_synthetic.yaml", common=())
    sets = ["data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=50", "model.bits=16",
            "model.text_hidden=32", "model.image_input=pixels", "model.backbone=alexnet", "model.weights=random",
            "model.image_size=64", "data.features=", "train.max_steps=6", "eval.validation=false", *QUIET,
            "data.labels=[circle, square, triangle, star, cross, diamond, hexagon, heart, ring, crescent]"]
    train(tiny_shards, tmp_path / "straight", *sets, **hashing)
    out = tmp_path / "stopped"
    text = _stop_with_signal(tiny_shards, out, signal.SIGTERM, sets, **hashing)
    assert "stopped by SIGTERM at step 3" in text, text[-3000:]
    proc = train(tiny_shards, out, *sets, **hashing)
    assert "resumed from step_00000003: step 3" in proc.stdout
    dropout = [m for m in torch.load(out / "checkpoints" / "step_00000006" / "shared.pt", weights_only=True)
               ["nets"]["model"]["model"] if m.startswith("trunk.head.")]
    assert dropout, "the AlexNet head (fc6, fc7 with dropout) is trained"
    _assert_same_model(tmp_path / "straight", out)


def test_sigint_stops_with_a_checkpoint(tiny_shards, tmp_path):
    text = _stop_with_signal(tiny_shards, tmp_path / "run", signal.SIGINT, ["train.max_steps=8", *QUIET])
    assert "stopped by SIGINT at step 3" in text
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "shared.pt").is_file()


def test_killed_worker_restarts_and_matches(tiny_shards, tmp_path):
    """kill -9 of rank 1 after step 5 under torchrun --max-restarts=1: the group restarts, resumes
    from the step-4 checkpoint and ends with the parameters of an uninterrupted run."""
    sets = ["train.max_steps=8", "train.ckpt_every=2", "train.eval_every=1000", "train.log_every=1"]
    train(tiny_shards, tmp_path / "straight", *sets)
    proc = train(tiny_shards, tmp_path / "killed", *sets, fault="kill@5:1", torchrun_args=("--max-restarts=1",))
    assert "fault: kill after step 5" in proc.stdout
    assert "resumed from step_00000004: step 4" in proc.stdout
    _assert_same_model(tmp_path / "straight", tmp_path / "killed")


def test_nonfinite_loss_skips_the_step_on_every_rank(tiny_shards, tmp_path):
    """A NaN loss on rank 1 at step 3: no rank updates at step 3, training goes on."""
    out = tmp_path / "run"
    proc = train(tiny_shards, out, "train.max_steps=5", "train.ckpt_every=1", "train.keep_last=10",
                 "train.eval_every=1000", "train.log_every=1", fault="nan@3:1")
    assert "step 3: non-finite model loss on some rank" in proc.stdout
    ckpt = lambda s: torch.load(out / "checkpoints" / f"step_{s:08d}" / "shared.pt",  # noqa: E731
                                weights_only=True)["nets"]["model"]["model"]
    before, skipped, after = ckpt(2), ckpt(3), ckpt(4)
    assert any("running_mean" in k for k in before)  # the model has BatchNorm statistics
    for k in before:  # parameters and buffers: the skipped step's forward left no trace
        torch.testing.assert_close(skipped[k], before[k], rtol=0, atol=0, msg=k)
        assert torch.isfinite(after[k].float()).all(), k
    assert any(not torch.equal(after[k], before[k]) for k in before)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    counts = {e.step: e.value for e in acc.Scalars("train/nonfinite_steps")}
    assert counts == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0}
    assert json.loads((out / "eval.json").read_text())["step"] == 5


def test_nonfinite_run_aborts_with_a_message(tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", "train.max_steps=8", "train.max_nonfinite=3", *QUIET,
                 check=False, fault="nan@2,nan@3,nan@4")
    assert proc.returncode != 0
    assert "3 non-finite steps in a row (steps 2-4, train.max_nonfinite=3): training diverged" in proc.stdout
    assert "step 1" in proc.stdout and "step 5 " not in proc.stdout


def test_watchdog_dumps_stacks_and_exits(tiny_shards, tmp_path):
    """Rank 1 hangs after step 3; rank 0 waits in a collective. Both watchdogs fire within
    train.watchdog_s, print every thread's stack and end the job instead of waiting 30 minutes."""
    proc = train(tiny_shards, tmp_path / "run", "train.max_steps=8", "train.watchdog_s=6", *QUIET,
                 check=False, fault="hang@3:1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "watchdog: rank 1 made no progress" in out and "watchdog: rank 0 made no progress" in out, out[-3000:]
    assert "most recent call first" in out and "in after_step" in out  # rank 1's stack shows where it hangs


def test_one_process_ignores_an_inherited_port_that_is_taken():
    """A single process started without a launcher (tools, the first job of a test) keeps its
    rendezvous store in memory, even when MASTER_PORT inherited from a parent names a port that
    another process (or a killed job's lingering socket) holds: no EADDRINUSE."""
    code = ("import torch, torch.distributed as dist\n"
            "from xmdist.dist import DistEnv, init_distributed, destroy_distributed\n"
            "init_distributed(DistEnv.from_environ(device='cpu'), 60)\n"
            "t = torch.ones(1); dist.all_reduce(t); assert t.item() == 1.0\n"
            "destroy_distributed(); print('ok')\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held.getsockname()[1]))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=env, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_second_job_on_the_same_run_directory_is_refused(tiny_shards, tmp_path):
    """Two jobs on one --out: the second exits 2 naming the first (host, pid, start) and writes
    nothing; once the first is gone (even killed with SIGKILL), the directory is free again."""
    out, sets = tmp_path / "run", ["train.max_steps=4", *QUIET]
    cmd = train_command(tiny_shards, out, *sets, nproc=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "XMDIST_FAULT": "pause@2"}
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in first.stdout:
            if "pausing after step 2" in line:
                break
        # the first job's own TensorBoard writer flushes in the background: its event file may change
        state = lambda: sorted((p.relative_to(out), "tb" if p.parts[-2] == "tb" else p.stat().st_mtime_ns)  # noqa: E731
                               for p in out.rglob("*") if p.is_file())
        before = state()
        second = train(tiny_shards, out, *sets, nproc=2, check=False)
        assert second.returncode != 0
        assert f"error: {out} is in use by another job (host {socket.gethostname()}, pid {first.pid}, started " \
            in second.stderr, second.stderr[-2000:]
        assert "step 1 ep" not in second.stdout
        assert state() == before  # the second job wrote nothing: no new file, no file rewritten
    finally:
        first.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        first.wait(timeout=60)
    proc = train(tiny_shards, out, *sets, nproc=1)  # the killed holder wrote no checkpoint: a new start
    assert "step 4 ep" in proc.stdout and (out / "eval.json").exists(), proc.stdout[-2000:]


@pytest.mark.slow
def test_ranks_stop_with_a_checkpoint_when_torchrun_is_killed(tiny_shards, tmp_path):
    """kill -9 of torchrun's process group: the workers (in sessions of their own) notice that
    their launcher is gone and stop after the same step with a checkpoint, within seconds,
    instead of training on unsupervised; rerunning the command resumes there."""
    out, sets = tmp_path / "run", ["train.max_steps=8", *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "XMDIST_FAULT": "pause@3"}
    agent = subprocess.Popen(train_command(tiny_shards, out, *sets), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    for line in agent.stdout:
        lines.append(line)
        if "pausing after step 3" in line:
            break
    workers = [_rank_pid(agent.pid, r) for r in (0, 1)]
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(timeout=30)
    t0 = time.time()
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) for pid in workers):
        assert time.time() - t0 < 60, "workers still running a minute after their launcher died"
        time.sleep(0.2)
    lines += agent.stdout.readlines()
    text = "".join(lines)
    assert "the launcher (pid" in text and "is gone: stopping after this step with a checkpoint" in text, text[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003", text[-3000:]
    proc = train(tiny_shards, out, *sets)
    assert "resumed from step_00000003: step 3" in proc.stdout


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


_WATCHED = """
import sys, time
from xmdist import progress
from xmdist.train.watchdog import Watchdog
mode = sys.argv[1]
w = Watchdog(1.0, 0)
t0 = time.time()
while time.time() - t0 < 4:  # 4 s of work, four times the timeout
    if mode == "reports":
        progress.report("evaluation: encoding split 'val'")  # what encode_split does per batch
    time.sleep(0.1)
if mode == "reports":
    with progress.waiting("waiting for rank 0"):  # what on_main does on the other ranks
        time.sleep(3)
w.stop()
print("alive")
"""


@pytest.mark.slow
def test_evaluation_progress_keeps_the_watchdog_quiet():
    """Evaluation batches and waits for rank 0 report progress: a healthy evaluation longer than
    train.watchdog_s goes on; the same time without reports is a hang (exit 3)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-c", _WATCHED, "reports"], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0 and "alive" in ok.stdout, ok.stderr[-2000:]
    hung = subprocess.run([sys.executable, "-c", _WATCHED, "silent"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert hung.returncode == 3 and "made no progress" in hung.stderr, hung.stderr[-2000:]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_shards, tmp_path):
    """Writing checkpoint 4 fails on rank 1 as on a full disk: every rank stops with exit 2 and a
    message naming the path and the free space; no partial directory stays; latest is still 2 and
    rerunning resumes from it."""
    out = tmp_path / "run"
    sets = ["train.max_steps=6", "train.ckpt_every=2", "train.eval_every=1000", "train.log_every=1"]
    proc = train(tiny_shards, out, *sets, check=False, fault="enospc@4:1")
    assert proc.returncode != 0
    ckpt = out / "checkpoints"
    assert (f"error: could not write checkpoint {ckpt / 'step_00000004.tmp'} (rank 1: OSError: [Errno 28] No space "
            f"left on device)") in proc.stderr, proc.stderr[-3000:]
    assert "MiB free on its file system" in proc.stderr and "the latest complete one is step_00000002" in proc.stderr
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr.replace(" ", "")
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    proc = train(tiny_shards, out, *sets)
    assert "resumed from step_00000002: step 2" in proc.stdout
