"""Training-step benchmark: throughput and where a step's time goes (see launch/bench.py)."""
from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from xmdist.config import load_config
from xmdist.dist import DistEnv, all_reduce_max, all_reduce_sum, barrier, broadcast_object, destroy_distributed, init_distributed
from xmdist.logger import setup_console


def _sync(env: DistEnv) -> float:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return time.perf_counter()


def bench_loader(trainer, batches: int) -> float:
    """Samples/s of this rank's training loader (decode + augment + batch, no model)."""
    loader = iter(trainer._loader())
    next(loader)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(loader)["image_ids"])
    return n / (time.perf_counter() - t0)


def bench_steps(trainer, steps: int, warmup: int) -> dict[str, float]:
    """Mean time per step of: model forward; gather + loss forward and backward down to the
    model outputs (graph cut at the outputs: exactly the trainer's computation); the rest of the
    backward and the optimizer steps (including other networks' phases, e.g. discriminators)."""
    env, method, nets = trainer.env, trainer.method, trainer.nets
    batches = [b for _, b in zip(range(min(steps, 8)), trainer._loader())]  # re-used: no data wait
    parts = {"forward": 0.0, "gather_loss": 0.0, "backward_step": 0.0}
    for i in range(warmup + steps):
        batch = {k: v.to(env.device) for k, v in batches[i % len(batches)].items() if k != "skipped"}
        t0 = _sync(env)
        with trainer.model.autocast():
            out = method.forward(nets, batch)
        t1 = _sync(env)
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in out.items()}
        gather_loss, rest = 0.0, 0.0
        for phase in method.phases:
            net = nets[phase.network]
            ta = _sync(env)
            with net.autocast():
                terms = phase.loss(nets, batch, leaves, trainer.epoch)
            net.backward(terms["loss"] * env.world_size)
            tb = _sync(env)
            if phase.network == "model":
                grads = [(out[k], v.grad) for k, v in leaves.items() if v.grad is not None]
                torch.autograd.backward([o for o, _ in grads], [g for _, g in grads])
            net.step()
            tc = _sync(env)
            gather_loss += tb - ta if phase.network == "model" else 0.0
            rest += tc - tb + (tb - ta if phase.network != "model" else 0.0)
        if i >= warmup:
            parts["forward"] += t1 - t0
            parts["gather_loss"] += gather_loss
            parts["backward_step"] += rest
    # The slowest rank sets the pace: report the mean over ranks of each part.
    vals = all_reduce_sum(torch.tensor(list(parts.values()), dtype=torch.float64)) / env.world_size
    parts = {k: float(v) / steps for k, v in zip(parts, vals)}
    step = sum(parts.values())
    gb = trainer.cfg.data.batch_size * env.world_size
    return {"step_time_s": step, **{f"{k}_s": v for k, v in parts.items()},
            "gather_loss_share": parts["gather_loss"] / step, "train_samples_per_s": gb / step,
            "train_samples_per_s_per_rank": gb / step / env.world_size}


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
    from xmdist.trainer import Trainer

    tmp = Path(broadcast_object(tempfile.mkdtemp() if env.is_main else None))  # one run dir for all ranks
    trainer = Trainer(cfg, env, tmp / "run", resume="none")
    loader_sps = bench_loader(trainer, args.loader_batches)
    loader_total = float(all_reduce_sum(torch.tensor([loader_sps], dtype=torch.float64)))
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
        "precision": cfg.train.precision, "method": cfg.method, "backbone": cfg.model.backbone,
        "batch_size_per_rank": cfg.data.batch_size, "image_size": cfg.data.crop_size,
        "loader_workers_per_rank": cfg.data.num_workers,
        "loader_samples_per_s_per_rank": loader_sps, "loader_samples_per_s_total": loader_total,
        **steps,
    }
    # Peak host memory of the rank (the whole process: on CPU this includes the model's memory).
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)
    result["peak_rss_gb_per_rank_max"] = float(all_reduce_max(rss))
    if env.device.type == "cuda":
        result["gpu_max_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    is_main = env.is_main
    destroy_distributed()
    return result if is_main else None
