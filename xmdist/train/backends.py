"""DDP and DeepSpeed behind one small interface: wrap, autocast, backward, step, state.

Both average gradients over ranks. Method losses are each rank's *share* of the global-batch
objective (their sum over ranks is the objective), so the trainer scales the share by the world
size before ``backward``: the averaged gradient is then exactly the objective's gradient.

State is split in two: ``shared_state`` (identical on every rank, written by rank 0) and
``rank_state`` (per rank: ZeRO optimizer partitions). Saving and loading are collective.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from xmdist.config import ConfigError, Config, OptimConfig
from xmdist.dist import DistEnv
from xmdist.train.optim import build_optimizer, build_scheduler

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DDPBackend:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config, env: DistEnv,
                 grad_clip: float):
        if cfg.train.precision == "fp16" and env.device.type != "cuda":
            raise ConfigError("train.precision: fp16 needs a GPU (gradient scaling); use bf16 on CPU")
        self.module = model.to(env.device)
        self.model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dtype, self.device_type = DTYPES[cfg.train.precision], env.device.type
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
        self.grad_clip = grad_clip

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Clip, step optimizer and scheduler; returns the total grad norm before clipping.

        A non-finite norm skips the optimizer step (the fp16 scaler does the same on overflow)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)
        # Gradients are all-reduced, so the norm and the decision are the same on every rank.
        if self.scaler.is_enabled() or torch.isfinite(norm):
            self.scaler.step(self.optimizer)  # skipped by the scaler when fp16 grads overflowed
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def shared_state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def rank_state(self) -> dict:
        return {}

    def load(self, shared: dict, rank: dict) -> None:
        self.module.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])


class DeepSpeedBackend:
    """One DeepSpeed engine; ZeRO stage and bf16/fp16 come from the xmdist config."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config, env: DistEnv,
                 grad_clip: float):
        import deepspeed  # optional dependency: only imported when asked for

        t = cfg.train
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,  # plain torch Adam/SGD under ZeRO 1/2
            "steps_per_print": 10**9,
        }
        # DeepSpeed reads the topology from the environment; a plain `python train.py` has none.
        for var, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
            os.environ.setdefault(var, str(value))
        deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(env.device), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.model = self.engine
        self.module = self.engine.module
        self.world_size, self.zero_stage, self.precision = env.world_size, t.zero_stage, t.precision
        if DTYPES[t.precision] is not None:
            # The engine casts parameters to bf16/fp16 but leaves float buffers (BatchNorm
            # running statistics) behind, which the normalisation kernels refuse.
            for m in self.module.modules():
                for name, buf in m.named_buffers(recurse=False):
                    if buf is not None and buf.is_floating_point():
                        m._buffers[name] = buf.to(DTYPES[t.precision])

    def autocast(self):
        return contextlib.nullcontext()  # the engine holds bf16/fp16 weights itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> torch.Tensor:
        """Step the engine; returns the global grad norm before clipping."""
        # Without ZeRO and mixed precision, DeepSpeed keeps no norm for a plain torch optimizer:
        # the gradients, already averaged over ranks by the engine's backward, give it here.
        own = self.zero_stage == 0 and self.precision == "fp32"
        grads = [p.grad.detach().float() for p in self.module.parameters() if own and p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
        self.engine.step()  # clips, steps the optimizer and the scheduler, zeroes grads
        if not own:
            norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def shared_state(self) -> dict:
        return {"model": self.module.state_dict(), "scheduler": self.scheduler.state_dict()}

    def rank_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, shared: dict, rank: dict) -> None:
        self.module.load_state_dict(shared["model"])
        if hasattr(self.optimizer, "_load_legacy_checkpoint"):
            # ZeRO and bf16 wrappers take the list of all ranks' states and index their own;
            # this rank's file is all it needs. fp32 master weights come from the file, not
            # from the (possibly bf16) module copy, so resuming loses no precision.
            self.optimizer.load_state_dict([rank["optimizer"]] * self.world_size, load_optimizer_states=True,
                                           load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(rank["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])


def build_backend(model: nn.Module, optim: OptimConfig, steps_per_epoch: int, cfg: Config, env: DistEnv):
    """Optimizer, schedule and backend for one network."""
    optimizer = build_optimizer(model.named_parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    cls = DeepSpeedBackend if cfg.train.backend == "deepspeed" else DDPBackend
    return cls(model, optimizer, scheduler, cfg, env, optim.grad_clip)
