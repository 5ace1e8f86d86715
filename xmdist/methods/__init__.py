"""Registry of training methods, and the interface the trainer talks to.

A method builds named networks, each optimised by its own optimizer (and, under DeepSpeed, its
own engine); ``"model"`` is the retrieval model, whose ``encode_image``/``encode_text`` the
evaluator calls. One training step is ``out = method.forward(nets, batch)`` once, then each
``Phase`` in order: its loss is computed from ``out``, back-propagated and its network stepped
(a GAN's discriminators first, then the model). Losses are this rank's share of the
global-batch objective. The trainer, the data pipeline and the backends never name a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from xmdist.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class Network:
    module: nn.Module
    optim: OptimConfig


@dataclass(frozen=True)
class Phase:
    network: str  # stepped after this phase's backward
    loss: Callable  # (nets, batch, out, epoch) -> {"loss": share to optimise, other terms...}


class SingleModel:
    """Base of methods that train one network, ``"model"``, with one loss phase ``losses``."""

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.losses)]

    def forward(self, nets: dict, batch: dict) -> dict:
        return nets["model"].model(batch)


_METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def get_method(name: str) -> type:
    if name not in _METHODS:
        raise ConfigError(f"method: unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


from xmdist.methods import hashing, mfsr, vsepp  # noqa: E402,F401  (they register themselves)
