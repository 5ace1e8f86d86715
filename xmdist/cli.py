"""What every launcher in ``launch/`` shares: expected errors become a message and exit status 2."""
from __future__ import annotations

import gc
import os
import sys
from typing import Callable

from xmdist.dist import destroy_distributed


def first_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def run_launcher(body: Callable[[], int], errors: tuple[type[Exception], ...]) -> int:
    """Exit status of ``body()``. An expected error (bad configuration or input) prints
    ``error: ...`` once (first rank) and gives 2; the process group is destroyed in every case."""
    try:
        return body()
    except errors as e:
        if first_rank():
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        # Free what the run built (a DDP model holds the process group, often through reference
        # cycles) while the interpreter is whole: a gloo group torn down during interpreter exit
        # can abort the process (SIGABRT) after a successful run.
        gc.collect()
        destroy_distributed()
