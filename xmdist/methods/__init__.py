"""Training methods: one module per method family, each registering its classes.

Importing this package imports every module in it, so a new method is a new file here with a
``@register("name")`` class (the interface: :mod:`xmdist.methods.base`). ``load_config`` and
``build_config`` resolve a run configuration against the registered methods' schemas.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from xmdist import config as _config
from xmdist.methods.base import Method, Network, Phase
from xmdist.methods.registry import get_method, known_methods, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_config(raw: dict, overrides: list[str] = ()) -> _config.Config:
    """:func:`xmdist.config.build_config` against the registered methods."""
    return _config.build_config(raw, overrides, get_method)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> _config.Config:
    """:func:`xmdist.config.load_config` against the registered methods."""
    return _config.load_config(path, overrides, get_method)


__all__ = ["Method", "Network", "Phase", "build_config", "get_method", "known_methods", "load_config", "register"]
