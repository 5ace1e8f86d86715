"""Evaluation protocols (``common`` R@K, ``hamming`` mAP/P@K/PR), one module each, registered
by name; importing this package imports every module in it (a new protocol is a new file)."""
from __future__ import annotations

import importlib
import pkgutil

from xmdist.eval.protocol import EvalRequest, Protocol, get_protocol, known_protocols, register_protocol

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EvalRequest", "Protocol", "get_protocol", "known_protocols", "register_protocol"]
