"""Tests for xmdist.metrics against a naive per-query numpy reference (VSE++ conventions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xmdist.metrics import i2t_t2i_ranks, recall_at_k, summarize_ranks

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
        "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum"]


# ----------------------------------------------------------------------------- reference
def ref_ranks(img: np.ndarray, cap: np.ndarray, cpi: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: stable argsort of -scores per query, then position lookup."""
    sims = img @ cap.T
    n_img, n_cap = sims.shape
    i2t = np.zeros(n_img, dtype=np.int64)
    for i in range(n_img):
        order = np.argsort(-sims[i], kind="stable")
        pos = np.empty(n_cap, dtype=np.int64)
        pos[order] = np.arange(n_cap)
        i2t[i] = min(pos[cpi * i + k] for k in range(cpi))
    t2i = np.zeros(n_cap, dtype=np.int64)
    for j in range(n_cap):
        order = np.argsort(-sims[:, j], kind="stable")
        t2i[j] = int(np.where(order == j // cpi)[0][0])
    return i2t, t2i


def ref_summary(i2t: np.ndarray, t2i: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    out, rsum = {}, 0.0
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
            rsum += out[f"{name}_r{k}"]
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    out["rsum"] = rsum
    return out


def ref_recall(img, cap, ks=(1, 5, 10), folds=1, cpi=5) -> dict[str, float]:
    n = len(img) // folds
    per = [ref_summary(*ref_ranks(img[f * n:(f + 1) * n], cap[f * n * cpi:(f + 1) * n * cpi], cpi), ks)
           for f in range(folds)]
    return {k: sum(p[k] for p in per) / folds for k in per[0]}


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert isinstance(got[k], float), (k, type(got[k]))
        assert abs(got[k] - want[k]) <= 1e-9, (k, got[k], want[k])


# ----------------------------------------------------------------------------- data
def normed(rng, n, d, dtype=np.float64):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def random_pair(seed, n_img=50, d=32, cpi=5, noise=4.0):
    """Captions loosely related to their image so that ranks spread over the whole range."""
    rng = np.random.default_rng(seed)
    img = normed(rng, n_img, d)
    cap = np.repeat(img, cpi, axis=0) + noise * rng.standard_normal((n_img * cpi, d)) / np.sqrt(d)
    return img, cap / np.linalg.norm(cap, axis=1, keepdims=True)


def tied_pair(seed, n_img=50, d=2, cpi=5):
    """Heavy exact ties: coarse values (multiples of 1/4, so every product and sum is exact in
    float32/float64 whatever the summation order) in 2-3 dims, plus duplicated rows."""
    rng = np.random.default_rng(seed)
    img = np.round(rng.uniform(-1, 1, (n_img, d)) * 4) / 4
    cap = np.round(rng.uniform(-1, 1, (n_img * cpi, d)) * 4) / 4
    img[1::7] = img[0]                       # duplicate images
    cap[3::11] = cap[2]                      # duplicate captions
    cap[5 * 4:5 * 5] = img[4]                # captions equal to their image
    return img, cap


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("folds", [1, 5])
def test_matches_reference_random(seed, folds):
    img, cap = random_pair(seed)
    assert_same(recall_at_k(img, cap, folds=folds), ref_recall(img, cap, folds=folds))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("folds", [1, 5])
@pytest.mark.parametrize("d", [2, 3])
def test_matches_reference_ties(seed, folds, d):
    img, cap = tied_pair(seed, d=d)
    want = ref_recall(img, cap, folds=folds)
    assert_same(recall_at_k(img, cap, folds=folds), want)
    # values are exact in float32 too, so ties are identical
    assert_same(recall_at_k(img.astype(np.float32), cap.astype(np.float32), folds=folds), want)


@pytest.mark.parametrize("maker", [random_pair, tied_pair])
@pytest.mark.parametrize("seed", range(3))
def test_raw_ranks_identical(maker, seed):
    img, cap = maker(seed)
    want_i2t, want_t2i = ref_ranks(img, cap)
    i2t, t2i = i2t_t2i_ranks(img, cap)
    assert i2t.shape == (50,) and t2i.shape == (250,)
    np.testing.assert_array_equal(i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(t2i.numpy(), want_t2i)
    # chunk boundaries do not matter
    for chunk in (1, 7, 64):
        a, b = i2t_t2i_ranks(img, cap, chunk_size=chunk)
        np.testing.assert_array_equal(a.numpy(), want_i2t)
        np.testing.assert_array_equal(b.numpy(), want_t2i)


def test_all_identical_embeddings():
    img, cap = np.ones((10, 3)), np.ones((50, 3))
    i2t, t2i = i2t_t2i_ranks(img, cap)
    np.testing.assert_array_equal(i2t.numpy(), 5 * np.arange(10))   # lower index first
    np.testing.assert_array_equal(t2i.numpy(), np.arange(50) // 5)
    assert_same(recall_at_k(img, cap), ref_recall(img, cap))


@pytest.mark.parametrize("cpi", [1, 3])
def test_other_captions_per_image(cpi):
    for maker in (random_pair, tied_pair):
        img, cap = maker(1, n_img=20, cpi=cpi)
        got = recall_at_k(img, cap, ks=(1, 2, 5), folds=2, captions_per_image=cpi)
        assert_same(got, ref_recall(img, cap, ks=(1, 2, 5), folds=2, cpi=cpi))


def test_perfect_embeddings():
    rng = np.random.default_rng(0)
    img = normed(rng, 100, 64, np.float32)
    cap = np.repeat(img, 5, axis=0) + 1e-4 * rng.standard_normal((500, 64)).astype(np.float32)
    for folds in (1, 5):
        m = recall_at_k(img, cap, folds=folds)
        assert m["i2t_r1"] == m["t2i_r1"] == 100.0
        assert m["i2t_medr"] == m["t2i_medr"] == 1.0
        assert m["i2t_meanr"] == m["t2i_meanr"] == 1.0
        assert m["rsum"] == 600.0


def test_hand_worked_example():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    cap = np.array([[1, 0], [0, 1], [.5, .5], [1, 0], [-1, 0],        # image 0 owns 0..4
                    [0, 1], [.5, .5], [1, 0], [0, -1], [.25, 0]])     # image 1 owns 5..9
    # image 0: scores [1,0,.5,1,-1,0,.5,1,0,.25] -> order 0,3,7,2,6,9,1,5,8,4 -> caption 0 first: rank 0
    # image 1: scores [0,1,.5,0,0,1,.5,0,-1,0]  -> order 1,5,2,6,0,3,4,7,9,8 -> caption 5 at 1 (tie with 1)
    # captions: c2 and c6 tie (.5,.5) -> image 0 first; c1,c4 prefer image 1; c7,c8,c9 prefer image 0
    i2t, t2i = i2t_t2i_ranks(img, cap)
    assert i2t.tolist() == [0, 1]
    assert t2i.tolist() == [0, 1, 0, 0, 1, 0, 1, 1, 1, 1]
    m = recall_at_k(img, cap)
    want = {"i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 1.0, "i2t_meanr": 1.5,
            "t2i_r1": 40.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 2.0, "t2i_meanr": 1.6,
            "rsum": 490.0}
    assert_same(m, want)
    m2 = recall_at_k(img, cap, ks=(1, 2))
    assert m2["i2t_r2"] == m2["t2i_r2"] == 100.0 and m2["rsum"] == 290.0
    assert "i2t_r5" not in m2


def test_numpy_and_torch_identical():
    img, cap = random_pair(3)
    for dtype in (np.float32, np.float64):
        a, b = img.astype(dtype), cap.astype(dtype)
        ref = recall_at_k(a, b, folds=5)
        assert recall_at_k(torch.from_numpy(a), torch.from_numpy(b), folds=5) == ref
        assert recall_at_k(torch.from_numpy(a), b, folds=5) == ref      # mixed inputs
        r_np, r_t = i2t_t2i_ranks(a, b), i2t_t2i_ranks(torch.from_numpy(a), torch.from_numpy(b))
        assert all(torch.equal(x, y) for x, y in zip(r_np, r_t))


def test_float64_vs_float32_close():
    img, cap = random_pair(4, n_img=100)
    m64 = recall_at_k(img, cap)
    m32 = recall_at_k(img.astype(np.float32), cap.astype(np.float32))
    for k in KEYS:
        assert m32[k] == pytest.approx(m64[k], abs=1.0), k   # at most a rare near-tie flip
    m16 = recall_at_k(torch.from_numpy(img).half(), torch.from_numpy(cap).half())  # promoted to fp32
    assert m16["rsum"] == pytest.approx(m64["rsum"], abs=10.0)


def test_folds_are_mean_of_independent_folds():
    img, cap = random_pair(5)
    per = [recall_at_k(img[10 * f:10 * (f + 1)], cap[50 * f:50 * (f + 1)]) for f in range(5)]
    got = recall_at_k(img, cap, folds=5)
    for k in KEYS:
        assert got[k] == pytest.approx(sum(p[k] for p in per) / 5, abs=1e-9)


def test_summarize_ranks_matches_reference():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10, 33):      # odd and even counts (numpy median averages the middle pair)
        i2t, t2i = rng.integers(0, 20, n), rng.integers(0, 20, 5 * n)
        for ks in ((1, 5, 10), (1, 3)):
            assert_same(summarize_ranks(torch.from_numpy(i2t), torch.from_numpy(t2i), ks),
                        ref_summary(i2t, t2i, ks))
            assert_same(summarize_ranks(i2t, t2i, ks), ref_summary(i2t, t2i, ks))
    assert summarize_ranks(np.array([0, 3]), np.array([0, 0, 1, 2]), (1,))["i2t_medr"] == 2.0  # floor(1.5)+1


def test_keys_and_types():
    img, cap = random_pair(0)
    m = recall_at_k(img, cap)
    assert list(m) == KEYS
    assert all(type(v) is float for v in m.values())
    assert m["rsum"] == pytest.approx(sum(m[k] for k in KEYS if "_r" in k and "medr" not in k))


def test_requires_grad_inputs():
    img, cap = random_pair(0)
    a = torch.from_numpy(img).requires_grad_()
    assert recall_at_k(a, torch.from_numpy(cap)) == recall_at_k(img, cap)


@pytest.mark.parametrize("img_shape,cap_shape,kwargs,match", [
    ((10, 4), (50, 4), {"folds": 3}, "divisible"),
    ((10, 4), (49, 4), {}, "captions"),
    ((10, 4), (30, 4), {}, "captions"),
    ((10, 4), (50, 5), {}, "dims differ"),
    ((0, 4), (0, 4), {}, "empty"),
    ((10, 0), (50, 0), {}, "empty"),
    ((10,), (50,), {}, "2-D"),
    ((10, 4), (20, 4), {"captions_per_image": 2, "folds": 0}, "folds"),
    ((10, 4), (50, 4), {"ks": ()}, "ks"),
    ((10, 4), (50, 4), {"ks": (0, 1)}, "ks"),
    ((10, 4), (50, 4), {"captions_per_image": 0}, "captions_per_image"),
])
def test_errors(img_shape, cap_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(np.ones(img_shape, np.float32), np.ones(cap_shape, np.float32), **kwargs)


def test_errors_raw_ranks():
    with pytest.raises(ValueError, match="captions"):
        i2t_t2i_ranks(np.ones((4, 3)), np.ones((19, 3)))
    with pytest.raises(ValueError, match="empty"):
        summarize_ranks(np.zeros(0, np.int64), np.zeros(5, np.int64), (1,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for maker in (random_pair, tied_pair):
        img, cap = maker(2)
        a, b = torch.from_numpy(img).float(), torch.from_numpy(cap).float()
        cpu = i2t_t2i_ranks(a, b)
        gpu = i2t_t2i_ranks(a.cuda(), b.cuda())
        assert gpu[0].is_cuda and gpu[1].is_cuda
        if maker is tied_pair:      # exact values: ties identical on every device
            assert all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu))
            assert recall_at_k(a.cuda(), b.cuda(), folds=5) == recall_at_k(a, b, folds=5)
        m_cpu, m_gpu = recall_at_k(a, b), recall_at_k(a.cuda(), b.cuda())
        assert all(m_gpu[k] == pytest.approx(m_cpu[k], abs=1.0) for k in KEYS)
