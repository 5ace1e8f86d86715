"""Pieces several methods share: frozen networks, the share convention, discriminator optimisers."""
from __future__ import annotations

import torch
from torch.func import functional_call

from xmdist.config import OptimConfig
from xmdist.dist import DistEnv


def frozen(module: torch.nn.Module):
    """``module`` as a function of its inputs only: gradients reach the inputs, not its weights
    (a discriminator inside a generator's loss)."""
    weights = {k: v.detach() for k, v in module.named_parameters()}
    weights.update(dict(module.named_buffers()))
    return lambda *args: functional_call(module, weights, args)


def share(local_mean: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """A rank-local mean as this rank's share of the mean over ranks (equal local batches), the
    form every phase loss takes (see :mod:`xmdist.methods.base`)."""
    return local_mean / env.world_size


def discriminator_optim(lr: float = 2e-4) -> OptimConfig:
    """DCGAN's Adam for discriminators: betas (0.5, 0.999), no clipping, no decay."""
    return OptimConfig(name="adam", lr=lr, betas=[0.5, 0.999], grad_clip=0.0, lr_decay_epochs=[])
