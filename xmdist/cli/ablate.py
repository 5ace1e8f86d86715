"""Run the mFSR ablation rows (and the VSE++ demo beside them) over several seeds, write a
markdown table of their test scores as mean ± std, and record every row in RESULTS.json.

    python launch/ablate.py --out runs/ablation --seeds 0 1 2          # VSE++ + every row, 2 processes
    python launch/ablate.py --out runs/ablation --rows base,all --seeds 0 --nproc 1 --set train.epochs=2

Each row is ``configs/mfsr_ablation_<row>.yaml`` (``vsepp``: ``configs/demo_vsepp_synthetic.yaml``,
the same data and budget) trained into ``OUT/<row>/seed<s>`` with ``train.seed=s``; finished runs
are read, not re-run. The table (R@1/5/10 both directions and rsum of each run's best validation
checkpoint on the test split) goes to ``OUT/ablation.md`` and the console; each finished run updates its row's
entry in ``--results`` (seeds merge into an entry of the same setting).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xmdist.cli import HelpFormatter
from xmdist.tools.tables import (REUSE_HELP, ROOT, ROWS, Row, load_recorded, mfsr_table, result_entry, run_rows,
                                 update_results_json)

ALL_ROWS = {"vsepp": "VSE++ (the demo)", **ROWS}


def table_row(name: str, overrides: list[str]) -> Row:
    if name == "vsepp":
        return Row("mfsr_ablation", "vsepp", "full", "demo_vsepp_synthetic", tuple(overrides),
                   label=ALL_ROWS[name], key="vsepp")
    return Row("mfsr_ablation", "mfsr", "full" if name == "all" else f"mfsr_ablation_{name}",
               f"mfsr_ablation_{name}", tuple(overrides), label=ALL_ROWS[name], key=name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {', '.join(ALL_ROWS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--results", default=str(ROOT / "RESULTS.json"), help="RESULTS.json to update, or 'none'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reuse-recorded", action="store_true", help=REUSE_HELP)
    args = p.parse_args(argv)
    names = args.rows.split(",")
    unknown = [r for r in names if r not in ALL_ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; known: {', '.join(ALL_ROWS)}")
    rows = [table_row(n, args.overrides) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    def record(row, res):  # after every run: a table cut short keeps what it measured
        if args.results != "none":
            update_results_json(Path(args.results), [result_entry(row, res, args.nproc)])
    results = run_rows(rows, args.seeds, out, args.nproc, on_result=record,
                       recorded=load_recorded(args.results, args.reuse_recorded))
    md = mfsr_table(rows, results)
    (out / "ablation.md").write_text(md)
    print(md)
    if args.results != "none":
        print(f"updated {args.results} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
