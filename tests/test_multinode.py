"""Multi-node on one machine: two torchrun agents ("nodes", --nnodes=2, a c10d rendezvous on
127.0.0.1) of 2 processes each against one agent of 4 processes, and a node lost mid-run (one
process per node there: 2 ranks resume bit for bit, while at 4 ranks DDP's first step after any
resume adds some gradients in another order; README, "Multi-node training").

Node 0's agent is started first and hosts the rendezvous store (the agent that binds the
endpoint does), as the agent on the endpoint's host does on a real cluster. A lost node is its
agent and its workers killed with SIGKILL (torchrun starts the workers in sessions of their own).
The outcomes are in RELIABILITY.md ("Multi-node") and the README ("Multi-node training").
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port
from test_hashing import HASH, feature_shards  # noqa: F401  (the fixture)
from test_smoke import COMMON, final_model

VSE = [*COMMON, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=1000", "eval.validation=false",
       "train.log_every=1"]
SGRN = [*HASH, "train.max_steps=3", "train.ckpt_every=1000", "train.eval_every=1000", "eval.validation=false"]
CONFIG = {"vsepp": "configs/demo_vsepp_synthetic.yaml", "sgrn": "configs/sgrn_synthetic.yaml"}
# rank 1 (node 1, the second to join) waits after step 3; rank 0 blocks in step 4's collectives
PAUSE_NODE_1 = "pause@3:1"
# every rendezvous round gets a new store, so that a node started again can join the survivors
# (with the shared store of torch's default, the new agent waits for keys nobody writes)
NEW_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TIMEOUT_S = 300


def _descendants(pid: int) -> list[int]:
    found = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        found += [int(child), *_descendants(int(child))]
    return found


class Node:
    """One torchrun agent (``--nproc_per_node=nproc``) meeting the others at ``127.0.0.1:port``."""

    def __init__(self, shards: Path, out: Path, sets: list[str], *, port: int, node_rank: int, nnodes: str = "2",
                 nproc: int = 2, method: str = "vsepp", fault: str = "", torchrun_args: tuple = (),
                 env: dict | None = None):
        self.node_rank, self.lines = node_rank, []
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
               f"--node_rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               *torchrun_args, str(ROOT / "launch/train.py"), "--config", str(ROOT / CONFIG[method]),
               "--out", str(out), *[a for o in (f"data.shards={shards}", *sets) for a in ("--set", o)]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO",
               "XMDIST_FAULT": fault, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def fail(self, why: str, *others: "Node") -> None:
        logs = "".join(f"\n----- node {n.node_rank}\n{n.text()[-5000:]}" for n in (self, *others))
        raise AssertionError(f"node {self.node_rank}: {why}{logs}")

    def wait_for(self, line: str, count: int = 1, timeout: float = TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        while self.text().count(line) < count:
            if self.proc.poll() is not None or time.time() > deadline:
                self.fail(f"no {count} line(s) {line!r} (exit {self.proc.poll()})")
            time.sleep(0.2)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.fail(f"still running after {timeout:.0f} s")
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        """The node dies: SIGKILL to the agent's process group and to every worker."""
        pids = _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def _store_up(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no rendezvous store on 127.0.0.1:{port} after {timeout:.0f} s")


@pytest.fixture
def nodes():
    """``start(*args, **kwargs) -> Node``; node 0 is started only once its store accepts
    connections. Every node still running at the end is killed."""
    started = []

    def start(*args, **kwargs) -> Node:
        node = Node(*args, **kwargs)
        started.append(node)
        if kwargs.get("node_rank") == 0:
            _store_up(kwargs["port"])
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.kill()


def _two_nodes(start, shards, out, sets, port=None, **kwargs) -> tuple[Node, Node]:
    port = port or free_port()
    return start(shards, out, sets, port=port, node_rank=0, **kwargs), \
        start(shards, out, sets, port=port, node_rank=1, **kwargs)


def _ranks(node: Node) -> str:
    """The global ranks torchrun's agent gave its workers, from its rendezvous log."""
    for line in node.lines:
        if "global_ranks=" in line:
            return line.split("global_ranks=")[1].strip()
    node.fail("no global_ranks in the agent's log (LOGLEVEL=INFO)")


def _assert_same_model(a: Path, b: Path) -> None:
    x, y = final_model(a), final_model(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


_REFERENCES: dict[tuple, Path] = {}


@pytest.fixture
def reference(tiny_shards, feature_shards, tmp_path_factory, nodes):  # noqa: F811
    """``reference(method, backend, nproc=4) -> run directory`` of one agent with ``nproc``
    processes, uninterrupted (once per key)."""

    def get(method: str, backend: str, nproc: int = 4) -> Path:
        key = (method, backend, nproc, str(tiny_shards))
        if key not in _REFERENCES:
            out = tmp_path_factory.mktemp("one-node") / f"{method}-{backend}-{nproc}"
            shards, sets = _data(method, backend, tiny_shards, feature_shards)
            node = nodes(shards, out, sets, port=free_port(), node_rank=0, nnodes="1", nproc=nproc, method=method)
            if node.wait() != 0:
                node.fail("the one-node reference run failed")
            assert f"on {nproc} rank(s)" in node.text()
            _REFERENCES[key] = out
        return _REFERENCES[key]

    return get


def _data(method, backend, tiny, features) -> tuple[Path, list[str]]:
    sets = [*(VSE if method == "vsepp" else SGRN), f"train.backend={backend}"]
    return (tiny if method == "vsepp" else features), sets


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vsepp", "sgrn"])
@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_two_nodes_train_like_one(tiny_shards, feature_shards, tmp_path, nodes, reference, method,  # noqa: F811
                                  backend):
    """2 agents x 2 processes end with the parameters of 1 agent x 4 processes, bit for bit."""
    shards, sets = _data(method, backend, tiny_shards, feature_shards)
    out = tmp_path / "two"
    pair = _two_nodes(nodes, shards, out, sets, method=method)
    for node in pair:
        if node.wait() != 0:
            node.fail("the two-node run failed", *pair)
    assert _ranks(pair[0]) == "[0, 1]" and _ranks(pair[1]) == "[2, 3]"
    assert "on 4 rank(s)" in pair[0].text(), pair[0].text()[-3000:]
    assert sorted(p.name for p in (out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())
                  .glob("rank_*.pt")) == [f"rank_{r:05d}.pt" for r in range(4)]
    _assert_same_model(reference(method, backend), out)


def _lose_node(nodes, shards, out, victim: int, torchrun_args: tuple, env: dict | None = None, **kwargs):
    """Two nodes of one process; once rank 1 (node 1) waits after step 3, node ``victim`` dies.
    Returns (node 0, node 1, the port)."""
    port = free_port()
    pair = _two_nodes(nodes, shards, out, VSE + ["train.backend=ddp"], port=port, fault=PAUSE_NODE_1,
                      torchrun_args=torchrun_args, env=env, nproc=1, **kwargs)
    pair[1].wait_for("fault: pausing after step 3")
    if _ranks(pair[1]) != "[1]":
        pair[1].fail("node 1 does not hold rank 1")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    pair[victim].kill()
    return (*pair, port)


@pytest.mark.slow
def test_lost_node_started_again_resumes_and_matches(tiny_shards, tmp_path, nodes, reference):
    """--max-restarts=1, --nnodes=2: node 1 dies after step 3; node 0's workers fail on the closed
    connections, its agent restarts them and waits in the rendezvous for a second node. Starting
    node 1 again with the same command (no fault) completes the rendezvous: the job resumes from
    the step-2 checkpoint and ends with the parameters of an uninterrupted run."""
    out = tmp_path / "run"
    first, lost, port = _lose_node(nodes, tiny_shards, out, 1, ("--max-restarts=1",), env=NEW_STORE)
    first.wait_for("failed (exitcode: 1)")  # its workers failed: the agent goes back to the rendezvous
    assert first.proc.poll() is None
    again = nodes(tiny_shards, out, VSE + ["train.backend=ddp"], port=port, node_rank=1, nproc=1,
                  torchrun_args=("--max-restarts=1",), env=NEW_STORE)
    for node in (first, again):
        if node.wait() != 0:
            node.fail("the resumed job failed", first, again)
    assert "resumed from step_00000002: step 2" in first.text() + again.text()
    _assert_same_model(reference("vsepp", "ddp", nproc=2), out)


@pytest.mark.slow
def test_lost_node_not_replaced_fails_after_join_timeout(tiny_shards, tmp_path, nodes):
    """No replacement: the survivor's agent gives up after --rdzv-conf=join_timeout (default
    600 s) with RendezvousTimeoutError and exits 1; the step-2 checkpoint stays the latest."""
    out = tmp_path / "run"
    first, _, _ = _lose_node(nodes, tiny_shards, out, 1, ("--max-restarts=1", "--rdzv-conf=join_timeout=20"))
    t0 = time.time()
    rc = first.wait(timeout=180)
    assert rc != 0 and "RendezvousTimeoutError" in first.text(), first.text()[-4000:]
    assert time.time() - t0 >= 20, "gave up before the join timeout"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.slow
def test_elastic_survivor_refuses_the_checkpoint_of_the_larger_world(tiny_shards, tmp_path, nodes):
    """--nnodes=1:2: the survivor's agent restarts its worker alone (a world of 1) after
    last_call_timeout; it refuses the 2-rank checkpoint with a message instead of training on
    with another global batch, and the job exits 1 with the checkpoint intact."""
    out = tmp_path / "run"
    first, _, _ = _lose_node(nodes, tiny_shards, out, 1, ("--max-restarts=1", "--rdzv-conf=last_call_timeout=5"),
                             env=NEW_STORE, nnodes="1:2")
    rc = first.wait(timeout=180)
    text = first.text()
    assert rc != 0
    assert f"error: checkpoint step_00000002 in {out / 'checkpoints'} was written by 2 rank(s), this run has 1" \
        in text, text[-4000:]
    assert "step 3 ep" not in text.split("was written by 2 rank(s)")[1]  # no step ran with 1 rank
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.slow
def test_lost_store_host_fails_fast_and_a_rerun_resumes(tiny_shards, tmp_path, nodes, reference):
    """Node 0 (which hosts the rendezvous store) dies: node 1's agent loses the store and exits 1
    within seconds (RendezvousConnectionError), even with --max-restarts=1. Starting both nodes
    again (what a SLURM requeue does) resumes from the step-2 checkpoint exactly."""
    out = tmp_path / "run"
    _, second, _ = _lose_node(nodes, tiny_shards, out, 0, ("--max-restarts=1",))
    t0 = time.time()
    rc = second.wait(timeout=120)
    assert rc != 0 and "RendezvousConnectionError" in second.text(), second.text()[-4000:]
    print(f"node 1 exited {rc} {time.time() - t0:.1f} s after node 0 died")
    pair = _two_nodes(nodes, tiny_shards, out, VSE + ["train.backend=ddp"], torchrun_args=("--max-restarts=1",),
                      nproc=1)
    for node in pair:
        if node.wait() != 0:
            node.fail("the rerun failed", *pair)
    assert "resumed from step_00000002: step 2" in pair[0].text() + pair[1].text()
    _assert_same_model(reference("vsepp", "ddp", nproc=2), out)


def test_store_prefix_is_per_attempt_only_with_the_shared_store():
    """With torchrun's shared store a restarted attempt needs its own keys; with a new store per
    rendezvous round the nodes' restart counts may differ, so the prefix must not depend on them."""
    from xmdist.dist import store_prefix

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert store_prefix({**shared, "TORCHELASTIC_RESTART_COUNT": "1"}) != store_prefix(
        {**shared, "TORCHELASTIC_RESTART_COUNT": "0"})
    new = {"TORCHELASTIC_USE_AGENT_STORE": "False"}
    assert store_prefix({**new, "TORCHELASTIC_RESTART_COUNT": "1"}) == store_prefix(
        {**new, "TORCHELASTIC_RESTART_COUNT": "0"}) == store_prefix({})
