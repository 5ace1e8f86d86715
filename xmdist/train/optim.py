"""Optimizer and learning-rate schedule from the ``optim`` config section."""
from __future__ import annotations

import bisect

import torch

from xmdist.config import OptimConfig


def param_groups(named_params, lr: float, lr_scale: dict[str, float]) -> list[dict]:
    """One group per ``lr_scale`` prefix (its parameters at ``lr * scale``), one for the rest."""
    groups: dict[str, list] = {prefix: [] for prefix in lr_scale}
    rest = []
    for name, p in named_params:
        if p.requires_grad:
            prefix = next((k for k in lr_scale if name == k or name.startswith(k + ".")), None)
            (groups[prefix] if prefix else rest).append(p)
    empty = [k for k, v in groups.items() if not v]
    if empty:
        raise ValueError(f"optim.lr_scale: no trainable parameter under {', '.join(empty)}")
    return [{"params": rest, "lr": lr}] * bool(rest) + [
        {"params": ps, "lr": lr * lr_scale[k]} for k, ps in groups.items()]


def build_optimizer(named_params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``named_params``: ``module.named_parameters()``; ``cfg.lr_scale`` sets per-module rates."""
    groups = param_groups(named_params, cfg.lr, cfg.lr_scale)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


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
