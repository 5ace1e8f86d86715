"""The multi-seed table runner: resumable rows, mean ± std, RESULTS.json entries (no training:
a fake trainer writes each run's eval.json)."""
import json
import math

import pytest

from xmdist.cli.ablate import table_row
from xmdist.cli.hashing_table import table_rows
from xmdist.tools.tables import (Row, config_digest, entries_table, hashing_table, mean_std, mfsr_table,
                                 result_entry, run_rows, update_results_json)


def _fake_train(calls):
    def train(config, run_dir, overrides, nproc):
        calls.append((config.name, run_dir, tuple(overrides)))
        seed = int(overrides[-1].split("=")[1])
        bits = next((int(o.split("=")[1]) for o in overrides if o.startswith("model.bits=")), 64)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "eval.json").write_text(json.dumps(
            {"method": "sgrn", "bits": bits, "step": 10, "epoch": 1, "chance": 0.5,
             "map_i2t": 0.6 + 0.01 * seed, "map_t2i": 0.7 - 0.01 * seed,
             "map50_window_i2t": 0.8, "map50_window_t2i": 0.9}))
    return train


def test_rows_run_per_seed_resume_and_aggregate(tmp_path):
    rows = table_rows(["sgrn"], [16, 64], "rho0", ["train.epochs=1"])
    assert [r.key for r in rows] == ["sgrn16", "sgrn64", "sgrn64_rho0"]
    assert rows[2].row == "sgrn_ablation_rho0" and rows[2].bits == 64 and rows[0].row == "full"
    other = table_rows(["djsrh", "sgrn"], [32], "now", [], table="hashing_other_features")
    assert [(r.table, r.key) for r in other] == [("hashing_other_features", "djsrh32"),
                                                 ("hashing_other_features", "sgrn32"),
                                                 ("sgrn_ablation_other_features", "sgrn64_now")]
    assert {r.table for r in rows} == {"hashing", "sgrn_ablation"}
    calls, lines = [], []
    results = run_rows(rows, [0, 1, 2], tmp_path, 2, train=_fake_train(calls), log=lines.append)
    assert len(calls) == 9 and len(lines) == 9 and lines[0].startswith("[1/9] sgrn16 seed 0")
    assert calls[0][1] == tmp_path / "sgrn16" / "seed0" and calls[1][1] == tmp_path / "sgrn64" / "seed0"
    assert calls[0][2] == ("model.bits=16", "train.epochs=1", "train.seed=0")
    assert [r["seed"] for r in results["sgrn64"]] == [0, 1, 2]
    assert all((tmp_path / "sgrn64" / f"seed{s}" / "commit.txt").is_file() for s in (0, 1, 2))
    # finished runs are read, never re-run; a missing one is trained
    calls.clear()
    run_rows(rows, [0, 1, 2, 3], tmp_path, 2, train=_fake_train(calls), log=lines.append)
    assert [c[1].name for c in calls] == ["seed3"] * 3
    assert lines[-1].startswith("[12/12] sgrn64_rho0 seed 3")
    table = hashing_table(rows, results)
    assert "0.6100 ± 0.0100" in table and "0.6900 ± 0.0100" in table and "| 0,1,2 |" in table


def test_result_entry_and_results_json_merge(tmp_path):
    row = Row("hashing", "sgrn", "full", "sgrn_synthetic", ("model.bits=16",), bits=16)
    res = [{"map_i2t": 0.5 + s / 10, "map_t2i": 0.4, "chance": 0.3, "bits": 16, "step": 7, "epoch": 1,
            "wall_s": 60.0, "seed": s, "method": "sgrn"} for s in (0, 1)]
    e = result_entry(row, res, 2, sha="abc1234")
    assert e == {"table": "hashing", "method": "sgrn", "row": "full", "bits": 16, "seeds": [0, 1],
                 "metrics": {"map_i2t": [0.5, 0.6], "map_t2i": [0.4, 0.4], "chance": 0.3},
                 "config": "configs/sgrn_synthetic.yaml", "config_digest": config_digest("sgrn_synthetic"),
                 "overrides": ["model.bits=16"],
                 "budget": {"steps": 7, "processes": 2, "wall_s_per_run": 60}, "commit": "abc1234"}
    path = tmp_path / "RESULTS.json"
    other = {**e, "method": "djsrh"}
    update_results_json(path, [other, e])
    # seed 2 of the same setting, run at another commit: merged in; seed 1 again: replaced
    later = result_entry(row, [{**res[1], "map_i2t": 0.9}, {**res[0], "seed": 2, "map_i2t": 0.7}], 2, sha="def5678")
    update_results_json(path, [later])
    entries = json.loads(path.read_text())
    assert len(entries) == 2 and entries[0]["method"] == "djsrh"
    merged = entries[1]
    assert merged["seeds"] == [0, 1, 2] and merged["metrics"]["map_i2t"] == [0.5, 0.9, 0.7]
    assert merged["seed_commits"] == ["abc1234", "def5678", "def5678"] and merged["commit"] == "def5678"
    # another budget is another setting: the entry is replaced, not mixed
    longer = {**later, "budget": {**later["budget"], "steps": 70}}
    update_results_json(path, [longer])
    assert json.loads(path.read_text())[1]["seeds"] == [1, 2]
    table = entries_table(json.loads(path.read_text()))
    assert "| SGRN | full | 16 | 0.8000 ± 0.1414 |" in table and "| DJSRH | full | 16 | 0.5500 ± 0.0707 |" in table
    # the same path after an edit of the config file is another setting too; an entry written
    # before digests were recorded merges by path
    first = {k: v[:1] if isinstance(v, list) else v for k, v in longer["metrics"].items()}
    edited = {**longer, "seeds": [3], "metrics": first}
    update_results_json(path, [{**edited, "config_digest": "0" * 12}])
    assert json.loads(path.read_text())[1]["seeds"] == [3]
    legacy = {k: v for k, v in longer.items() if k != "config_digest"}
    update_results_json(path, [legacy])
    update_results_json(path, [edited])
    assert json.loads(path.read_text())[1]["seeds"] == [1, 2, 3]


def test_mean_std_and_mfsr_rows():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert math.isclose(mean_std([0.5, 0.5])[1], 0.0)
    vsepp, base, full = table_row("vsepp", []), table_row("base", []), table_row("all", [])
    assert (vsepp.method, vsepp.config, vsepp.row) == ("vsepp", "demo_vsepp_synthetic", "full")
    assert (base.method, base.row, full.row) == ("mfsr", "mfsr_ablation_base", "full")
    cols = {c: 10.0 for c in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    res = {"vsepp": [{**cols, "rsum": 60.0 + s, "step": 5, "wall_s": 30.0, "seed": s} for s in (0, 2)]}
    assert "61.0 ± 1.4" in mfsr_table([vsepp], res)


def test_every_table_config_exists():
    from xmdist.tools.tables import ROOT
    rows = table_rows(["djsrh", "sgrn", "cmfah"], [16, 32, 64, 128], "default", [])
    rows += table_rows(["cmfah"], [64], "walks", [])[1:]  # the walks ablation only
    rows += [table_row(n, []) for n in ("vsepp", "base", "mosp", "imgre", "capre", "all")]
    missing = [r.config for r in rows if not (ROOT / "configs" / f"{r.config}.yaml").is_file()]
    assert not missing
    assert len({r.key for r in rows}) == len(rows)


def test_progress_bar_logs_lines_without_a_terminal(capsys):
    from xmdist import progress

    assert list(progress.bar(range(3), 3, "writing", "sample", every_s=0)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "writing: 2/3 sample (" in err and "writing: 3 sample in " in err and "\r" not in err


def test_recorded_seeds_count_as_finished_runs(tmp_path):
    """A table continued without its run directories: seeds its RESULTS.json entry holds for the same
    setting are read from it, the others (and rows of another setting) are trained."""
    rows = table_rows(["sgrn"], [16, 64], "none", [])
    path = tmp_path / "RESULTS.json"
    first = tmp_path / "first"
    run_rows(rows, [0, 1], first, 2, train=_fake_train([]),
             on_result=lambda row, res: update_results_json(path, [result_entry(row, res, 2, sha="abc")]),
             log=lambda _: None)
    recorded = json.loads(path.read_text())
    calls, lines = [], []
    again = run_rows(rows, [0, 1, 2], tmp_path / "elsewhere", 2, train=_fake_train(calls), log=lines.append,
                     recorded=recorded)
    assert [(c[1].parent.name, c[1].name) for c in calls] == [("sgrn16", "seed2"), ("sgrn64", "seed2")]
    assert "(recorded;" in lines[0] and "(train;" in lines[-1]
    assert [r["seed"] for r in again["sgrn16"]] == [0, 1, 2]
    assert again["sgrn16"][1]["map_i2t"] == 0.61 and again["sgrn16"][1]["commit"] == "abc"
    table = hashing_table(rows, again)
    assert "0.6100 ± 0.0100" in table
    # another process count is another setting: nothing is reused
    calls.clear()
    run_rows(rows[:1], [0], tmp_path / "four", 4, train=_fake_train(calls), log=lambda _: None, recorded=recorded)
    assert len(calls) == 1
