"""The method registry: ``@register("name")`` on a :class:`~xmdist.methods.base.Method` subclass.

Method modules in ``xmdist/methods/`` register themselves when ``xmdist.methods`` is imported
(it imports every module of the package), so adding a method is adding a file.
"""
from __future__ import annotations

from typing import Callable

from xmdist.config import ConfigError

_METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__module__}, {cls.__module__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def get_method(name: str) -> type:
    """The registered class of ``name``; ConfigError naming the known methods otherwise."""
    if name not in _METHODS:
        raise ConfigError(f"method: unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def known_methods() -> list[str]:
    return sorted(_METHODS)
