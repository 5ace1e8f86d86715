"""Shared fixtures: tiny synthetic shard sets and a gloo process launcher for parity tests."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def make_synthetic(out: Path, num: int = 360, val: int = 40, test: int = 40, per_shard: int = 40,
                   size: int = 32, seed: int = 0) -> Path:
    from xmdist.cli import make_shards

    args = ["synthetic", "--out", str(out), "--num", str(num), "--val", str(val), "--test", str(test),
            "--samples-per-shard", str(per_shard), "--image-size", str(size), "--seed", str(seed)]
    assert make_shards.main(args) == 0
    return out


@pytest.fixture(autouse=True)
def _no_rendezvous_leak():
    """A tool run in-process sets MASTER_ADDR/MASTER_PORT in this process: restore them, so that
    later subprocesses do not inherit a port that a finished (or killed) job held."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """280 train (7 shards), 40 val, 40 test samples of 32 px."""
    return make_synthetic(tmp_path_factory.mktemp("shards") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes (fn at module level)."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
