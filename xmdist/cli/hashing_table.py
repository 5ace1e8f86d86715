"""Train the hashing methods at several code lengths over several seeds (and their ablations),
tabulate test mAP as mean ± std, and record every row in RESULTS.json.

    python launch/hashing_table.py --out runs/hashing --seeds 0 1 2          # DJSRH, SGRN, CMFAH + ablations
    python launch/hashing_table.py --out runs/hashing --methods sgrn --bits 16,64 --ablations none \\
        --seeds 0 --set train.epochs=2 --results none

Rows: ``configs/{method}_synthetic.yaml`` at each ``--bits``; then the 64-bit ablations,
``configs/sgrn_ablation_<name>.yaml`` (``nogate`` G = A, ``now`` W = 1, ``rho0`` no real-valued
terms, ``eta0`` no neighbour coherence, ``v1`` the v1 graph targets) and
``configs/cmfah_ablation_<name>.yaml`` (``ca``, ``ia``, ``ta``; ``walks`` random-walk words), for
the methods asked for. Seed ``s`` of a row trains into ``OUT/<row>/seed<s>`` with
``train.seed=s``; finished runs are read, not re-run (an interrupted table resumes). The table
(mAP@all and mAP@50 of the test queries against the training set as database, beside the chance
level: the fraction of relevant pairs, the mAP of a random ranking) goes to ``OUT/hashing.md`` and
the console; each finished run updates its row's entry in
``--results`` (seeds merge into an entry of the same setting).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xmdist.cli import HelpFormatter
from xmdist.tools.tables import (REUSE_HELP, ABLATION_NAMES, CMFAH_ABLATIONS, ROOT, Row, entries_table, hashing_table,
                                 load_recorded, result_entry, run_rows, update_results_json)

ABLATIONS = {"sgrn": ("sgrn_ablation", ABLATION_NAMES, "nogate,now,rho0,eta0,v1"),
             "cmfah": ("cmfah_ablation", CMFAH_ABLATIONS, "ca,ia,ta")}


def table_rows(methods: list[str], bits: list[int], ablations: str, overrides: list[str],
               table: str = "hashing") -> list[Row]:
    rows = [Row(table, m, "full", f"{m}_synthetic", (f"model.bits={b}", *overrides), bits=b)
            for m in methods for b in bits]
    for m in methods:
        if m not in ABLATIONS or ablations == "none":
            continue
        base, names, default = ABLATIONS[m]
        # another feature set's ablations go to a table of their own: hashing_X -> sgrn_ablation_X
        abl_table = base + (table[len("hashing"):] if table.startswith("hashing") else f"_{table}")
        wanted = default if ablations == "default" else ablations
        for name in wanted.split(","):
            if name not in names:
                continue  # another method's ablation
            rows.append(Row(abl_table, m, f"{m}_ablation_{name}", f"{m}_ablation_{name}", tuple(overrides),
                            bits=64, label=names[name], key=f"{m}64_{name}"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", help="directory of the runs and hashing.md (required unless --report)")
    p.add_argument("--bits", default="16,32,64,128")
    p.add_argument("--methods", default="djsrh,sgrn,cmfah")
    p.add_argument("--ablations", default="default",
                   help="comma-separated names (" + ", ".join([*ABLATION_NAMES, *CMFAH_ABLATIONS])
                        + "), 'default' (every one but walks) or 'none'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--results", default=str(ROOT / "RESULTS.json"), help="RESULTS.json to update, or 'none'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every row's train.py")
    p.add_argument("--reuse-recorded", action="store_true", help=REUSE_HELP)
    p.add_argument("--table", default="hashing",
                   help="RESULTS.json table of the code-length rows (another feature set: another table; "
                        "its ablations go to <method>_ablation + the suffix after 'hashing')")
    p.add_argument("--data", default="", help="a note on the data, stored in each entry (e.g. which features)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: print the hashing tables of --results (mean ± std per row)")
    a = p.parse_args(argv)
    if a.report:
        entries = json.loads(Path(a.results).read_text())
        tables = dict.fromkeys(e["table"] for e in entries if e["bits"] is not None)  # hashing rows have bits
        for table in tables:  # every table of hashing rows, in the order RESULTS.json holds them
            rows = [e for e in entries if e["table"] == table]
            if rows:
                print(f"\n{table}\n\n{entries_table(rows)}")
        return 0
    if not a.out:
        p.error("--out is required (or --report to print --results)")
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in ("djsrh", "sgrn", "cmfah")]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: djsrh, sgrn, cmfah")
    known = {*ABLATION_NAMES, *CMFAH_ABLATIONS}
    if a.ablations not in ("default", "none") and not set(a.ablations.split(",")) <= known:
        p.error(f"unknown ablation(s) {sorted(set(a.ablations.split(',')) - known)}; known: {', '.join(sorted(known))}")
    rows = table_rows(methods, [int(b) for b in a.bits.split(",")], a.ablations, a.overrides, a.table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    def record(row, res):  # after every run: a table cut short keeps what it measured
        if a.results != "none":
            entry = result_entry(row, res, a.nproc)
            update_results_json(Path(a.results), [{**entry, "data": a.data} if a.data else entry])
    results = run_rows(rows, a.seeds, out, a.nproc, on_result=record,
                       recorded=load_recorded(a.results, a.reuse_recorded))
    text = hashing_table(rows, results)
    (out / "hashing.md").write_text(text)
    print(text)
    if a.results != "none":
        print(f"updated {a.results} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
