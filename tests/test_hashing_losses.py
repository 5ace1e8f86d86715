"""DJSRH and SGRN over the global batch: local-row targets equal the dense N x N references, and
distributed losses and gradients equal the single-process ones."""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import run_distributed
from xmdist.dist import all_reduce_sum, gather
from xmdist.losses.hashing import (alpha_for_epoch, djsrh_loss, djsrh_target,
                                   djsrh_target_dense, hash_codes, sgrn_graph, sgrn_graph_dense,
                                   sgrn_loss)

SGRN = dict(k=4, tau=0.05, eta=0.4, beta=0.6, lam=0.3, gamma=0.5, mu=1.5)
DJSRH = dict(beta=0.6, eta=0.4, mu=1.5)
ABLATIONS = {"full": {}, "no_gate": {"gate": False}, "w_1": {"enhance": False},
             "eta_0": {"eta": 0.0}, "lam_0": {"lam": 0.0}, "k_1": {"k": 1}}


def _features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous features (no similarity ties, so k-NN lists are unambiguous): non-negative
    image features like fc7 after ReLU, signed text features."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.randn(n, 12, generator=g, dtype=torch.float64).relu()
    ft = torch.randn(n, 9, generator=g, dtype=torch.float64)
    return fi, ft


def _split(sizes: list[int]) -> list[slice]:
    bounds = [0] + torch.tensor(sizes).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _simulate(fn, sizes: list[int]) -> list:
    """Run ``fn(rows, gather_rows)`` for each simulated rank (``rows`` its slice) in a thread of
    its own; ``gather_rows`` is an in-process all-gather (concatenation in rank order), so ranks
    may even hold different numbers of rows."""
    slices, world = _split(sizes), len(sizes)
    barrier, slots, results, errors = threading.Barrier(world, timeout=60), [None] * world, [None] * world, []

    def rank_main(rank: int) -> None:
        def gather_rows(x: torch.Tensor) -> torch.Tensor:
            slots[rank] = x
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()  # nobody overwrites a slot before every rank has read it
            return out
        try:
            results[rank] = fn(slices[rank], gather_rows)
        except Exception as e:  # re-raised in the test thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("sizes", [[20], [10, 10], [5, 15], [7, 6, 7]])
def test_djsrh_target_rows_match_dense(sizes):
    fi, ft = _features(20)
    ref = djsrh_target_dense(fi, ft, **DJSRH)
    for sl in _split(sizes):
        torch.testing.assert_close(djsrh_target(fi[sl], ft[sl], fi, ft, **DJSRH), ref[sl], rtol=1e-12, atol=1e-12)


def test_djsrh_target_by_hand():
    # Two orthogonal items in both modalities: S_x = S~ = 2I - 1 and S~ S~^T / 2 = S~.
    eye = torch.eye(2, dtype=torch.float64)
    expected = 1.5 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(djsrh_target(eye, eye, eye, eye, **DJSRH), expected)


@pytest.mark.parametrize("ablation,target", [(a, "v2") for a in ABLATIONS] + [("full", "v1"), ("no_gate", "v1")])
@pytest.mark.parametrize("sizes", [[20], [10, 10], [5, 15], [7, 6, 7]])
def test_sgrn_graph_rows_match_dense(sizes, ablation, target):
    fi, ft = _features(20, seed=1)
    kw = {**SGRN, **ABLATIONS[ablation], "target": target}
    ref = sgrn_graph_dense(fi, ft, **kw)
    graphs = _simulate(lambda sl, gather_rows: sgrn_graph(
        fi[sl], ft[sl], fi, ft, sl.start, **kw, gather_rows=gather_rows), sizes)
    for sl, graph in zip(_split(sizes), graphs):
        for name in ("S", "S_I", "S_T", "T_I", "T_T"):
            torch.testing.assert_close(getattr(graph, name), getattr(ref, name)[sl], rtol=1e-12, atol=1e-12)


def _unit(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_sgrn_knn_symmetrisation_and_gate_by_hand():
    # Points at 0, 30, 50 and 150 degrees, k = 2 (self + nearest other):
    # knn(0) = 1, knn(1) = 2 (20 deg), knn(2) = 1, knn(3) = 2; union edges 0-1, 1-2, 2-3.
    f = _unit([0, 30, 50, 150])
    cos = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    kw = dict(k=2, tau=0.05, eta=0.0, beta=1.0, lam=0.0, gamma=0.5, mu=1.5, enhance=False)
    a = torch.tensor([[1, cos(30), 0, 0], [cos(30), 1, cos(20), 0],
                      [0, cos(20), 1, cos(100)], [0, 0, cos(100), 1]], dtype=torch.float64)
    plain = sgrn_graph(f, f, f, f, 0, **kw, gate=False, target="v1")
    torch.testing.assert_close(plain.S_I, a)                      # eta = 0, no gate: S_I = A
    torch.testing.assert_close(plain.S, 1.5 * (2 * a - 1))        # beta = 1, lam = 0, W = 1
    torch.testing.assert_close(plain.T_I, 2 * a - 1)
    # v2: on the graph A = C, so max(2C - 1, 2A - 1) = 2C - 1; off it max(2C - 1, -1): pairs
    # off the graph keep the dense similarity where it is above -1 (cos > 0), instead of -1
    d = 2 * (f @ f.t()) - 1
    expected = torch.where(a != 0, d, d.clamp_min(-1))
    v2 = sgrn_graph(f, f, f, f, 0, **kw, gate=False)
    torch.testing.assert_close(v2.S, 1.5 * expected)
    torch.testing.assert_close(v2.T_I, expected)
    assert plain.S[0, 2] == -1.5 and v2.S[0, 2] == pytest.approx(1.5 * (2 * cos(50) - 1))
    theta = torch.tensor([1 + cos(30), 1 + cos(20), 1 + cos(20), 1 + cos(100)], dtype=torch.float64) / 2
    gated = sgrn_graph(f, f, f, f, 0, **kw).S_I
    gate = torch.sigmoid((a - theta[:, None]) / 0.05)             # theta of the ROW: not symmetric
    torch.testing.assert_close(gated, torch.where(a != 0, a * gate, 0.0))
    assert gated[0, 1] != gated[1, 0]
    # Row 2 gets an edge to 3 only by symmetrisation: 3 lists 2, but 2 does not list 3.
    assert gated[2, 3] != 0 and gated[3, 2] != 0 and gated[3, 1] == 0


def test_sgrn_enhanced_weight_and_coherence():
    fi, ft = _features(12, seed=2)
    kw = {**SGRN, "k": 3}
    on, off = sgrn_graph_dense(fi, ft, **kw), sgrn_graph_dense(fi, ft, **{**kw, "enhance": False})
    ratio = on.S / off.S
    assert ratio.min() >= 1 - 1e-12 and ratio.max() <= 1.5 + 1e-12  # W = 1 + 0.5 M_I M_T in [1, 1.5]
    # eta = 1: S_x = R_x, a cosine matrix with unit diagonal.
    r = sgrn_graph(fi, ft, fi, ft, 0, **{**kw, "eta": 1.0}).S_I
    torch.testing.assert_close(r.diagonal(), torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(r, r.t())


def test_codes_and_alpha():
    assert alpha_for_epoch(0) == 1.0 and alpha_for_epoch(3) == 2.0
    torch.testing.assert_close(hash_codes(torch.tensor([0.5, -2.0]), 2.0), torch.tanh(torch.tensor([1.0, -4.0])))


def test_sgrn_loss_terms():
    fi, ft = _features(12, seed=3)
    hi, ht = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    bi, bt = hash_codes(hi, 2.0), hash_codes(ht, 2.0)
    graph = sgrn_graph_dense(fi, ft, **{**SGRN, "k": 3})
    cos = lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()  # noqa: E731
    mse = lambda p, t: (p - t).pow(2).mean()  # noqa: E731
    out = sgrn_loss(hi, ht, hi, ht, bi, bt, bi, bt, graph, rho=0.0, intra_weight=0.1)
    torch.testing.assert_close(out["inter"], mse(cos(bi, bt), graph.S))
    torch.testing.assert_close(out["intra"], mse(cos(bi, bi), graph.S) + mse(cos(bt, bt), graph.S))
    torch.testing.assert_close(out["loss"], out["inter"] + 0.1 * out["intra"])
    out = sgrn_loss(hi, ht, hi, ht, bi, bt, bi, bt, graph, rho=0.5)
    torch.testing.assert_close(out["intra"], mse(cos(bi, bi), graph.S) + mse(cos(bt, bt), graph.S)
                               + 0.5 * (mse(cos(hi, hi), graph.T_I) + mse(cos(ht, ht), graph.T_T)))


def test_sgrn_v2_targets_raise_the_dense_base_on_the_graph_only():
    fi, ft = _features(16, seed=5)
    kw = {**SGRN, "k": 4}
    v1, v2 = sgrn_graph_dense(fi, ft, **kw, target="v1"), sgrn_graph_dense(fi, ft, **kw)
    cos = lambda a: F.normalize(a, dim=1) @ F.normalize(a, dim=1).t()  # noqa: E731
    d_i, d_t = 2 * cos(fi).fill_diagonal_(1) - 1, 2 * cos(ft).fill_diagonal_(1) - 1
    d = kw["beta"] * d_i + (1 - kw["beta"]) * d_t
    torch.testing.assert_close(v1.T_I, 2 * v1.S_I - 1)
    torch.testing.assert_close(v2.T_I, torch.maximum(d_i, 2 * v1.S_I - 1))
    torch.testing.assert_close(v2.T_T, torch.maximum(d_t, 2 * v1.S_T - 1))
    joint = v1.S / (kw["mu"] * (1 + kw["gamma"] * _gates(fi, ft, kw)))  # v1: mu W (2Q - 1)
    raised = torch.maximum(d, joint)
    w = v2.S / (kw["mu"] * raised)
    assert w.min() >= 1 - 1e-9 and w.max() <= 1 + kw["gamma"] + 1e-9
    off = (v1.S_I == 0) & (v1.S_T == 0) & (joint <= d)  # off both graphs: the dense base, W = 1
    assert off.any()
    torch.testing.assert_close(v2.S[off], kw["mu"] * d[off])


def _gates(fi, ft, kw):
    """M_I * M_T of the dense reference (what W multiplies by gamma)."""
    from xmdist.losses.hashing import _dense_modality
    m_i = _dense_modality(fi, kw["k"], kw["tau"], kw["eta"], True)[1]
    m_t = _dense_modality(ft, kw["k"], kw["tau"], kw["eta"], True)[1]
    return m_i * m_t


# ----------------------------------------------------------------------------- distributed parity
N, K, ALPHA = 16, 6, 1.7


def _batch():
    fi, ft = _features(N, seed=4)
    g = torch.Generator().manual_seed(5)
    hi, ht = torch.randn(2, N, K, generator=g, dtype=torch.float64)
    return fi, ft, hi, ht


def _losses(hi, ht, hi_all_fn, graph_fn, target_fn):
    """DJSRH and SGRN loss dicts for leaves ``hi``/``ht``; ``hi_all_fn`` gathers with gradient."""
    bi, bt = hash_codes(hi, ALPHA), hash_codes(ht, ALPHA)
    bi_all, bt_all = hi_all_fn(bi), hi_all_fn(bt)
    dj = djsrh_loss(bi, bt, bi_all, bt_all, target_fn(), l1=0.1, l2=0.1)
    sg = sgrn_loss(hi, ht, hi_all_fn(hi), hi_all_fn(ht), bi, bt, bi_all, bt_all, graph_fn(), rho=0.5)
    return dj, sg


def _reference():
    fi, ft, hi, ht = _batch()
    out = {}
    for name in ("djsrh", "sgrn"):
        hi_l, ht_l = hi.clone().requires_grad_(), ht.clone().requires_grad_()
        dj, sg = _losses(hi_l, ht_l, lambda x: x, lambda: sgrn_graph_dense(fi, ft, **SGRN),
                         lambda: djsrh_target_dense(fi, ft, **DJSRH))
        terms = dj if name == "djsrh" else sg
        terms["loss"].backward()
        out[name] = ({k: v.detach() for k, v in terms.items()}, hi_l.grad, ht_l.grad)
    return out


def _worker(rank, world, out_path):
    fi, ft, hi, ht = _batch()
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    out = {}
    for name in ("djsrh", "sgrn"):
        hi_l, ht_l = hi[sl].clone().requires_grad_(), ht[sl].clone().requires_grad_()
        dj, sg = _losses(hi_l, ht_l, lambda x: gather(x, grad=True),
                         lambda: sgrn_graph(fi[sl], ft[sl], gather(fi[sl]), gather(ft[sl]), sl.start, **SGRN,
                                            gather_rows=gather),
                         lambda: djsrh_target(fi[sl], ft[sl], gather(fi[sl]), gather(ft[sl]), **DJSRH))
        terms = dj if name == "djsrh" else sg
        terms["loss"].backward()
        out[name] = ({k: all_reduce_sum(v.detach()) for k, v in terms.items()},
                     gather(hi_l.grad), gather(ht_l.grad))
    torch.save(out, f"{out_path}.{rank}")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_losses_and_grads_match_single_process(tmp_path, world):
    ref = _reference()
    run_distributed(_worker, world, str(tmp_path / "out"))
    for rank in range(world):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        for name in ("djsrh", "sgrn"):
            (terms, gi, gt), (ref_terms, ref_gi, ref_gt) = got[name], ref[name]
            assert terms.keys() == ref_terms.keys()
            for key in terms:
                torch.testing.assert_close(terms[key], ref_terms[key], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(gi, ref_gi, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(gt, ref_gt, rtol=1e-10, atol=1e-14)
