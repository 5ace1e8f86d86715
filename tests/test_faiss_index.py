"""faiss indexes in xmdist.tools.index: flat faiss against the exact numpy search, version-2 files,
version-1 indexes, IVF / HNSW recall on clustered data, the numpy fallback without faiss, and
launch/search.py's --check-recall on an index alone (no run).

The trained-run end to end (--queries JSONL) is in tests/test_tools.py, which has the run fixture.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from xmdist.cli import search as search_cli
from xmdist.tools import index as index_mod
from xmdist.tools.index import (IndexFormatError, load_index, pack_codes, recall_at_k, resolve_type, save_index,
                                search, search_batch, search_rows)

faiss = pytest.importorskip("faiss")


def grid(rng, shape, step=1 / 16) -> np.ndarray:
    """Values on a 2^-4 grid in [-2, 2]: exact in float16, and every dot product of two such
    vectors (d <= 1024) is exact in float32 whatever the summation order, so faiss and numpy must
    give bit-identical scores."""
    return (rng.integers(-32, 33, size=shape) * step).astype(np.float32)


def clustered(rng, n, d, centers=40, noise=0.35) -> np.ndarray:
    """A Gaussian mixture (unit-norm rows): neighbours exist, so approximate recall means something."""
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def fresh_faiss_state(monkeypatch):
    """Every test looks faiss up (and prints the missing-faiss note) afresh."""
    monkeypatch.setattr(index_mod, "_FAISS", [])
    monkeypatch.setattr(index_mod, "_NOTED", [])


def caps(n):
    return [[f"c{i}"] for i in range(n)]


def test_flat_faiss_equals_numpy_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    vec, q = grid(rng, (3000, 48)), grid(rng, (30, 48))
    ids = rng.permutation(100_000)[:3000]
    save_index(tmp_path / "e", ids, vec, caps(3000), index_type="flat")
    index = load_index(tmp_path / "e")
    assert type(index.faiss).__name__ == "IndexFlatIP" and index.index_type == "flat"
    rows_f, sc_f = search_batch(index, q, 10, backend="faiss")
    rows_n, sc_n = search_batch(index, q, 10, backend="numpy")
    ref = vec @ q.T  # exact (grid)
    top = np.sort(ref, axis=0)[::-1][:10].T
    np.testing.assert_array_equal(sc_f, top)
    np.testing.assert_array_equal(sc_n, top)
    # ties exist on the grid: compare ids where the 10 best scores are all distinct
    distinct = np.array([len(set(np.sort(ref[:, j])[::-1][:11])) == 11 for j in range(30)])
    assert distinct.sum() >= 10
    np.testing.assert_array_equal(rows_f[distinct], rows_n[distinct])
    ids_one, sc_one = search(index, q[0], 10)  # one query: the same
    np.testing.assert_array_equal(sc_one, top[0])
    assert set(ids_one[sc_one > top[0, -1]]) == set(ids[np.flatnonzero(ref[:, 0] > top[0, -1])])


@pytest.mark.parametrize("bits", [16, 37, 64])
def test_flat_faiss_equals_numpy_codes(tmp_path, bits):
    rng = np.random.default_rng(bits)
    real = rng.standard_normal((2000, bits)).astype(np.float32)
    save_index(tmp_path / "c", np.arange(2000), real, caps(2000), "codes", index_type="flat")
    index = load_index(tmp_path / "c", kind="codes")
    assert type(index.faiss).__name__ == "IndexBinaryFlat"
    q = rng.standard_normal((25, bits)).astype(np.float32)
    signs = np.where(real >= 0, 1.0, -1.0)
    naive = ((bits - signs @ np.where(q >= 0, 1.0, -1.0).T) / 2).T  # Hamming, (Q, N)
    rows_f, d_f = search_batch(index, q, 20, mode="hamming", backend="faiss")
    rows_n, d_n = search_batch(index, q, 20, mode="hamming", backend="numpy")
    best = np.sort(naive, axis=1)[:, :20]
    np.testing.assert_array_equal(d_f, best)  # Hamming ties abound: the scores agree exactly,
    np.testing.assert_array_equal(d_n, best)
    for j in range(25):  # and every row strictly inside the k-th distance is in both
        inner = set(np.flatnonzero(naive[j] < best[j, -1]))
        assert inner <= set(rows_f[j]) and inner <= set(rows_n[j])
        assert (naive[j, rows_f[j]] == d_f[j]).all()
    # asymmetric: exact and real-valued (no ties), batched against one query at a time
    rows_a, d_a = search_batch(index, q, 20, mode="asymmetric")
    asym = ((bits - signs @ q.T) / 2).T
    np.testing.assert_array_equal(rows_a, np.argsort(asym, axis=1, kind="stable")[:, :20])
    np.testing.assert_allclose(d_a, np.sort(asym, axis=1)[:, :20], rtol=1e-5, atol=1e-4)
    for j in (0, 7):
        r1, d1 = search_rows(index, q[j], 20, mode="asymmetric")
        np.testing.assert_array_equal(r1, rows_a[j])


def test_v2_round_trip_and_faiss_file(tmp_path):
    rng = np.random.default_rng(1)
    vec = clustered(rng, 4000, 32)
    save_index(tmp_path / "ivf", np.arange(4000) * 2, vec, caps(4000), index_type="ivf",
               params={"nlist": 32, "nprobe": 6}, meta={"items": "images"})
    info = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert info["version"] == 2 and info["search"] == {"type": "ivf", "params": {"nlist": 32, "nprobe": 6},
                                                        "file": "faiss.index"}
    index = load_index(tmp_path / "ivf")
    assert type(index.faiss).__name__ == "IndexIVFFlat" and index.faiss.nlist == 32
    assert faiss.extract_index_ivf(index.faiss).nprobe == 6 and index.captions == caps(4000)
    np.testing.assert_array_equal(index.data, vec.astype(np.float16))
    ids, _ = search(index, vec[5], 1)
    assert ids[0] == 10  # a row's own vector is its nearest neighbour
    index_mod.set_search_params(index, nprobe=32)  # all lists: exact
    rows, sc = search_batch(index, vec[:50], 10)
    _, exact = search_batch(index, vec[:50], 10, exact=True)
    assert recall_at_k(rows, sc, exact, "dot") == 1.0
    (tmp_path / "ivf" / "faiss.index").write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match="faiss file faiss.index is damaged"):
        load_index(tmp_path / "ivf")


def test_version_1_index_still_loads_and_searches(tmp_path):
    rng = np.random.default_rng(2)
    vec, q = grid(rng, (500, 16)), grid(rng, (16,))
    d = tmp_path / "v1"
    d.mkdir()
    np.save(d / "ids.npy", np.arange(500, dtype=np.int64))
    np.save(d / "vectors.npy", vec.astype(np.float16))
    (d / "captions.json").write_text(json.dumps(caps(500)))
    (d / "index.json").write_text(json.dumps({"format": "xmdist-index", "version": 1, "kind": "embedding",
                                              "count": 500, "dim": 16, "items": "images"}))
    index = load_index(d)
    assert index.index_type == "flat" and index.faiss is None  # built at the first search
    ids, sc = search(index, q, 5)
    assert type(index.faiss).__name__ == "IndexFlatIP"
    np.testing.assert_array_equal(sc, np.sort(vec @ q)[::-1][:5])
    np.testing.assert_array_equal(vec[ids] @ q, sc)
    info = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**info, "version": 3}))
    with pytest.raises(IndexFormatError, match="index version 3; this xmdist reads versions 1-2"):
        load_index(d)


@pytest.mark.parametrize("kind,index_type,params,bound", [
    ("embedding", "ivf", {"nlist": 64, "nprobe": 8}, 0.9),
    ("embedding", "hnsw", {"m": 16, "ef_search": 64}, 0.9),
    ("codes", "ivf", {"nlist": 64, "nprobe": 8}, 0.9),
    ("codes", "hnsw", {"m": 16, "ef_search": 64}, 0.9),
])
def test_approximate_recall_on_clustered_data(tmp_path, kind, index_type, params, bound):
    rng = np.random.default_rng(3)
    data = clustered(rng, 6000, 64, centers=60, noise=0.2)
    # queries near indexed rows (not the rows themselves)
    queries = data[rng.choice(6000, 100, replace=False)] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    save_index(tmp_path / "a", np.arange(6000), data, caps(6000), kind, index_type=index_type, params=params)
    index = load_index(tmp_path / "a")
    assert index.index_type == index_type
    mode = "hamming" if kind == "codes" else "auto"
    metric = "hamming" if kind == "codes" else "dot"
    rows, sc = search_batch(index, queries, 10, mode)
    _, exact = search_batch(index, queries, 10, mode, exact=True)
    assert (rows >= 0).all()
    recall = recall_at_k(rows, sc, exact, metric)
    assert recall >= bound, recall
    # a crippled search must score lower: the measure can fail
    index_mod.set_search_params(index, nprobe=1, ef_search=1)
    low = recall_at_k(*search_batch(index, queries, 10, mode), exact, metric)
    assert low < recall


def test_recall_counts_ties_and_misses():
    exact = np.array([[1.0, 0.5, 0.5]])
    assert recall_at_k(np.array([[0, 2, 1]]), np.array([[1.0, 0.5, 0.5]]), exact, "dot") == 1.0
    assert recall_at_k(np.array([[0, 2, -1]]), np.array([[1.0, 0.5, 0.0]]), exact, "dot") == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[4, 9]]), np.array([[3, 3]]), np.array([[2, 3]]), "hamming") == 1.0
    assert recall_at_k(np.array([[4, 9]]), np.array([[3, 4]]), np.array([[2, 3]]), "hamming") == 0.5


def test_auto_type_and_parameters():
    assert resolve_type("embedding", 99_999) == ("flat", {})
    t, p = resolve_type("embedding", 1_000_000)
    assert t == "ivf" and p == {"nlist": 1024, "nprobe": 64}
    t, p = resolve_type("codes", 10_000_000)
    assert t == "ivf" and p == {"nlist": 2048, "nprobe": 256}  # sqrt -> 4096, capped by 100,000 / 39 rows per list
    assert resolve_type("codes", 10_000_000, train_sample=400_000)[1]["nlist"] == 4096
    assert resolve_type("codes", 999_999) == ("flat", {})
    assert resolve_type("codes", 50, "hnsw", m=8) == ("hnsw", {"m": 8, "ef_construction": 80, "ef_search": 128})
    with pytest.raises(IndexFormatError, match="index type must be one of auto, flat, ivf, hnsw"):
        resolve_type("codes", 50, "lsh")
    with pytest.raises(IndexFormatError, match="--nlist 100 is more than the 50 rows"):
        resolve_type("codes", 50, "ivf", nlist=100)
    with pytest.raises(IndexFormatError, match="--nlist 64 needs at least 64 training rows: raise --train-sample"):
        resolve_type("codes", 5000, "ivf", nlist=64, train_sample=10)


def test_without_faiss_numpy_fallback(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(5)
    vec, q = grid(rng, (800, 24)), grid(rng, (5, 24))
    save_index(tmp_path / "with", np.arange(800), vec, caps(800), index_type="flat")
    save_index(tmp_path / "ivf", np.arange(800), vec, caps(800), index_type="ivf", params={"nlist": 8})
    want = search_batch(load_index(tmp_path / "with"), q, 7)
    monkeypatch.setattr(index_mod, "_load_faiss", lambda: None)  # as if faiss were not installed
    index_mod._FAISS.clear()
    capsys.readouterr()
    index = load_index(tmp_path / "with")  # the faiss file is there but cannot be read: numpy
    got = search_batch(index, q, 7)
    assert index.faiss is None
    np.testing.assert_array_equal(got[1], want[1])
    err = capsys.readouterr().err
    assert err.count("note: faiss is not installed: exact numpy search") == 1 and 'pip install -e ".[search]"' in err
    search_batch(index, q, 7)
    assert capsys.readouterr().err == ""  # once per process
    exact = search_batch(load_index(tmp_path / "ivf"), q, 7)  # an approximate index: searched exactly
    np.testing.assert_array_equal(exact[1], want[1])
    save_index(tmp_path / "nofaiss", np.arange(800), vec, caps(800))  # flat, no faiss file
    assert json.loads((tmp_path / "nofaiss" / "index.json").read_text())["search"]["file"] is None
    np.testing.assert_array_equal(search_batch(load_index(tmp_path / "nofaiss"), q, 7)[1], want[1])
    for index_type in ("ivf", "hnsw"):
        with pytest.raises(IndexFormatError, match=r'--index-type .* needs faiss, which is not installed: '
                                                   r'pip install -e "\.\[search\]"'):
            save_index(tmp_path / index_type, np.arange(800), vec, caps(800), index_type=index_type)
    with pytest.raises(IndexFormatError, match="backend='faiss' needs faiss"):
        search_batch(index, q, 7, backend="faiss")


def test_check_recall_on_an_index_alone(tmp_path, capsys):
    rng = np.random.default_rng(6)
    data = clustered(rng, 5000, 32, centers=50, noise=0.2)
    save_index(tmp_path / "ivf", np.arange(5000), data, caps(5000), index_type="ivf", params={"nlist": 64, "nprobe": 8})
    assert search_cli.main(["--index", str(tmp_path / "ivf"), "--check-recall", "200", "-k", "10"]) == 0
    out = capsys.readouterr().out
    assert "recall@10 of ivf (nlist=64, nprobe=8) against exact search, 200 queries (rows of the index): " in out
    recall = float(out.split("rows of the index): ")[1].split()[0])
    assert 0.9 <= recall <= 1.0
    assert search_cli.main(["--index", str(tmp_path / "ivf"), "--check-recall", "200", "-k", "10",
                            "--nprobe", "1"]) == 0
    low = float(capsys.readouterr().out.split("rows of the index): ")[1].split()[0])
    assert low < recall
    assert search_cli.main(["--index", str(tmp_path / "ivf"), "--check-recall", "0"]) == 2
    assert "--check-recall must be >= 1" in capsys.readouterr().err
    assert search_cli.main(["--index", str(tmp_path / "ivf"), "--text", "a cat"]) == 2  # a query needs the run
    assert "--run-dir is needed" in capsys.readouterr().err


@pytest.mark.slow
def test_search_benchmark_runs_small(tmp_path):
    """launch/bench.py search at toy sizes: every row there, flat equal to numpy, recalls in [0, 1]."""
    from xmdist.cli import bench

    out = tmp_path / "search.json"
    assert bench.main(["search", "--codes", "2000", "--embeddings", "1000", "--dim", "16", "--clusters", "20",
                       "--queries", "20", "--single", "5", "--numpy-queries", "5", "--asym-queries", "5",
                       "--nprobe", "4", "128", "--ef-search", "16", "--hnsw-rows", "500", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for kind in ("codes", "embeddings"):
        rows = result[kind]["results"]
        names = [r["index"] for r in rows]
        assert names[:3] == ["numpy (exact, before faiss)", "xmdist flat (faiss)", "faiss flat, called directly"]
        flat = rows[1]
        assert flat["max_score_diff_vs_numpy"] <= (0 if kind == "codes" else 1e-5)
        ivf = [r for r in rows if r["index"] == "xmdist ivf"]
        assert [r["params"]["nprobe"] for r in ivf] == [4]  # 128 > nlist: skipped
        hnsw = [r for r in rows if r["index"] == "xmdist hnsw"]
        assert len(hnsw) == 1 and hnsw[0]["rows"] == 500
        assert all(0.0 <= r["recall"] <= 1.0 and r["ms_batched"] > 0 for r in rows)
    assert "asymmetric (K - q.b)/2, numpy exact" in [r["index"] for r in result["codes"]["results"]]
