"""Run the mFSR ablation rows and write a markdown table of their test scores.

    python launch/ablate.py --out runs/ablation                      # every row, 2 processes each
    python launch/ablate.py --out runs/ablation --rows base,all --nproc 1 --set train.epochs=2

Each row is ``configs/mfsr_ablation_<row>.yaml`` trained into ``OUT/<row>`` with torchrun (rows
already finished are reused: their eval.json is read, not recomputed). The table (R@1/5/10
both directions and rsum of each row's best validation checkpoint on the test split) goes to
``OUT/ablation.md`` and the console.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xmdist.tools.tables import ROWS, mfsr_table, run_row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    out = Path(args.out)
    results = {row: run_row(row, out, args.nproc, args.overrides) for row in rows}
    md = mfsr_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
