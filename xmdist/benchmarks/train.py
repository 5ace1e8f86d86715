"""Training-step benchmark: throughput and where a step's time goes (see launch/bench.py).

It times the trainer's own ``Trainer.train_step`` (no copy of it): a :class:`Stopwatch` is
assigned to ``trainer.clock``, which ``train_step`` calls after each of its stages, and sums the
time since the previous mark under each mark's name (synchronising CUDA first on a GPU, so a
stage's kernels count in that stage). A few batches (at most 8) are taken from
``trainer.loader()`` once and reused, so no step waits for data; warm-up steps are not timed.

JSON fields (rank 0 prints them). Times are seconds per step: the mean over the timed steps on
each rank, then the mean over ranks (the slowest rank sets the pace; the all-reduces inside the
step make the ranks wait for each other, so they differ little):

- ``machine`` (host, cpu, torch_threads, device), ``torch``, ``world_size``, ``backend``,
  ``precision``, ``method``, ``backbone`` (``model.backbone``; null if the method's model has
  none), ``batch_size_per_rank``, ``image_size`` (the crop), ``loader_workers_per_rank``.
- ``loader_samples_per_s_per_rank`` / ``loader_samples_per_s_total`` (summed over ranks): the
  training loader alone (decode + augment + batch, no model), after its first batch.
- ``data_s``: the batch moved to the device (with ``data.gpu_decode``, decoded there too).
- ``forward_s``: the method's forward (``method.forward``: the networks' forward passes).
- ``loss_s``: every phase's loss forward, including its all-gathers (not its backward).
- ``backward_s``: every phase's backward (gradient all-reduce included) plus the agreement on a
  finite loss that precedes it (one tiny all-reduce).
- ``optimizer_s``: every phase's optimizer step (gradient clipping, the step, the LR schedule).
- ``step_time_s``: data_s + forward_s + loss_s + backward_s + optimizer_s (what follows the last
  optimizer step, packing the logged terms, is not counted).
- ``loss_share``: loss_s / step_time_s (the loss forward's share of a step).
- ``train_samples_per_s``: global batch / step_time_s; ``train_samples_per_s_per_rank``: that
  over world_size.
- ``phases``: per network of ``method.phases`` (in phase order, e.g. discriminators then the
  model) ``{"loss_s", "backward_s", "optimizer_s"}``; a phase skipped for a non-finite loss has
  no backward or step in that step (the trainer logs a warning).
- ``peak_rss_gb_per_rank_max``: the largest peak host memory of a rank (the whole process; on
  CPU it includes the model's memory); ``gpu_max_memory_gb`` on a GPU only.
"""
from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from xmdist.dist import DistEnv, all_reduce_max, all_reduce_sum, barrier, broadcast_object, destroy_distributed, init_distributed
from xmdist.methods import load_config  # against the registered methods
from xmdist.train.logger import setup_console

STAGES = {"loss": "loss_s", "backward": "backward_s", "step": "optimizer_s"}  # per-phase marks -> fields


class Stopwatch:
    """``trainer.clock``: sums the time since the previous mark (or :meth:`start`) per mark name."""

    def __init__(self, device: torch.device):
        self.device, self.totals, self.last = device, {}, 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def __call__(self, mark: str) -> None:
        now = self._now()
        self.totals[mark] = self.totals.get(mark, 0.0) + now - self.last
        self.last = now


def bench_loader(trainer, batches: int) -> float:
    """Samples/s of this rank's training loader (decode + augment + batch, no model)."""
    loader = iter(trainer.loader())
    next(loader)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(loader)["image_ids"])
    return n / (time.perf_counter() - t0)


def bench_steps(trainer, steps: int, warmup: int) -> dict:
    """Mean time per step of each stage of the real ``trainer.train_step`` (module docstring)."""
    env = trainer.env
    batches = [b for _, b in zip(range(min(warmup + steps, 8)), trainer.loader())]  # re-used: no data wait
    networks = list(dict.fromkeys(phase.network for phase in trainer.method.phases))
    watch, clock = Stopwatch(env.device), trainer.clock
    trainer.clock = watch
    try:
        for i in range(warmup + steps):
            if i == warmup:
                watch.totals = {}  # warm-up steps are not timed
            # A fresh dict each time: fit() pops "skipped", and a gpu_decode batch is consumed.
            batch = {k: v for k, v in batches[i % len(batches)].items() if k != "skipped"}
            watch.start()
            trainer.train_step(batch)
    finally:
        trainer.clock = clock
    # One vector in a fixed order (the same on every rank): data, forward, then per network its stages.
    keys = ["data", "forward"] + [f"{stage}_{net}" for net in networks for stage in STAGES]
    totals = torch.tensor([watch.totals.get(k, 0.0) for k in keys], dtype=torch.float64, device=env.device)
    vals = all_reduce_sum(totals)  # on the device: NCCL reduces no CPU tensors
    mean = {k: float(v) / env.world_size / steps for k, v in zip(keys, vals)}
    phases = {net: {field: mean[f"{stage}_{net}"] for stage, field in STAGES.items()} for net in networks}
    parts = {"data_s": mean["data"], "forward_s": mean["forward"],
             **{field: sum(p[field] for p in phases.values()) for field in STAGES.values()}}
    step = sum(parts.values())
    gb = trainer.cfg.data.batch_size * env.world_size
    return {**parts, "step_time_s": step, "loss_share": parts["loss_s"] / step,
            "train_samples_per_s": gb / step, "train_samples_per_s_per_rank": gb / step / env.world_size,
            "phases": phases}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loader-batches", type=int, default=20)


def run(args: argparse.Namespace) -> dict | None:
    """Result dict on rank 0, None elsewhere."""
    cfg = load_config(args.config, args.overrides)
    env = DistEnv.from_environ(device=cfg.train.device)
    setup_console(env)
    init_distributed(env, cfg.train.dist_timeout_s)
    from xmdist.train.trainer import Trainer

    tmp = Path(broadcast_object(tempfile.mkdtemp() if env.is_main else None))  # one run dir for all ranks
    trainer = Trainer(cfg, env, tmp / "run", resume="none")
    loader_sps = bench_loader(trainer, args.loader_batches)
    loader_total = float(all_reduce_sum(torch.tensor([loader_sps], dtype=torch.float64, device=env.device)))
    steps = bench_steps(trainer, args.steps, args.warmup)
    trainer.close()
    barrier()
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"},
        "torch": torch.__version__, "world_size": env.world_size, "backend": cfg.train.backend,
        "precision": cfg.train.precision, "method": cfg.method, "backbone": getattr(cfg.model, "backbone", None),
        "batch_size_per_rank": cfg.data.batch_size, "image_size": cfg.data.crop_size,
        "loader_workers_per_rank": cfg.data.num_workers,
        "loader_samples_per_s_per_rank": loader_sps, "loader_samples_per_s_total": loader_total,
        **steps,
    }
    # Peak host memory of the rank (the whole process: on CPU this includes the model's memory).
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64,
                       device=env.device)
    result["peak_rss_gb_per_rank_max"] = float(all_reduce_max(rss))
    if env.device.type == "cuda":
        result["gpu_max_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    is_main = env.is_main
    destroy_distributed()
    return result if is_main else None
