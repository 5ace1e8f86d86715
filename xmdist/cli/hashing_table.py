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
import sys
from pathlib import Path

from xmdist.tools.tables import ABLATION_NAMES, hashing_table, run_row


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
            rows[name] = (method.upper(), run_row(name, out, a.nproc, sets, f"{method}_synthetic"))
    ablations = [] if a.ablations == "none" else a.ablations.split(",")
    for abl in ablations:
        name = f"sgrn64_{abl}"
        rows[name] = (ABLATION_NAMES[abl], run_row(name, out, a.nproc, a.overrides, f"sgrn_ablation_{abl}"))
    text = hashing_table(rows)
    (out / "hashing.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
