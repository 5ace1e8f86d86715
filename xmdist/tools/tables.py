"""Train table rows over several seeds with torchrun, tabulate mean +- std, and keep RESULTS.json
(what ``launch/ablate.py`` and ``launch/hashing_table.py`` run).

    rows = [Row("hashing", "sgrn", "full", "sgrn_synthetic", ["model.bits=16"], bits=16)]
    results = run_rows(rows, seeds=[0, 1, 2], out=Path("runs/hashing"), nproc=2)
    print(hashing_table(rows, results))
    update_results_json(Path("RESULTS.json"), [result_entry(r, results[r.key], 2) for r in rows])

A row is ``configs/<config>.yaml`` of the repository with its overrides; seed ``s`` of it trains
into ``OUT/<row key>/seed<s>`` with ``--set train.seed=s`` (the model's initialisation, the data
order and every seeded draw of the run: semantic expansion walks, SkipGram). The splits are those
of the shard set, the same for every seed. A run directory that already holds an eval.json is
finished and is read, not re-run, so an interrupted table resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from xmdist.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/), for the editable install
ROWS = {"base": "VSE++ base (L_se only)", "mosp": "+ mo & sp", "imgre": "+ mo & sp + img-re",
        "capre": "+ mo & sp + cap-re", "all": "all (mo, sp, img-re, cap-re)"}
ABLATION_NAMES = {"nogate": "SGRN without LRGR gate (G = A)", "now": "SGRN with W = 1 (no enhanced weight)",
                  "rho0": "SGRN with rho = 0 (no real-valued terms)", "eta0": "SGRN with eta = 0 (no coherence)",
                  "v1": "SGRN with the v1 graph targets (off-graph pairs -1)"}
CMFAH_ABLATIONS = {"ca": "CMFAH -ca (no co-attention)", "ia": "CMFAH -ia (no image attention)",
                   "ta": "CMFAH -ta (no text attention)", "walks": "CMFAH + random-walk words"}
COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
HASH_COLUMNS = ("map_i2t", "map_t2i", "map50_window_i2t", "map50_window_t2i")


@dataclass(frozen=True)
class Row:
    """One table row: ``configs/<config>.yaml`` with ``overrides``; ``key`` names its directory."""
    table: str  # "mfsr_ablation" | "hashing" | "cmfah_ablation" | "sgrn_ablation"
    method: str
    row: str  # "full" for a method with its default config, else the ablation config's name
    config: str
    overrides: tuple[str, ...] = ()
    bits: int | None = None
    label: str = ""
    key: str = field(default="")

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", self.row if self.bits is None else f"{self.method}{self.bits}"
                               if self.row == "full" else f"{self.row}{self.bits}")


def torchrun(config: Path, run_dir: Path, overrides: Sequence[str], nproc: int) -> None:
    """Train one run with ``python -m torch.distributed.run`` on this machine; raises on failure."""
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "xmdist.cli.train", "--config", str(config), "--out", str(run_dir), *sets]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))})


def config_digest(config: str) -> str:
    """A short hash of ``configs/<config>.yaml`` as read (its ``base`` chain merged in): an edit of
    the config file makes its rows another setting, though the path stays the same."""
    from xmdist.config import read_yaml

    tree = read_yaml(ROOT / "configs" / f"{config}.yaml")
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _same_config(entry: dict, path: str, digest: str | None) -> bool:
    """Entries written before digests were recorded compare by path alone."""
    return entry["config"] == path and (digest is None or entry.get("config_digest", digest) == digest)


def run_dir(out: Path, row: Row, seed: int) -> Path:
    return out / row.key / f"seed{seed}"


def recorded_result(entries: Sequence[dict], row: Row, seed: int, nproc: int) -> dict | None:
    """The result of ``(row, seed)`` as a RESULTS.json entry of the same row and setting (config,
    overrides, processes) holds it, in the form of a run's eval.json, or None."""
    for e in entries:
        if ((e["table"], e["method"], e["row"], e["bits"]) != (row.table, row.method, row.row, row.bits)
                or not _same_config(e, f"configs/{row.config}.yaml", config_digest(row.config))
                or e["overrides"] != list(row.overrides)
                or e["budget"]["processes"] != nproc or seed not in e["seeds"]):
            continue
        i = e["seeds"].index(seed)
        r = {k: v[i] for k, v in e["metrics"].items() if isinstance(v, list)}
        r.update({k: v for k, v in e["metrics"].items() if not isinstance(v, list)})
        commits = e.get("seed_commits", [e["commit"]] * len(e["seeds"]))
        return {**r, "step": e["budget"]["steps"], "bits": e["bits"], "recorded_wall_s": e["budget"]["wall_s_per_run"],
                "recorded_commit": commits[i]}
    return None


REUSE_HELP = ("count the runs --results records (same row, config, overrides and processes) as finished: a "
              "table continues on another machine, or after its run directories are gone")


def load_recorded(results: str, reuse: bool) -> list[dict]:
    """The entries of ``results`` (a RESULTS.json path, or 'none') when ``reuse``, else none."""
    path = Path(results)
    if not reuse or results == "none" or not path.exists():
        return []
    return json.loads(path.read_text())


def run_rows(rows: Sequence[Row], seeds: Sequence[int], out: Path, nproc: int,
             train: Callable[[Path, Path, Sequence[str], int], None] = torchrun,
             log: Callable[[str], None] = print,
             on_result: Callable[[Row, list[dict]], None] | None = None,
             recorded: Sequence[dict] = ()) -> dict[str, list[dict]]:
    """Every (row, seed), seed by seed (every row of the first seed, then of the next: a table cut
    short still has each row), with a progress line each; finished runs are read. ``on_result(row,
    its results so far)`` after each run (RESULTS.json is kept up to date while a table runs).
    ``recorded``: RESULTS.json entries whose seeds count as finished runs (:func:`recorded_result`):
    a table continues on another machine from what it recorded, without its run directories.
    Returns row key -> one eval.json (plus ``wall_s`` and ``seed``) per seed, in ``seeds`` order."""
    todo = [(r, s) for s in seeds for r in rows]
    results: dict[str, list[dict]] = {r.key: [] for r in rows}
    t_all = time.time()
    for i, (row, seed) in enumerate(todo, 1):
        d = run_dir(out, row, seed)
        old = None if (d / "eval.json").exists() else recorded_result(recorded, row, seed, nproc)
        if old is not None:
            log(f"[{i}/{len(todo)}] {row.key} seed {seed}: {row.config} {' '.join(row.overrides)} (recorded; "
                f"{(time.time() - t_all) / 60:.1f} min so far)")
            wall, sha = old.pop("recorded_wall_s"), old.pop("recorded_commit")
            results[row.key].append({**old, "wall_s": float(wall), "seed": seed, "commit": sha})
            if on_result is not None:
                on_result(row, results[row.key])
            continue
        state = "done" if (d / "eval.json").exists() else "train"
        log(f"[{i}/{len(todo)}] {row.key} seed {seed}: {row.config} {' '.join(row.overrides)} ({state}; "
            f"{(time.time() - t_all) / 60:.1f} min so far)")
        if state == "train":
            t0 = time.time()
            d.mkdir(parents=True, exist_ok=True)
            (d / "commit.txt").write_text(commit() + "\n")  # the code the run starts with
            train(ROOT / "configs" / f"{row.config}.yaml", d, [*row.overrides, f"train.seed={seed}"], nproc)
            if not (d / "eval.json").exists():
                raise RuntimeError(f"{d}: training ended without an eval.json")
            (d / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
        r = json.loads((d / "eval.json").read_text())
        wall = d / "wall_s.txt"
        r["wall_s"] = float(wall.read_text()) if wall.exists() else float("nan")
        r["seed"] = seed
        sha = d / "commit.txt"
        r["commit"] = sha.read_text().strip() if sha.exists() else None
        results[row.key].append(r)
        if on_result is not None:
            on_result(row, results[row.key])
    return results


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def fmt(values: Sequence[float], digits: int) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _seeds_note(results: Sequence[dict]) -> str:
    return ",".join(str(r["seed"]) for r in results)


def mfsr_table(rows: Sequence[Row], results: dict[str, list[dict]]) -> str:
    """Markdown table of caption-retrieval rows: R@1/5/10 both directions and rsum as mean ± std
    over the seeds, steps, seeds and wall time per run."""
    head = "| row | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | steps | seeds | wall/run |\n"
    head += "| --- | " + " | ".join(["---:"] * 10) + " |\n"
    lines = []
    for row in rows:
        rs = results[row.key]
        wall = sum(r["wall_s"] for r in rs) / len(rs)
        lines.append(f"| {row.label or row.row} | " + " | ".join(fmt([r[c] for r in rs], 1) for c in COLUMNS)
                     + f" | {rs[0]['step']} | {_seeds_note(rs)} | {wall / 60:.1f} min |")
    return head + "\n".join(lines) + "\n"


def hashing_table(rows: Sequence[Row], results: dict[str, list[dict]]) -> str:
    """Markdown table of hashing rows: bits, mAP@all and mAP@50 both directions as mean ± std
    over the seeds, the chance level, steps, seeds and wall time per run."""
    lines = ["| row | bits | mAP@all I→T | mAP@all T→I | mAP@50 I→T | mAP@50 T→I | chance | steps | seeds | wall/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rs = results[row.key]
        wall = sum(r["wall_s"] for r in rs) / len(rs)
        lines.append(f"| {row.label or row.method.upper()} | {int(rs[0]['bits'])} | "
                     + " | ".join(fmt([r[c] for r in rs], 4) for c in HASH_COLUMNS)
                     + f" | {rs[0]['chance']:.4f} | {rs[0]['step']} | {_seeds_note(rs)} | {wall / 60:.1f} min |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- RESULTS.json
def commit() -> str:
    """The repository's short commit, ``+dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "xmdist", "configs"], cwd=ROOT).returncode
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def result_entry(row: Row, results: Sequence[dict], nproc: int, sha: str | None = None) -> dict:
    """One RESULTS.json entry: every numeric metric of the eval.json as a list over the seeds
    (``chance`` and ``bits`` are properties of the data and the config, one value); ``commit`` the
    code each run started with (``seed_commits`` when they differ), or ``sha`` for all."""
    skip = {"step", "epoch", "bits", "chance", "wall_s", "seed", "commit"}
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in skip]
    metrics: dict = {k: [r[k] for r in results] for k in keys}
    if "chance" in results[0]:
        metrics["chance"] = results[0]["chance"]
    entry = {"table": row.table, "method": row.method, "row": row.row, "bits": row.bits,
            "seeds": [r["seed"] for r in results], "metrics": metrics,
            "config": f"configs/{row.config}.yaml", "config_digest": config_digest(row.config),
            "overrides": list(row.overrides),
            "budget": {"steps": results[0].get("step"), "processes": nproc,
                       "wall_s_per_run": round(sum(r["wall_s"] for r in results) / len(results))}}
    commits = [sha or r.get("commit") or commit() for r in results]  # each run's, taken when it started
    entry["commit"] = commits[-1]
    if len(set(commits)) > 1:
        entry["seed_commits"] = commits
    return entry


def _ident(e: dict) -> tuple:
    return e["table"], e["method"], e["row"], e["bits"]


def _same_setting(a: dict, b: dict) -> bool:
    return _same_config(a, b["config"], b.get("config_digest")) and \
        (a["overrides"], a["budget"]["steps"], a["budget"]["processes"]) == \
        (b["overrides"], b["budget"]["steps"], b["budget"]["processes"])


def merge_entry(old: dict, new: dict) -> dict:
    """``new`` with the seeds of ``old`` that it lacks, when both are the same setting (config,
    overrides, steps, processes); otherwise ``new`` alone. A seed in both takes ``new``'s values;
    ``seed_commits`` gives the commit each seed was run at, ``commit`` the newest."""
    if not _same_setting(old, new):
        return new
    old_commits = old.get("seed_commits", [old["commit"]] * len(old["seeds"]))
    per_seed = {s: ({k: v[i] for k, v in old["metrics"].items() if isinstance(v, list)}, old_commits[i])
                for i, s in enumerate(old["seeds"])}
    new_commits = new.get("seed_commits", [new["commit"]] * len(new["seeds"]))
    per_seed.update({s: ({k: v[i] for k, v in new["metrics"].items() if isinstance(v, list)}, new_commits[i])
                     for i, s in enumerate(new["seeds"])})
    seeds = sorted(per_seed)
    keys = [k for k, v in new["metrics"].items() if isinstance(v, list) and all(k in per_seed[s][0] for s in seeds)]
    metrics = {k: [per_seed[s][0][k] for s in seeds] for k in keys}
    metrics.update({k: v for k, v in new["metrics"].items() if not isinstance(v, list)})
    return {**new, "seeds": seeds, "metrics": metrics, "seed_commits": [per_seed[s][1] for s in seeds]}


def update_results_json(path: Path, entries: Sequence[dict]) -> None:
    """Merge ``entries`` into ``path`` (a JSON list, created when absent): an entry of the same
    (table, method, row, bits) and setting gains the new seeds (:func:`merge_entry`), one of
    another setting is replaced; every other entry is kept in its place. Written atomically."""
    current = json.loads(path.read_text()) if path.exists() else []
    index = {_ident(e): i for i, e in enumerate(current)}
    for e in entries:
        i = index.get(_ident(e))
        if i is None:
            index[_ident(e)] = len(current)
            current.append(e)
        else:
            current[i] = merge_entry(current[i], e)
    write_json_atomic(path, current)


def entries_table(entries: Sequence[dict]) -> str:
    """Markdown table of RESULTS.json entries of one kind (caption retrieval: R@K and rsum; hashing:
    mAP@all and mAP@50), mean ± std over each entry's seeds: what RESULTS.md shows."""
    if not entries:
        return ""
    hashing = "map_i2t" in entries[0]["metrics"]
    cols = HASH_COLUMNS if hashing else COLUMNS
    names = (["mAP@all I→T", "mAP@all T→I", "mAP@50 I→T", "mAP@50 T→I", "chance"] if hashing
             else ["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"])
    lines = ["| method | row | bits | " + " | ".join(names) + " | seeds | steps |",
             "|---|---|---|" + "---:|" * (len(names) + 2)]
    for e in entries:
        m = e["metrics"]
        vals = [fmt(m[c], 4 if hashing else 1) if c in m else "" for c in cols]
        if hashing:
            vals.append(f"{m['chance']:.4f}")
        lines.append(f"| {e['method'].upper()} | {e['row']} | {e['bits'] if e['bits'] is not None else ''} | "
                     + " | ".join(vals) + f" | {','.join(map(str, e['seeds']))} | {e['budget']['steps']} |")
    return "\n".join(lines) + "\n"
