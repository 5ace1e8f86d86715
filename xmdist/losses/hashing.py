"""Unsupervised cross-modal hashing losses over a global batch: DJSRH and SGRN.

Pure functions of tensors, like :mod:`xmdist.losses.contrastive`: a method gathers codes once
(``gather(b, grad=True)``) and passes local and gathered tensors. Every target is computed for
this rank's rows only and every loss returns this rank's SHARE, so the sum over ranks equals the
single-process loss on the concatenated batch (``mse`` over an N x N matrix = squared errors of
the local rows / N^2). A single process, local == global and ``offset = 0``, is the reference.

Shapes: ``n`` rows on this rank starting at global row ``offset``, ``N`` in the global batch.
``fi``/``ft`` (n, d_i)/(n, d_t) raw features (no gradient), ``*_all`` (N, .) gathered;
``hi``/``ht`` (n, K) real-valued hash-layer outputs, ``bi``/``bt`` (n, K) codes ``tanh(alpha h)``.
Targets are (n, N): the local rows of the N x N matrices of METHODS.md section 2.

SGRN (``sgrn_graph``) keeps per-rank memory O(n N + N k): top-k for local rows against the
gathered features, all-gather of the k-NN lists, N x N graphs as sparse CSR tensors (<= 2 N k
entries), and dense products only for local rows. ``sgrn_graph_dense`` and
``djsrh_target_dense`` are the plain N x N references (tests, benchmark).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


Tensor = torch.Tensor


def hash_codes(h: Tensor, alpha: float) -> Tensor:
    """Relaxed codes ``tanh(alpha * h)``; ``sign`` (0 -> +1) at test time."""
    return torch.tanh(alpha * h)


def alpha_for_epoch(epoch: int) -> float:
    """DJSRH's schedule ``alpha = sqrt(epoch + 1)`` (epochs counted from 0)."""
    return math.sqrt(epoch + 1)


def _inv_norm(x: Tensor) -> Tensor:
    """(N,) inverse L2 row norms, as ``F.normalize`` uses them (norms clamped at 1e-12)."""
    return 1 / x.norm(dim=1).clamp_min(1e-12)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """``cos(a, b)`` (n, N) for rows ``a`` (n, d) and ``b`` (N, d); scales the product by b's
    inverse row norms rather than copying the (N, d) ``b`` normalised."""
    return (F.normalize(a, dim=1) @ b.t()) * _inv_norm(b)[None, :]


def _mse(pred: Tensor, target: Tensor, big_n: int) -> Tensor:
    """This rank's share of the mean squared error over N x N: local (n, N) rows / N^2."""
    return (pred - target).pow(2).sum() / (big_n * big_n)


# ----------------------------------------------------------------------------- DJSRH
@torch.no_grad()
def djsrh_target(fi: Tensor, ft: Tensor, fi_all: Tensor, ft_all: Tensor,
                 beta: float, eta: float, mu: float) -> Tensor:
    """Local rows (n, N) of DJSRH's ``S = mu ((1 - eta) S~ + eta S~ S~^T / N)``.

    ``S~ = beta S_I + (1 - beta) S_T``, ``S_x = 2 cos(F_x, F_x) - 1``. With ``P_x`` the
    normalised features, ``S~ = 2 beta P_I P_I^T + 2 (1 - beta) P_T P_T^T - 1 1^T`` is symmetric,
    so the local rows of ``S~ S~^T`` are
    ``S~_loc S~ = 2 beta (S~_loc P_I) P_I^T + 2 (1 - beta) (S~_loc P_T) P_T^T - (S~_loc 1) 1^T``:
    memory O(n N + n d) beyond the inputs (``P_x = diag(r_x) F_x`` with r_x the inverse row
    norms is never formed), no N x N and no d x d matrix, valid for any ``beta``.
    """
    st = beta * (2 * _cos(fi, fi_all) - 1) + (1 - beta) * (2 * _cos(ft, ft_all) - 1)  # (n, N)
    sst = -st.sum(dim=1, keepdim=True)
    for w, f_all in ((2 * beta, fi_all), (2 * (1 - beta), ft_all)):
        r = _inv_norm(f_all)[None, :]                             # (1, N)
        sst = sst + w * ((st * r) @ f_all @ f_all.t()) * r        # w (S~_loc P) P^T
    return mu * ((1 - eta) * st + (eta / fi_all.shape[0]) * sst)


@torch.no_grad()
def djsrh_target_dense(fi: Tensor, ft: Tensor, beta: float, eta: float, mu: float) -> Tensor:
    """Reference: the full (N, N) DJSRH target from all features ``fi`` (N, d_i), ``ft`` (N, d_t)."""
    s_i, s_t = 2 * _cos(fi, fi) - 1, 2 * _cos(ft, ft) - 1
    st = beta * s_i + (1 - beta) * s_t
    return mu * ((1 - eta) * st + eta * (st @ st.t()) / fi.shape[0])


def djsrh_loss(bi: Tensor, bt: Tensor, bi_all: Tensor, bt_all: Tensor, target: Tensor,
               l1: float, l2: float) -> dict[str, Tensor]:
    """This rank's share of ``l1 mse(cos(B_I,B_I),S) + mse(cos(B_I,B_T),S) + l2 mse(cos(B_T,B_T),S)``.

    Rows of each cosine matrix are local codes (n, K), columns the gathered codes (N, K);
    ``target`` (n, N) the local rows of S. Terms ``ii``, ``it``, ``tt`` are unweighted.
    """
    big_n = bi_all.shape[0]
    terms = {"ii": _mse(_cos(bi, bi_all), target, big_n),
             "it": _mse(_cos(bi, bt_all), target, big_n),
             "tt": _mse(_cos(bt, bt_all), target, big_n)}
    terms["loss"] = l1 * terms["ii"] + terms["it"] + l2 * terms["tt"]
    return terms


# ----------------------------------------------------------------------------- SGRN graph
@dataclass
class SGRNGraph:
    """SGRN targets for this rank's rows, all (n, N): ``S`` the joint target of the losses,
    ``S_I``/``S_T`` the intra-modal graphs ``P_x = (1 - eta) G_x + eta R_x``, ``T_I``/``T_T``
    the targets of L_intra's real-valued terms (v1 ``2 P_x - 1``, v2 ``max(D_x, 2 P_x - 1)``)."""
    S: Tensor
    S_I: Tensor
    S_T: Tensor
    T_I: Tensor
    T_T: Tensor


@dataclass
class _Modality:
    """One modality's graph: ``G``, ``U`` (rows of G L2-normalised, so ``R = U U^T``) and ``Ut``
    = U^T as (N, N) sparse CSR; local rows (n, N) of the gate ``M`` and of ``S_x``."""
    G: Tensor
    U: Tensor
    Ut: Tensor
    M: Tensor
    S: Tensor
    C: Tensor


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, size: int) -> Tensor:
    """(size, size) CSR tensor from entries sorted by row."""
    crow = torch.zeros(size + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=size).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, (size, size), check_invariants=False)


def _dense_rows(sp: Tensor, offset: int, n: int) -> Tensor:
    """Rows ``offset .. offset+n`` of the CSR tensor ``sp`` as a dense (n, N) tensor."""
    crow, col, val = sp.crow_indices(), sp.col_indices(), sp.values()
    lo, hi = int(crow[offset]), int(crow[offset + n])
    counts = crow[offset + 1:offset + n + 1] - crow[offset:offset + n]
    rows = torch.repeat_interleave(torch.arange(n, device=col.device), counts)
    out = val.new_zeros(n, sp.shape[1])
    out[rows, col[lo:hi]] = val[lo:hi]
    return out


def _times_t(x: Tensor, sp: Tensor) -> Tensor:
    """``x @ sp.T`` (n, N) for dense ``x`` (n, N) and sparse ``sp`` (N, N), as ``(sp @ x.T).T``."""
    return (sp @ x.t()).t()


def _modality(f: Tensor, f_all: Tensor, offset: int, k: int, tau: float, eta: float, gate: bool,
              gather_rows: Callable[[Tensor], Tensor]) -> _Modality:
    """LRGR for one modality (METHODS 2.2 steps 1-3); see :func:`sgrn_graph`."""
    n, big_n, dev = f.shape[0], f_all.shape[0], f.device
    local = torch.arange(n, device=dev)
    c = _cos(f, f_all)                                           # (n, N) local rows of C_x
    c[local, offset + local] = 1.0                               # cos(x, x) := 1, even for x = 0
    others = c.index_put((local, offset + local), c.new_tensor(float("-inf")))
    top = others.topk(k - 1, dim=1)                              # self is always the first neighbour
    idx = torch.cat([(offset + local)[:, None], top.indices], 1)  # (n, k) global column indices
    val = torch.cat([c.new_ones(n, 1), top.values], 1)           # (n, k) their similarities
    theta = val.mean(dim=1)                                      # (n,)
    idx_all, val_all, theta_all = gather_rows(idx), gather_rows(val), gather_rows(theta)

    # A = C on j in knn(i) or i in knn(j): list each k-NN edge in both directions and merge
    # duplicates (an edge both endpoints list) by averaging, so A is exactly symmetric.
    src = torch.arange(big_n, device=dev).repeat_interleave(k)
    dst = idx_all.reshape(-1)
    keys, inv = torch.unique(torch.cat([src * big_n + dst, dst * big_n + src]), return_inverse=True)
    total = val_all.new_zeros(len(keys)).index_add_(0, inv, val_all.reshape(-1).repeat(2))
    a = total / torch.bincount(inv, minlength=len(keys))
    rows, cols = keys // big_n, keys % big_n                     # sorted by row: CSR order
    g = a * torch.sigmoid((a - theta_all[rows]) / tau) if gate else a
    # rownorm1 rescales each row by a positive number, so R = cos(G, G) = U U^T with
    # U = norm(G); every row holds its self entry (> 0), so no row norm is 0.
    u = g / g.new_zeros(big_n).index_add_(0, rows, g * g).sqrt()[rows]
    # A's pattern is symmetric, so U^T has U's pattern: entry (i, j) of U^T is U's entry (j, i).
    transposed = torch.searchsorted(keys, cols * big_n + rows)
    g_sp, u_sp = _csr(rows, cols, g, big_n), _csr(rows, cols, u, big_n)
    s = (1 - eta) * _dense_rows(g_sp, offset, n)
    if eta:
        s += eta * _times_t(_dense_rows(u_sp, offset, n), u_sp)   # local rows of R = U U^T
    return _Modality(G=g_sp, U=u_sp, Ut=_csr(rows, cols, u[transposed], big_n),
                     M=torch.sigmoid((c - theta[:, None]) / tau), S=s, C=c)


def _times_s_t(x: Tensor, m: _Modality, eta: float) -> Tensor:
    """``x @ S_x^T`` (n, N) without forming S_x: ``S_x^T = (1 - eta) G^T + eta U U^T``."""
    out = (1 - eta) * _times_t(x, m.G)
    if eta:
        out += eta * _times_t(_times_t(x, m.Ut), m.U)           # (x @ U) @ U^T
    return out


def _symmetric_cos(mi: _Modality, mt: _Modality, eta: float,
                   gather_rows: Callable[[Tensor], Tensor]) -> Tensor:
    """Local rows of ``(cos(S_I, S_T) + cos(S_I, S_T)^T) / 2``; the transposed part's local rows
    are ``cos(S_T_loc, S_I)``. Row norms of S_I and S_T for all N rows are gathered."""
    ni, nt = mi.S.norm(dim=1), mt.S.norm(dim=1)
    ni_all, nt_all = gather_rows(ni), gather_rows(nt)
    it = _times_s_t(mi.S, mt, eta) / (ni[:, None] * nt_all[None, :])
    ti = _times_s_t(mt.S, mi, eta) / (nt[:, None] * ni_all[None, :])
    return (it + ti) / 2


@torch.no_grad()
def sgrn_graph(fi: Tensor, ft: Tensor, fi_all: Tensor, ft_all: Tensor, offset: int, k: int,
               tau: float, eta: float, beta: float, lam: float, gamma: float, mu: float,
               gate: bool = True, enhance: bool = True, target: str = "v2", *,
               gather_rows: Callable[[Tensor], Tensor] = lambda x: x) -> SGRNGraph:
    """SGRN's targets (METHODS 2.2: proposal steps 1-4, ``target="v1"``, or the revision v2,
    the default) for this rank's rows.

    Per modality: ``C = cos(F, F)`` with the diagonal exactly 1; k-NN lists where a node is
    always its own first neighbour (``C[i,i] = 1``) plus its ``k - 1`` most similar other nodes
    (ties at the k-th value broken by ``torch.topk``); ``theta[i]`` = mean of those k values;
    ``A = C`` on edges ``j in knn(i) or i in knn(j)``; gate ``M[i,j] = sigmoid((C[i,j] -
    theta[i]) / tau)`` (row-wise, not symmetric); ``G = M * A`` (``gate=False``: ``G = A``);
    ``R = cos(rownorm1(G), rownorm1(G))``; ``S_x = (1 - eta) G + eta R``. Joint:
    ``S* = 2((1 - lam)(beta S_I + (1 - beta) S_T) + lam (cos(S_I,S_T) + cos(S_I,S_T)^T) / 2) - 1``,
    ``S = mu W S*`` with ``W = 1 + gamma M_I M_T`` (``enhance=False``: ``W = 1``).

    v2: the graph only raises the dense DJSRH-style similarity of strong neighbours. With
    ``D_x = 2 C_x - 1``, ``D = beta D_I + (1 - beta) D_T`` and ``Q`` the joint graph affinity
    (``S*`` above before ``2 . - 1``): ``S = mu W max(D, 2 Q - 1)`` where ``W = 1 + gamma M_I M_T``
    only on graph pairs (an edge of either modality's k-NN graph) and 1 elsewhere; the intra
    targets are ``T_x = max(D_x, 2 P_x - 1)`` (v1: ``2 P_x - 1``).

    ``gather_rows`` all-gathers per-row tensors (k-NN lists, theta, row norms) in rank order
    (:func:`xmdist.dist.gather` under several processes); the default, the identity, is one process.
    """
    if not 1 <= k <= fi_all.shape[0]:
        raise ValueError(f"k must be in 1..N={fi_all.shape[0]} (self included), got {k}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    mi = _modality(fi, fi_all, offset, k, tau, eta, gate, gather_rows)
    mt = _modality(ft, ft_all, offset, k, tau, eta, gate, gather_rows)
    s = (1 - lam) * (beta * mi.S + (1 - beta) * mt.S)
    if lam:
        s += lam * _symmetric_cos(mi, mt, eta, gather_rows)
    on_graph = None
    if target == "v2":
        n = fi.shape[0]
        on_graph = (_dense_rows(mi.G, offset, n) != 0) | (_dense_rows(mt.G, offset, n) != 0)
    return _joint(s, mi.S, mt.S, mi.C, mt.C, mi.M, mt.M, on_graph, beta, gamma, mu, enhance, target)


TARGETS = ("v1", "v2")


def _joint(q: Tensor, p_i: Tensor, p_t: Tensor, c_i: Tensor, c_t: Tensor, m_i: Tensor, m_t: Tensor,
           on_graph: Tensor | None, beta: float, gamma: float, mu: float, enhance: bool,
           target: str) -> SGRNGraph:
    """The targets from the joint affinity ``q``, the intra graphs ``p_x``, cosines ``c_x`` and
    gates ``m_x`` (all (n, N) rows): v1 ``S = mu W (2 q - 1)``, intra ``2 p_x - 1``; v2 as
    :func:`sgrn_graph` says (``on_graph`` the pairs W applies to)."""
    s, t_i, t_t = 2 * q - 1, 2 * p_i - 1, 2 * p_t - 1
    w = 1 + gamma * m_i * m_t if enhance else None
    if target == "v2":
        d_i, d_t = 2 * c_i - 1, 2 * c_t - 1
        s = torch.maximum(beta * d_i + (1 - beta) * d_t, s)
        t_i, t_t = torch.maximum(d_i, t_i), torch.maximum(d_t, t_t)
        if w is not None:
            w = torch.where(on_graph, w, 1.0)
    if w is not None:
        s = s * w
    return SGRNGraph(S=mu * s, S_I=p_i, S_T=p_t, T_I=t_i, T_T=t_t)


def _dense_modality(f: Tensor, k: int, tau: float, eta: float,
                    gate: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference LRGR on all N rows: ``(P_x, M_x, C_x, graph pattern)``, all (N, N)."""
    c = _cos(f, f).fill_diagonal_(1.0)
    top = c.clone().fill_diagonal_(float("-inf")).topk(k - 1, dim=1)
    knn = torch.eye(len(f), dtype=torch.bool, device=f.device).scatter_(1, top.indices, True)
    theta = (1 + top.values.sum(dim=1)) / k
    a = torch.where(knn | knn.t(), c, 0.0)
    m = torch.sigmoid((c - theta[:, None]) / tau)
    g = m * a if gate else a
    p = g / g.abs().sum(dim=1, keepdim=True)                     # rownorm1
    return (1 - eta) * g + eta * _cos(p, p), m, c, knn | knn.t()


@torch.no_grad()
def sgrn_graph_dense(fi: Tensor, ft: Tensor, k: int, tau: float, eta: float, beta: float,
                     lam: float, gamma: float, mu: float, gate: bool = True,
                     enhance: bool = True, target: str = "v2") -> SGRNGraph:
    """Reference: :func:`sgrn_graph` for all N rows of ``fi`` (N, d_i), ``ft`` (N, d_t), with
    every matrix dense (N, N). Single process; O(N^2) memory, O(N^3) time."""
    s_i, m_i, c_i, on_i = _dense_modality(fi, k, tau, eta, gate)
    s_t, m_t, c_t, on_t = _dense_modality(ft, k, tau, eta, gate)
    s_it = _cos(s_i, s_t)
    q = (1 - lam) * (beta * s_i + (1 - beta) * s_t) + lam * (s_it + s_it.t()) / 2
    return _joint(q, s_i, s_t, c_i, c_t, m_i, m_t, on_i | on_t, beta, gamma, mu, enhance, target)


# ----------------------------------------------------------------------------- SGRN loss
def sgrn_loss(hi: Tensor, ht: Tensor, hi_all: Tensor, ht_all: Tensor, bi: Tensor, bt: Tensor,
              bi_all: Tensor, bt_all: Tensor, graph: SGRNGraph, rho: float,
              intra_weight: float = 0.1) -> dict[str, Tensor]:
    """This rank's share of SGRN's loss (METHODS 2.2 step 5) for ``graph``'s local rows.

    ``inter = mse(cos(B_I,B_T),S) + rho/2 (mse(cos(H_I,B_T),S) + mse(cos(B_I,H_T),S))``;
    ``intra = sum_x mse(cos(B_x,B_x),S) + rho mse(cos(H_x,H_x), T_x)`` (v1: T_x = 2 S_x - 1);
    ``loss = inter + intra_weight * intra``. Rows of each cosine matrix are local (n, K),
    columns gathered (N, K).
    """
    big_n, s = bi_all.shape[0], graph.S
    inter = _mse(_cos(bi, bt_all), s, big_n) + rho / 2 * (
        _mse(_cos(hi, bt_all), s, big_n) + _mse(_cos(bi, ht_all), s, big_n))
    intra = _mse(_cos(bi, bi_all), s, big_n) + _mse(_cos(bt, bt_all), s, big_n) + rho * (
        _mse(_cos(hi, hi_all), graph.T_I, big_n) + _mse(_cos(ht, ht_all), graph.T_T, big_n))
    return {"inter": inter, "intra": intra, "loss": inter + intra_weight * intra}
