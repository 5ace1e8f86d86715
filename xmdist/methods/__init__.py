"""Registry of training methods.

A method says how to build its model from the config, which losses it computes from the
model's output dict, and how it encodes each modality for evaluation. The trainer, the data
pipeline and the backends only ever talk to this interface.
"""
from __future__ import annotations

from typing import Callable

from xmdist.config import ConfigError

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


from xmdist.methods import vsepp  # noqa: E402,F401  (registers itself)
