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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"base": "VSE++ base (L_se only)", "mosp": "+ mo & sp", "imgre": "+ mo & sp + img-re",
        "capre": "+ mo & sp + cap-re", "all": "all (mo, sp, img-re, cap-re)"}
COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def run_row(row: str, out: Path, nproc: int, overrides: list[str], config: str | None = None) -> dict:
    """Train ``configs/<config>.yaml`` (default ``mfsr_ablation_<row>``) into ``OUT/<row>``
    unless it already has an eval.json; its eval.json plus ``wall_s``."""
    run_dir = out / row
    if not (run_dir / "eval.json").exists():
        sets = [a for o in overrides for a in ("--set", o)]
        config = config or f"mfsr_ablation_{row}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "launch/train.py"), "--config", str(ROOT / f"configs/{config}.yaml"),
               "--out", str(run_dir), *sets]
        t0 = time.time()
        print(f"== {row}: {config} {' '.join(overrides)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))})
        (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    result = json.loads((run_dir / "eval.json").read_text())
    wall = run_dir / "wall_s.txt"
    result["wall_s"] = float(wall.read_text()) if wall.exists() else float("nan")
    return result


def table(results: dict[str, dict]) -> str:
    head = "| row | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | steps | wall |\n"
    head += "| --- | " + " | ".join(["---:"] * 9) + " |\n"
    lines = [f"| {ROWS[row]} | " + " | ".join(f"{r[c]:.1f}" for c in COLUMNS)
             + f" | {r['step']} | {r['wall_s'] / 60:.1f} min |" for row, r in results.items()]
    return head + "\n".join(lines) + "\n"


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
    md = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
