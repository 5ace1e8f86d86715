"""Process topology and the few collectives xmdist needs.

``DistEnv`` is built once (from torchrun's or SLURM's variables) and passed explicitly; no
other module reads the environment or asks torch.distributed who it is. Collectives here work
for a world of one too (they return their input), so single-process code paths are the same.

Launch: ``torchrun --nproc_per_node=8 launch/train.py --config ...`` or ``srun`` (SLURM).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xmdist import progress


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @classmethod
    def from_environ(cls, env: dict | None = None, device: str = "auto") -> "DistEnv":
        """Read torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, ...), else SLURM's, else one process."""
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", 0))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            node_rank = int(env.get("GROUP_RANK", rank // max(local_world, 1)))
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local_rank = int(env.get("SLURM_LOCALID", 0))
            local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]) if world > 1 else 1
            node_rank = int(env.get("SLURM_NODEID", 0))
        else:
            rank, world, local_rank, local_world, node_rank = 0, 1, 0, 1, 0
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            dev = torch.device("cpu")
        return cls(rank, local_rank, world, local_world, node_rank, dev)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix if not ranges else prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_prefix(env: dict | None = None) -> str:
    """The key prefix of this attempt's process group in the rendezvous store.

    torchrun's agents share one store for the whole job by default (TORCHELASTIC_USE_AGENT_STORE):
    a rank restarted by ``--max-restarts`` would read its peers' addresses from the failed attempt
    without a prefix per attempt. With ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` every rendezvous
    round gets a new store, and the restart counts of the nodes may differ (a node started again
    by hand counts from 0 while the survivors count their restarts): the prefix must then be the
    same on every node.
    """
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return f"xmdist/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return "xmdist/attempt_0"


def init_distributed(env: DistEnv, timeout_s: int = 1800) -> None:
    """Create the default process group (also for one process, so every code path is the same)."""
    if dist.is_initialized():
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        os.environ["MASTER_ADDR"] = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    # One process started without a launcher needs no rendezvous and no port to race for, even
    # when MASTER_PORT is inherited from a parent (a stale port may still be held by a killed job).
    alone = env.world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1 and "SLURM_JOB_ID" in os.environ:
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
        elif env.world_size == 1:
            os.environ["MASTER_PORT"] = str(_free_port())  # for libraries that read it
        else:
            raise RuntimeError("MASTER_PORT is not set: launch with torchrun or srun, or export it")
    timeout = datetime.timedelta(seconds=timeout_s)
    # A TCP store on a port found free a moment ago can lose it to another process (EADDRINUSE):
    # a single process keeps its store in memory instead.
    store = dist.HashStore() if alone else next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))[0]
    dist.init_process_group(
        backend=env.backend, store=dist.PrefixStore(store_prefix(), store), rank=env.rank,
        world_size=env.world_size, timeout=timeout, device_id=env.device if env.device.type == "cuda" else None,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and returns this rank's slice.

    The sum is what makes gradients exact: rank r's embeddings appear as columns in every
    other rank's loss, so d(sum of all ranks' losses)/d(x_r) needs all ranks' contributions.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Concatenate equal-sized ``x`` (n, ...) from all ranks in rank order -> (N, ...)."""
    if _world() == 1:
        return x
    if grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather` for tensors whose first dimension differs between ranks (no grad)."""
    if _world() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather(n).tolist()
    padded = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = gather(padded).split(max(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (small objects only: metrics, flags)."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn, env: DistEnv):
    """Run ``fn()`` on rank 0 only and return its result on every rank (a small object: metrics,
    a flag, None). An exception there is raised on every rank (same type and message), so the
    other ranks never wait in a collective for a rank that has failed."""
    error, result = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = (type(e), str(e))
        error, result = broadcast_object((error, result))
    else:
        with progress.waiting("waiting for rank 0"):  # rank 0 is watched by its own watchdog
            error, result = broadcast_object((error, result))
    if error is not None:
        raise error[0](error[1])
    return result


def gather_objects(obj) -> list:
    """Every rank's small Python object, in rank order (shapes, counts)."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _world() > 1:
        dist.barrier()
