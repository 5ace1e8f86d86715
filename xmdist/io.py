"""Atomic file writes: a reader (another rank, a resumed run, a tool) never sees half a file.

Each writer writes ``PATH.tmp`` beside the target and renames it over ``PATH`` (``os.replace``
is atomic on POSIX file systems, shared ones included as far as they honour rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) into ``path`` through ``path.tmp``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (with a final newline when indented) into ``path``, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))
