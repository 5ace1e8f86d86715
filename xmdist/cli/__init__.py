"""Command-line entry points (``launch/*.py`` and the ``xmdist-*`` console scripts call their
``main``), and what they share: expected errors become a message and exit status 2."""
from __future__ import annotations

import argparse
import gc
import sys
from typing import Callable

from xmdist.dist import DistEnv, destroy_distributed


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (its examples keep their line continuations) and each
    option's default shown, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS, [])
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def run_launcher(body: Callable[[], int], errors: tuple[type[Exception], ...]) -> int:
    """Exit status of ``body()``. An expected error (bad configuration or input) prints
    ``error: ...`` once (first rank) and gives 2; the process group is destroyed in every case."""
    try:
        return body()
    except errors as e:
        if DistEnv.from_environ(device="cpu").is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        # Free what the run built (a DDP model holds the process group, often through reference
        # cycles) while the interpreter is whole: a gloo group torn down during interpreter exit
        # can abort the process (SIGABRT) after a successful run.
        gc.collect()
        destroy_distributed()
