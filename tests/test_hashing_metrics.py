"""Tests for xmdist.metrics.hashing against naive per-query loops (the scoring definitions, literally).

Few bits (K = 4 or 8) so Hamming distances collide a lot and the index tie-break matters; sparse
labels so some queries have no relevant item at all.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xmdist.metrics import hamming_ap, hamming_map, pr_curve, precision_at_k, to_codes
from xmdist.metrics import hashing

TOL = 1e-12


# ----------------------------------------------------------------------------- references
def ref_order(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Hamming 0.5 * (K - q . b) ascending, ties by database index (stable sort)."""
    hamm = 0.5 * (db.shape[1] - db.astype(np.float64) @ q.astype(np.float64))
    return np.argsort(hamm, kind="stable")


def ref_ap(qB, rB, qL, rL, topk=None, mode="window") -> np.ndarray:
    aps = []
    for i in range(len(qB)):
        gnd = (rL.astype(np.float64) @ qL[i].astype(np.float64) > 0).astype(np.float64)
        gnd = gnd[ref_order(qB[i], rB)]
        if topk is not None and mode == "window":  # DJSRH / DCMH calc_map_k: the first topk only
            gnd = gnd[:topk]
        tsum = int(gnd.sum())
        if tsum == 0:
            aps.append(0.0)
            continue
        # mAP@all and window: every relevant item in gnd; AGAH / DGCPN: the first min(topk, R)
        total = tsum if topk is None or mode == "window" else min(topk, tsum)
        count = np.arange(1, total + 1, dtype=np.float64)
        tindex = np.flatnonzero(gnd)[:total] + 1.0
        aps.append(float(np.mean(count / tindex)))
    return np.asarray(aps)


def ref_pk(qB, rB, qL, rL, ks) -> np.ndarray:
    p = np.zeros(len(ks))
    for i in range(len(qB)):
        gnd = (rL.astype(np.float64) @ qL[i].astype(np.float64) > 0)[ref_order(qB[i], rB)]
        for j, k in enumerate(ks):
            total = min(k, len(rB))
            p[j] += gnd[:total].sum() / total
    return p / len(qB)


def ref_pr(qB, rB, qL, rL) -> tuple[np.ndarray, np.ndarray]:
    K = rB.shape[1]
    precs, recs = [[] for _ in range(K + 1)], [[] for _ in range(K + 1)]
    for i in range(len(qB)):
        gnd = rL.astype(np.float64) @ qL[i].astype(np.float64) > 0
        hamm = 0.5 * (K - rB.astype(np.float64) @ qB[i].astype(np.float64))
        for r in range(K + 1):
            ret = hamm <= r
            if ret.sum() > 0:
                precs[r].append((gnd & ret).sum() / ret.sum())
            if gnd.sum() > 0:
                recs[r].append((gnd & ret).sum() / gnd.sum())
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return np.array([mean(v) for v in precs]), np.array([mean(v) for v in recs])


def make_data(seed: int, n_q: int = 30, n_db: int = 120, bits: int = 4, n_labels: int = 4, p: float = 0.2):
    rng = np.random.default_rng(seed)
    qB = rng.choice([-1.0, 1.0], size=(n_q, bits)).astype(np.float32)
    rB = rng.choice([-1.0, 1.0], size=(n_db, bits)).astype(np.float32)
    qL = (rng.random((n_q, n_labels)) < p).astype(np.float32)
    rL = (rng.random((n_db, n_labels)) < p).astype(np.float32)
    qL[0] = 0  # guaranteed query without any relevant item
    qL[1] = 1  # and one relevant to every labelled item
    return qB, rB, qL, rL


def real_queries(seed: int, n_q: int, bits: int) -> np.ndarray:
    """Real-valued queries on a dyadic grid: exact dot products, many score ties."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], size=(n_q, bits))


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def assert_close_nan(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b)), (a, b)
    close(a[~np.isnan(a)], b[~np.isnan(b)], tol)


# ----------------------------------------------------------------------------- hand-worked
def hand_example():
    """K=4, one query [1,1,1,1] (label 0), five database items:

    idx  code            dist  labels  relevant
    0    [-1,-1, 1, 1]   2     {1}     no
    1    [ 1, 1, 1, 1]   0     {0,1}   yes
    2    [ 1, 1,-1,-1]   2     {0}     yes
    3    [ 1,-1, 1, 1]   1     {1}     no
    4    [-1,-1,-1, 1]   3     {0}     yes

    Ranking (ties by index): 1, 3, 0, 2, 4 -> relevance 1, 0, 0, 1, 1 (R = 3, relevant at
    positions 1, 4, 5). Breaking the dist-2 tie the other way (2 before 0) would give 1, 0, 1, 0, 1.
    """
    q = np.array([[1, 1, 1, 1]], dtype=np.float32)
    db = np.array([[-1, -1, 1, 1], [1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, 1], [-1, -1, -1, 1]],
                  dtype=np.float32)
    ql = np.array([[1, 0]], dtype=np.float32)
    dl = np.array([[0, 1], [1, 1], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    return q, db, ql, dl


def test_hand_worked_map_conventions():
    data = hand_example()
    # mAP@all: (1/1 + 2/4 + 3/5) / 3
    assert hamming_map(*data) == pytest.approx(0.7, abs=TOL)
    # k=2, window (DJSRH/DCMH): positions 1..2 hold one relevant item at 1 -> (1/1) / 1
    assert hamming_map(*data, topk=2, mode="window") == pytest.approx(1.0, abs=TOL)
    # k=2, first_relevant (AGAH/DGCPN): first min(2, 3) = 2 relevant at 1, 4 -> (1/1 + 2/4) / 2
    assert hamming_map(*data, topk=2, mode="first_relevant") == pytest.approx(0.75, abs=TOL)
    # k=4, window: relevant at 1, 4 inside the window -> (1/1 + 2/4) / 2
    assert hamming_map(*data, topk=4, mode="window") == pytest.approx(0.75, abs=TOL)
    # k=3: window = (1/1)/1, first_relevant = all three = mAP@all
    assert hamming_map(*data, topk=3, mode="window") == pytest.approx(1.0, abs=TOL)
    assert hamming_map(*data, topk=3, mode="first_relevant") == pytest.approx(0.7, abs=TOL)
    # k=1 both: the first item is relevant
    assert hamming_map(*data, topk=1, mode="window") == pytest.approx(1.0, abs=TOL)
    assert hamming_map(*data, topk=1, mode="first_relevant") == pytest.approx(1.0, abs=TOL)
    # k > n_db: both are mAP@all
    for mode in hashing.MODES:
        assert hamming_map(*data, topk=50, mode=mode) == pytest.approx(0.7, abs=TOL)


def test_hand_worked_precision_and_pr():
    data = hand_example()
    close(precision_at_k(*data, [1, 2, 3, 4, 5, 10]), [1, 1 / 2, 1 / 3, 2 / 4, 3 / 5, 3 / 5])
    p, r = pr_curve(*data)
    # radius 0: {1}; 1: {1,3}; 2: {1,3,0,2}; 3 and 4: everything
    close(p, [1, 1 / 2, 2 / 4, 3 / 5, 3 / 5])
    close(r, [1 / 3, 1 / 3, 2 / 3, 1, 1])


def test_hand_worked_asymmetric():
    """Real-valued query, higher score q . b is closer: scores of the five items below."""
    q, db, ql, dl = hand_example()
    qr = np.array([[0.5, 2.0, 0.0, -1.0]])  # scores: -3.5, 1.5, 3.5, -2.5, -3.5
    # ranking: 2 (rel), 1 (rel), 3 (irr), 0 (irr; ties 4 by index), 4 (rel) -> 1, 1, 0, 0, 1
    assert hamming_map(qr, db, ql, dl) == pytest.approx((1 + 1 + 3 / 5) / 3, abs=TOL)
    assert hamming_map(qr, db, ql, dl, topk=4, mode="window") == pytest.approx(1.0, abs=TOL)
    # radius r retrieves score >= 4 - 2r: r=0: none, r=1: {2}, r=2 and 3: {2, 1}, r=4: all
    p, r = pr_curve(qr, db, ql, dl)
    assert_close_nan(p, [np.nan, 1, 1, 1, 3 / 5])
    assert_close_nan(r, [0, 1 / 3, 2 / 3, 2 / 3, 1])


# ----------------------------------------------------------------------------- random vs reference
@pytest.mark.parametrize("seed,bits", [(0, 4), (1, 4), (2, 8), (3, 8)])
def test_map_all_matches_reference(seed, bits):
    data = make_data(seed, bits=bits)
    ref = ref_ap(*data)
    assert ref[0] == 0.0
    got = hamming_ap(*data)
    close(got, ref)
    assert hamming_map(*data) == pytest.approx(float(np.mean(ref)), abs=TOL)


@pytest.mark.parametrize("mode", hashing.MODES)
@pytest.mark.parametrize("seed,bits", [(4, 4), (5, 8)])
def test_map_at_k_matches_reference(mode, seed, bits):
    data = make_data(seed, bits=bits)
    n_db = data[1].shape[0]
    for k in (1, 2, 5, 17, n_db - 1, n_db, n_db + 13):
        ref = ref_ap(*data, topk=k, mode=mode)
        np.testing.assert_allclose(hamming_ap(*data, topk=k, mode=mode), ref, rtol=0, atol=TOL, err_msg=f"k={k}")
        assert hamming_map(*data, topk=k, mode=mode) == pytest.approx(float(np.mean(ref)), abs=TOL)
    # the two conventions really differ on this data, and agree with mAP@all for k >= n_db
    assert hamming_map(*data, topk=5, mode="window") != pytest.approx(
        hamming_map(*data, topk=5, mode="first_relevant"), abs=1e-6)
    assert hamming_map(*data, topk=n_db + 13, mode=mode) == pytest.approx(hamming_map(*data), abs=TOL)


@pytest.mark.parametrize("seed,bits", [(6, 4), (7, 8)])
def test_precision_at_k_matches_reference(seed, bits):
    data = make_data(seed, bits=bits)
    n_db = data[1].shape[0]
    ks = [1, 3, 10, 50, n_db, n_db + 7]
    close(precision_at_k(*data, ks), ref_pk(*data, ks))
    assert precision_at_k(*data, 3).shape == (1,)


@pytest.mark.parametrize("seed,bits", [(8, 4), (9, 8)])
def test_pr_curve_matches_reference(seed, bits):
    data = make_data(seed, bits=bits)
    p, r = pr_curve(*data)
    rp, rr = ref_pr(*data)
    assert p.shape == r.shape == (bits + 1,)
    assert_close_nan(p, rp)
    assert_close_nan(r, rr)
    assert r[-1] == pytest.approx(1.0)  # radius K retrieves everything


def test_pr_curve_radius_with_nothing_retrieved_is_nan():
    q = np.ones((2, 4), dtype=np.float32)
    db = -np.ones((3, 4), dtype=np.float32)  # every distance is 4
    ql, dl = np.array([[1.0], [0.0]]), np.ones((3, 1))
    p, r = pr_curve(q, db, ql, dl)
    assert_close_nan(p, [np.nan] * 4 + [0.5])  # query 1 has no relevant item: precision 0 counts
    assert_close_nan(r, [0, 0, 0, 0, 1])       # recall only over query 0
    p, r = pr_curve(q, db, np.zeros((2, 1)), dl)  # no query has a relevant item
    assert_close_nan(p, [np.nan] * 4 + [0.0])
    assert np.isnan(r).all()


@pytest.mark.parametrize("seed,bits", [(10, 4), (11, 8)])
def test_asymmetric_real_valued_queries(seed, bits):
    qB, rB, qL, rL = make_data(seed, bits=bits)
    qr = real_queries(seed, len(qB), bits)
    n_db = len(rB)
    close(hamming_ap(qr, rB, qL, rL), ref_ap(qr, rB, qL, rL))
    for mode in hashing.MODES:
        for k in (1, 7, n_db + 1):
            close(hamming_ap(qr, rB, qL, rL, topk=k, mode=mode), ref_ap(qr, rB, qL, rL, topk=k, mode=mode))
    ks = [1, 5, n_db]
    close(precision_at_k(qr, rB, qL, rL, ks), ref_pk(qr, rB, qL, rL, ks))
    p, r = pr_curve(qr, rB, qL, rL)
    rp, rr = ref_pr(qr, rB, qL, rL)
    assert_close_nan(p, rp)
    assert_close_nan(r, rr)
    # scaling a +-1 query leaves the ranking (descending score) unchanged: same as the binary path
    close(hamming_ap(3.0 * qB, rB, qL, rL), hamming_ap(qB, rB, qL, rL))
    # the backends agree on the real-valued path too
    close(hamming_ap(qr, rB, qL, rL, backend="torch"), hamming_ap(qr, rB, qL, rL))


def test_numpy_and_torch_inputs_agree():
    qB, rB, qL, rL = make_data(12, bits=8)
    ref = hamming_ap(qB, rB, qL, rL)
    variants = [
        (torch.from_numpy(qB), torch.from_numpy(rB), torch.from_numpy(qL), torch.from_numpy(rL)),
        (torch.from_numpy(qB).to(torch.int8), torch.from_numpy(rB).double(),
         torch.from_numpy(qL).bool(), torch.from_numpy(rL).long()),
        (qB, torch.from_numpy(rB), qL.astype(bool), torch.from_numpy(rL)),  # mixed
        (qB.astype(np.int64), rB.astype(np.float64), qL.astype(np.uint8), rL),
    ]
    for v in variants:
        np.testing.assert_array_equal(hamming_ap(*v), ref)
        np.testing.assert_array_equal(hamming_ap(*v, topk=9, mode="first_relevant"),
                                      hamming_ap(qB, rB, qL, rL, topk=9, mode="first_relevant"))
    t = variants[0]
    np.testing.assert_array_equal(precision_at_k(*t, [1, 10]), precision_at_k(qB, rB, qL, rL, [1, 10]))
    for a, b in zip(pr_curve(*t), pr_curve(qB, rB, qL, rL)):
        assert_close_nan(a, b, tol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_chunking_and_backend_invariance(bits):
    data = make_data(13, n_q=23, bits=bits)
    base = hamming_ap(*data, chunk_size=1000)
    for cs in (1, 2, 5):
        np.testing.assert_array_equal(hamming_ap(*data, chunk_size=cs), base)
        for mode in hashing.MODES:
            np.testing.assert_array_equal(hamming_ap(*data, topk=6, mode=mode, chunk_size=cs),
                                          hamming_ap(*data, topk=6, mode=mode, chunk_size=1000))
        close(precision_at_k(*data, [1, 4, 40], chunk_size=cs), precision_at_k(*data, [1, 4, 40]))
        for a, b in zip(pr_curve(*data, chunk_size=cs), pr_curve(*data)):
            assert_close_nan(a, b)
    # torch code path (the one CUDA uses) on CPU: same values
    for cs in (1, 7, None):
        close(hamming_ap(*data, chunk_size=cs, backend="torch"), base)
        for mode in hashing.MODES:
            for k in (1, 6, 500):
                close(hamming_ap(*data, topk=k, mode=mode, chunk_size=cs, backend="torch"),
                                           ref_ap(*data, topk=k, mode=mode))
        close(precision_at_k(*data, [1, 4, 40], chunk_size=cs, backend="torch"), precision_at_k(*data, [1, 4, 40]))


def test_default_chunk_follows_database_size(monkeypatch):
    data = make_data(14, n_q=40, n_db=100, bits=8)
    ref = ref_ap(*data)
    monkeypatch.setattr(hashing, "CHUNK_ELEMENTS", 250)  # -> 2 query rows per chunk
    inp = hashing._prepare(*data)
    assert hashing._chunk_rows(inp, None) == 2
    close(hamming_ap(*data), ref)
    monkeypatch.setattr(hashing, "CHUNK_ELEMENTS", 1)    # fewer elements than one row: 1 row
    assert hashing._chunk_rows(inp, None) == 1
    close(hamming_ap(*data), ref)
    # CPU work items of 3 rows inside chunks of 11 rows: several items per chunk, thread pool
    monkeypatch.setattr(hashing, "CHUNK_ELEMENTS", 1100)
    monkeypatch.setattr(hashing, "SUB_ELEMENTS", 300)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    close(hamming_ap(*data), ref)
    close(hamming_ap(*data, topk=7, mode="first_relevant"), ref_ap(*data, topk=7, mode="first_relevant"))
    close(precision_at_k(*data, [1, 5, 100]), ref_pk(*data, [1, 5, 100]))


@pytest.mark.parametrize("n_labels", [3, 12, 31, 33, 64, 70])
def test_label_counts(n_labels):
    """C <= 64: CPU relevance from label bit masks (1, 2, 4 or 8 bytes); C > 64: label matmul."""
    data = make_data(19, n_q=12, n_db=80, bits=8, n_labels=n_labels, p=2.0 / n_labels)
    assert (hashing._label_masks(hashing._prepare(*data)) is None) == (n_labels > 64)
    close(hamming_ap(*data), ref_ap(*data))
    close(hamming_ap(*data, topk=5), ref_ap(*data, topk=5))
    close(precision_at_k(*data, [1, 9]), ref_pk(*data, [1, 9]))


def test_long_codes_use_wider_distances():
    """K > 255 leaves uint8: int16 distances, still exact."""
    data = make_data(15, n_q=6, n_db=50, bits=300, n_labels=3, p=0.3)
    close(hamming_ap(*data), ref_ap(*data))
    close(hamming_ap(*data, backend="torch"), ref_ap(*data))
    assert hashing._dist_dtype(255) == torch.uint8 and hashing._dist_dtype(300) == torch.int16


def test_query_without_relevant_items_counts_zero():
    qB, rB, qL, rL = make_data(16, bits=8)
    aps = hamming_ap(qB, rB, qL, rL)
    assert aps[0] == 0.0
    assert hamming_map(qB, rB, qL, rL) == pytest.approx(aps.sum() / len(aps), abs=TOL)
    assert hamming_map(qB[:1], rB, qL[:1], rL) == 0.0
    assert hamming_map(qB[:1], rB, qL[:1], rL, topk=3, mode="first_relevant") == 0.0


def test_to_codes():
    h = np.array([[-2.0, 0.0, 3.0, -0.0, -1e-9]])
    np.testing.assert_array_equal(to_codes(h), [[-1, 1, 1, 1, -1]])
    assert to_codes(h).dtype == np.float32
    t = to_codes(torch.tensor(h))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), [[-1, 1, 1, 1, -1]])
    np.testing.assert_array_equal(to_codes(np.array([-3, 0, 2])), [-1, 1, 1])
    with pytest.raises(ValueError):
        to_codes(np.array([np.nan, 1.0]))
    with pytest.raises(TypeError):
        to_codes(np.array([True, False]))
    with pytest.raises(TypeError):
        to_codes([1.0, -1.0])


def test_errors():
    qB, rB, qL, rL = make_data(17, n_q=5, n_db=20, bits=4)
    bad = [
        (qB[:, :3], rB, qL, rL),                  # K differs
        (qB, rB, qL[:4], rL),                     # query labels rows
        (qB, rB, qL, rL[:19]),                    # database labels rows
        (qB, rB, qL[:, :3], rL),                  # label counts differ
        (qB[0], rB, qL, rL),                      # 1-D codes
        (qB[:0], rB, qL[:0], rL),                 # no queries
        (qB, (rB > 0).astype(np.float32), qL, rL),  # {0,1} bits in the database
        (qB, rB > 0, qL, rL),                     # bool codes
        (qB > 0, rB, qL, rL),
        (qB, rB, 2 * qL, rL),                     # labels not multi-hot
        (np.where(qB > 0, np.inf, -1.0), rB, qL, rL),  # non-finite real-valued query
    ]
    for args in bad:
        with pytest.raises(ValueError):
            hamming_map(*args)
    for args in bad[:4]:
        with pytest.raises(ValueError):
            precision_at_k(*args, [1])
        with pytest.raises(ValueError):
            pr_curve(*args)
    data = (qB, rB, qL, rL)
    for kw in ({"topk": 0}, {"topk": -3}, {"topk": True}, {"topk": 2.5}, {"mode": "all"},
               {"chunk_size": 0}, {"backend": "numpy"}):
        with pytest.raises(ValueError):
            hamming_map(*data, **kw)
    for ks in ([], [0], [1, -1]):
        with pytest.raises(ValueError):
            precision_at_k(*data, ks)
    with pytest.raises(TypeError):
        hamming_map(qB.tolist(), rB, qL, rL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data = make_data(18, n_q=40, n_db=300, bits=8)
    cuda = [torch.from_numpy(x).cuda() for x in data]
    close(hamming_ap(*cuda), ref_ap(*data))
    for mode in hashing.MODES:
        close(hamming_ap(*cuda, topk=9, mode=mode), ref_ap(*data, topk=9, mode=mode))
    close(precision_at_k(*cuda, [1, 10]), ref_pk(*data, [1, 10]))
    qr = torch.from_numpy(real_queries(18, 40, 8)).cuda()
    close(hamming_ap(qr, *cuda[1:]), ref_ap(qr.cpu().numpy(), *data[1:]))
    for a, b in zip(pr_curve(*cuda), ref_pr(*data)):
        assert_close_nan(a, b)
