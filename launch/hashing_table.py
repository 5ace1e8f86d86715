"""Train DJSRH and SGRN at several code lengths (and SGRN's ablations) and tabulate test mAP.

    python launch/hashing_table.py --out runs/hashing                  # 2 x 4 bit rows + 4 ablations
    python launch/hashing_table.py --out runs/hashing --bits 16,64 --ablations none --set train.epochs=2

Rows: ``configs/{djsrh,sgrn}_synthetic.yaml`` at each ``--bits``, then the SGRN ablations
``configs/sgrn_ablation_<row>.yaml`` (64 bits, one component off: ``nogate`` G = A, ``now``
W = 1, ``rho0`` no real-valued terms, ``eta0`` no neighbour coherence). Each row trains into ``OUT/<row>`` with torchrun (finished
rows are reused: their eval.json is read). The table (mAP@all and mAP@50 of the test queries
against the training set as database, beside the chance level: the fraction of relevant pairs,
which is the mAP of a random ranking) goes to ``OUT/hashing.md`` and the console.
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
ABLATION_NAMES = {"nogate": "SGRN without LRGR gate (G = A)", "now": "SGRN with W = 1 (no enhanced weight)",
                  "rho0": "SGRN with rho = 0 (no real-valued terms)", "eta0": "SGRN with eta = 0 (no coherence)"}


def run_row(name: str, config: str, sets: list[str], out: Path, nproc: int) -> dict:
    run_dir = out / name
    if not (run_dir / "eval.json").exists():
        args = [a for o in sets for a in ("--set", o)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "launch/train.py"), "--config", str(ROOT / f"configs/{config}.yaml"),
               "--out", str(run_dir), *args]
        t0 = time.time()
        print(f"== {name}: {' '.join(sets)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    result = json.loads((run_dir / "eval.json").read_text())
    wall = run_dir / "wall_s.txt"
    result["wall_s"] = float(wall.read_text()) if wall.exists() else float("nan")
    return result


def table(rows: dict[str, tuple[str, dict]]) -> str:
    lines = ["| row | bits | mAP@all I→T | mAP@all T→I | mAP@50 I→T | mAP@50 T→I | chance | steps | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.values():
        lines.append(f"| {label} | {int(r['bits'])} | {r['map_i2t']:.4f} | {r['map_t2i']:.4f} | "
                     f"{r['map50_window_i2t']:.4f} | {r['map50_window_t2i']:.4f} | {r['chance']:.4f} | "
                     f"{r['step']} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs and hashing.md")
    p.add_argument("--bits", default="16,32,64,128")
    p.add_argument("--methods", default="djsrh,sgrn")
    p.add_argument("--ablations", default=",".join(ABLATION_NAMES), help="comma-separated, or 'none'")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every row's train.py")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, tuple[str, dict]] = {}
    for method in a.methods.split(","):
        for bits in map(int, a.bits.split(",")):
            name = f"{method}{bits}"
            sets = [f"model.bits={bits}", *a.overrides]
            rows[name] = (method.upper(), run_row(name, f"{method}_synthetic", sets, out, a.nproc))
    ablations = [] if a.ablations == "none" else a.ablations.split(",")
    for abl in ablations:
        name = f"sgrn64_{abl}"
        rows[name] = (ABLATION_NAMES[abl], run_row(name, f"sgrn_ablation_{abl}", a.overrides, out, a.nproc))
    text = table(rows)
    (out / "hashing.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
