"""Train table rows with torchrun and build the markdown tables of their test scores (what
``launch/ablate.py`` and ``launch/hashing_table.py`` run).

    r = run_row("base", Path("runs/ablation"), nproc=2, overrides=["train.epochs=2"])
    print(mfsr_table({"base": r}))

A row is ``configs/<config>.yaml`` of the repository trained into ``OUT/<row>`` by
``python -m xmdist.cli.train``; a row whose run directory already has an eval.json is reused.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/), for the editable install
ROWS = {"base": "VSE++ base (L_se only)", "mosp": "+ mo & sp", "imgre": "+ mo & sp + img-re",
        "capre": "+ mo & sp + cap-re", "all": "all (mo, sp, img-re, cap-re)"}
ABLATION_NAMES = {"nogate": "SGRN without LRGR gate (G = A)", "now": "SGRN with W = 1 (no enhanced weight)",
                  "rho0": "SGRN with rho = 0 (no real-valued terms)", "eta0": "SGRN with eta = 0 (no coherence)"}
COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def run_row(row: str, out: Path, nproc: int, overrides: list[str], config: str | None = None) -> dict:
    """Train ``configs/<config>.yaml`` (default ``mfsr_ablation_<row>``) into ``OUT/<row>``
    unless it already has an eval.json; its eval.json plus ``wall_s``."""
    run_dir = out / row
    if not (run_dir / "eval.json").exists():
        sets = [a for o in overrides for a in ("--set", o)]
        config = config or f"mfsr_ablation_{row}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "xmdist.cli.train", "--config", str(ROOT / f"configs/{config}.yaml"),
               "--out", str(run_dir), *sets]
        t0 = time.time()
        print(f"== {row}: {config} {' '.join(overrides)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))})
        (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    result = json.loads((run_dir / "eval.json").read_text())
    wall = run_dir / "wall_s.txt"
    result["wall_s"] = float(wall.read_text()) if wall.exists() else float("nan")
    return result


def mfsr_table(results: dict[str, dict]) -> str:
    """Markdown table of mFSR rows (``ROWS`` names -> :func:`run_row` results): R@1/5/10 both
    directions, rsum, steps and wall time."""
    head = "| row | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | steps | wall |\n"
    head += "| --- | " + " | ".join(["---:"] * 9) + " |\n"
    lines = [f"| {ROWS[row]} | " + " | ".join(f"{r[c]:.1f}" for c in COLUMNS)
             + f" | {r['step']} | {r['wall_s'] / 60:.1f} min |" for row, r in results.items()]
    return head + "\n".join(lines) + "\n"


def hashing_table(rows: dict[str, tuple[str, dict]]) -> str:
    """Markdown table of hashing rows (row name -> (label, :func:`run_row` result)): bits,
    mAP@all and mAP@50 both directions, chance level, steps and wall time."""
    lines = ["| row | bits | mAP@all I→T | mAP@all T→I | mAP@50 I→T | mAP@50 T→I | chance | steps | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.values():
        lines.append(f"| {label} | {int(r['bits'])} | {r['map_i2t']:.4f} | {r['map_t2i']:.4f} | "
                     f"{r['map50_window_i2t']:.4f} | {r['map50_window_t2i']:.4f} | {r['chance']:.4f} | "
                     f"{r['step']} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"
