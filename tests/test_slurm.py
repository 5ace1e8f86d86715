"""SLURM: both sbatch templates on a real cluster, and pre-emption -> requeue -> exact resume.

Needs a running cluster (``bash .ci/slurm.sh`` starts one on this machine, two nodes that are
two slurmd of the one host, and runs this file); marked ``slurm``, so the default test run
leaves it out. Jobs run on the CPU (gloo) with 2 processes on the tiny shards; each takes well
under a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_smoke import COMMON, final_model

pytestmark = pytest.mark.slurm

SETS = [*COMMON, "train.max_steps=6", "train.ckpt_every=1000", "train.eval_every=1000"]
# The templates ask for 8 GPUs per node; on a CPU cluster: none, and 2 processes.
CPU = {"train_srun.sbatch": ["--ntasks-per-node=2", "--cpus-per-task=1"],
       "train_torchrun.sbatch": ["--ntasks-per-node=1", "--cpus-per-task=2"]}
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
JOB_TIMEOUT_S = 240
TWO_NODES = "ci-2nodes"  # the partition of .ci/slurm.sh's two nodes


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not on PATH: start a cluster with `bash .ci/slurm.sh`")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer in 30 s: no SLURM controller (bash .ci/slurm.sh starts one)")
    if proc.returncode != 0:
        pytest.skip(f"sinfo failed, no SLURM cluster to submit to (bash .ci/slurm.sh starts one): "
                    f"{proc.stderr.strip()[-300:]}")


class Job:
    """One sbatch submission of a template; its log is ``<out>.log``."""

    def __init__(self, template: str, shards: Path, out: Path, fault: str | None = None, nodes: int = 1):
        self.out, self.log = out, out.with_suffix(".log")
        sets = [a for o in (*SETS, f"data.shards={shards}") for a in ("--set", o)]
        # two nodes: one process on each, the same 2 ranks as on one node
        cpu = CPU[template] if nodes == 1 else ["--ntasks-per-node=1", "--cpus-per-task=1", f"--nodes={nodes}",
                                                f"--partition={TWO_NODES}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NPROC": str(2 // nodes), "OUT": str(out),
               "CONFIG": "configs/demo_vsepp_synthetic.yaml", "XMDIST_ROOT": str(ROOT)}
        env.pop("XMDIST_FAULT", None)
        if fault:
            env["XMDIST_FAULT"] = fault
        cmd = ["sbatch", "--parsable", f"--job-name=xmdist-test-{template.split('_')[1].split('.')[0]}",
               f"--output={self.log}", "--time=10", "--gpus-per-node=0", *cpu,
               str(ROOT / "launch/slurm" / template), *sets]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]

    def info(self) -> dict[str, str]:
        text = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True,
                              timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def fail(self, why: str) -> None:
        raise AssertionError(f"job {self.id}: {why}\n{self.info()}\n----- {self.log}\n{self.text()[-6000:]}")

    def wait_for_line(self, line: str, timeout: float = JOB_TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        while line not in self.text():
            if time.time() > deadline or self.info().get("JobState") in DONE:
                self.fail(f"no line {line!r} in the log")
            time.sleep(0.5)

    def wait(self, restarts: int = 0, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Wait until the job has ended (a requeued job is pending in between, never ended); fail
        unless it completed after exactly ``restarts`` requeues."""
        deadline = time.time() + timeout
        while (info := self.info()).get("JobState") not in DONE:
            if time.time() > deadline:
                self.fail(f"still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(1)
        if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
            self.fail(f"ended {info['JobState']} with exit code {info['ExitCode']}")
        if info["Restarts"] != str(restarts):
            self.fail(f"ended after {info['Restarts']} requeue(s), not {restarts}")
        return info

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)


@pytest.fixture
def jobs():
    """Submit through this; whatever is still queued or running at the end is cancelled."""
    submitted = []

    def submit(*args, **kwargs) -> Job:
        submitted.append(Job(*args, **kwargs))
        return submitted[-1]

    yield submit
    for job in submitted:
        job.cancel()


def check_outputs(job: Job) -> None:
    out = job.out
    assert "global batch 16 on 2 rank(s)" in job.text(), "the two processes did not form one world"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (out / "checkpoints" / "step_00000006" / "shared.pt").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 6 and result["split"] == "test"


def assert_same_model(a: Path, b: Path) -> None:
    pa, pb = final_model(a), final_model(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory) -> Job:
    """The uninterrupted reference run: the srun template, 2 tasks."""
    job = Job("train_srun.sbatch", tiny_shards, tmp_path_factory.mktemp("slurm") / "straight")
    try:
        job.wait()
    finally:
        job.cancel()
    return job


def test_srun_template_trains_two_tasks(straight):
    check_outputs(straight)
    assert "train.py exited 0" in straight.text()


def test_torchrun_template_trains_one_node_two_workers(tiny_shards, tmp_path, jobs, straight):
    job = jobs("train_torchrun.sbatch", tiny_shards, tmp_path / "torchrun")
    job.wait()
    check_outputs(job)
    assert f"1 node(s) x 2 worker(s), rendezvous {job.info()['NodeList']}:" in job.text()
    assert_same_model(straight.out, job.out)  # the same ranks and data: the same parameters


@pytest.mark.parametrize("template, signal_to", [
    ("train_srun.sbatch", "--batch"),       # what --signal=B:USR1@120 does: the batch shell forwards
    ("train_torchrun.sbatch", "--batch"),   # the same through torchrun's agent
    ("train_srun.sbatch", None),            # straight to the tasks (--signal=USR1@120 without B:)
], ids=["srun-warning", "torchrun-warning", "srun-signal-to-tasks"])
def test_preemption_requeues_and_resumes_exactly(tiny_shards, tmp_path, jobs, straight, template, signal_to):
    """SIGUSR1 at step 3 through SLURM: every rank checkpoints and stops, the job requeues itself,
    the second attempt resumes at step 3 and ends with the uninterrupted run's parameters."""
    job = jobs(template, tiny_shards, tmp_path / "preempted", fault="pause@3")
    job.wait_for_line("fault: pausing after step 3 until a signal arrives")
    cmd = ["scancel", "--signal=USR1", *([signal_to] if signal_to else []), job.id]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    job.wait(restarts=1)
    text = job.text()
    for line in ("[rank 0] WARNING xmdist.train: stopped by SIGUSR1 at step 3",
                 "[rank 1] WARNING xmdist.train: stopped by SIGUSR1 at step 3",
                 f"requeueing job {job.id} to resume from {job.out}",
                 "[rank 0] INFO xmdist.train.trainer: resumed from step_00000003: step 3",
                 f"[slurm job {job.id}, restart 1]"):
        if line not in text:
            job.fail(f"no line {line!r} in the log")
    if signal_to == "--batch":
        assert "SIGUSR1 (pre-emption warning): forwarding it" in text
    assert (job.out / "checkpoints" / "step_00000003").is_dir()
    check_outputs(job)
    assert_same_model(straight.out, job.out)


@pytest.fixture(scope="module")
def two_nodes() -> None:
    """Skip unless .ci/slurm.sh's second node is up (module scope: checked before ``straight`` runs)."""
    proc = subprocess.run(["sinfo", "-h", "-p", TWO_NODES, "-o", "%D %t"], capture_output=True, text=True, timeout=30)
    if proc.stdout.split() != ["2", "idle"]:
        pytest.skip(f"no 2 idle nodes in partition {TWO_NODES} (sinfo: {proc.stdout.strip() or proc.stderr.strip()!r}); "
                    f".ci/slurm.sh starts them when the host name resolves")


@pytest.mark.parametrize("template", ["train_torchrun.sbatch", "train_srun.sbatch"])
def test_two_nodes_train_like_one(two_nodes, tiny_shards, tmp_path, jobs, straight, template):
    """sbatch --nodes=2, one process per node: the ranks meet across the two slurmd (torchrun's
    c10d rendezvous on the first node, or srun's tasks with MASTER_ADDR the first node) and end
    with the parameters of the one-node run."""
    job = jobs(template, tiny_shards, tmp_path / "two", nodes=2)
    info = job.wait()
    check_outputs(job)
    hosts = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                           timeout=30).stdout.split()
    assert len(hosts) == 2, info["NodeList"]
    if template == "train_torchrun.sbatch":
        assert f"2 node(s) x 1 worker(s), rendezvous {hosts[0]}:" in job.text()
    assert_same_model(straight.out, job.out)
