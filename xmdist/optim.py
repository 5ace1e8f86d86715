"""Optimizer and learning-rate schedule from the ``optim`` config section."""
from __future__ import annotations

import bisect

import torch

from xmdist.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class StepDecay:
    """lr factor at a step: linear warm-up, then x ``decay`` at each epoch in ``milestones``."""

    def __init__(self, cfg: OptimConfig, steps_per_epoch: int):
        self.warmup, self.decay = cfg.warmup_steps, cfg.lr_decay
        self.milestones = sorted(e * steps_per_epoch for e in cfg.lr_decay_epochs)

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return warm * self.decay ** bisect.bisect_right(self.milestones, step)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, StepDecay(cfg, steps_per_epoch))
