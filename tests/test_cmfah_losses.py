"""CMFAH losses: the sorted-prefix triplet loss equals a naive O(N^3) reference (values and
gradients, ties included), distributed shares and gradients equal the single-process ones, and no
(n, N, N) tensor is ever formed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_distributed
from xmdist.dist import all_reduce_sum, gather
from xmdist.losses.cmfah import (adversarial_generator_loss, cmfah_losses, discriminator_loss,
                                 quantization_loss, triplet_loss)

MARGIN = 0.5


# ----------------------------------------------------------------------------- reference
def _masks(la, lx, self_index):
    pos = (la @ lx.t()) > 0
    neg = ~pos
    if self_index is not None:
        own = torch.zeros_like(pos)
        own[torch.arange(len(la)), self_index] = True
        pos, neg = pos & ~own, neg & ~own
    return pos, neg


def naive_trip(a, la, x, lx, margin, self_index=None, mining="all"):
    """Plain definition: every (a, p, q) broadcast as (n, N, N); hard mining by a loop. A hinge
    exactly at 0 has zero gradient (``x > 0``), as in ``relu``."""
    s = F.normalize(a, dim=1) @ F.normalize(x, dim=1).t()
    pos, neg = _masks(la, lx, self_index)
    if mining == "all":
        h = margin - s[:, :, None] + s[:, None, :]
        valid = pos[:, :, None] & neg[:, None, :]
        return torch.where(valid & (h > 0), h, 0.0).sum() / valid.sum().clamp(min=1)
    total, count = s.new_zeros(()), 0
    for i in range(len(a)):
        if pos[i].any() and neg[i].any():
            h = margin - s[i][pos[i]].amin() + s[i][neg[i]].amax()
            total, count = total + torch.where(h > 0, h, 0.0), count + 1
    return total / max(count, 1)


# ----------------------------------------------------------------------------- data
def _rows(n, d, kind, gen):
    """``sign``: entries +-1 in d = 16 dimensions, so every cosine is an exact multiple of 1/16
    and many negatives sit exactly at the threshold s_ap - 0.5. ``gauss``: float64 normal rows
    with some rows duplicated (tied similarities)."""
    if kind == "sign":
        return torch.randint(0, 2, (n, d), generator=gen).double() * 2 - 1
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[1::5] = x[::5][: len(x[1::5])]
    return x


def _labels(n, kind, gen, num_labels=5):
    lab = (torch.rand(n, num_labels, generator=gen) < 0.3).double()
    if kind == "mixed":            # rows 0 and 7 have no label: no positive anywhere
        lab[[0, 7]] = 0
    elif kind == "universal":      # everyone labelled; rows 2 and 9 hold all labels: no negative
        lab[torch.arange(n), torch.randint(0, num_labels, (n,), generator=gen)] = 1
        lab[[2, 9]] = 1
    elif kind == "shared":         # label 0 shared by everybody: no negatives at all
        lab[:, 0] = 1
    elif kind == "none":           # nobody labelled: no positives at all
        lab.zero_()
    return lab


def _case(kind, labels, within, seed=0, n_all=24, n=10, offset=6):
    """Leaves ``a`` (n, 16) and ``x`` (N, 16), labels and self_index for one triplet problem."""
    gen = torch.Generator().manual_seed(seed)
    x, y = _rows(n_all, 16, kind, gen), _rows(n_all, 16, kind, gen)
    lx = _labels(n_all, labels, gen)
    sl = slice(offset, offset + n)
    a = (x if within else y)[sl].clone().requires_grad_()
    self_index = torch.arange(offset, offset + n) if within else None
    return a, lx[sl], x.clone().requires_grad_(), lx, self_index


@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("within", [True, False], ids=["within", "across"])
@pytest.mark.parametrize("labels", ["mixed", "universal"])
@pytest.mark.parametrize("kind", ["sign", "gauss"])
@pytest.mark.parametrize("mining", ["all", "hard"])
def test_triplet_matches_naive(mining, kind, labels, within, chunk):
    a, la, x, lx, self_index = _case(kind, labels, within)
    got = triplet_loss(a, la, x, lx, MARGIN, self_index=self_index, mining=mining, chunk=chunk)
    ref = naive_trip(a, la, x, lx, MARGIN, self_index, mining)
    assert ref > 0
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    for g, r in zip(torch.autograd.grad(got, (a, x)), torch.autograd.grad(ref, (a, x))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


def test_sign_data_has_threshold_ties():
    """The ``sign`` cases do exercise negatives exactly at the threshold (and tied positives)."""
    a, la, x, lx, self_index = _case("sign", "mixed", True)
    s = F.normalize(a, dim=1) @ F.normalize(x, dim=1).t()
    pos, neg = _masks(la, lx, self_index)
    h = MARGIN - s[:, :, None] + s[:, None, :]
    assert ((h == 0) & pos[:, :, None] & neg[:, None, :]).any()


@pytest.mark.parametrize("mining", ["all", "hard"])
@pytest.mark.parametrize("labels", ["shared", "none"])
@pytest.mark.parametrize("within", [True, False], ids=["within", "across"])
def test_no_valid_triplet_gives_zero_with_zero_grad(labels, within, mining):
    a, la, x, lx, self_index = _case("gauss", labels, within)
    got = triplet_loss(a, la, x, lx, MARGIN, self_index=self_index, mining=mining)
    assert got.item() == 0.0
    for g in torch.autograd.grad(got, (a, x)):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("mining", ["all", "hard"])
def test_hinge_exactly_at_zero_has_zero_gradient(mining):
    # s_ap = 0.5, s_aq = 0 exactly (norms 2): m - s_ap + s_aq = 0, the triplet counts but adds 0.
    a = torch.tensor([[1.0, 1, 1, 1]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, -1]], dtype=torch.float64, requires_grad=True)
    la, lx = torch.tensor([[1.0]]), torch.tensor([[1.0], [0.0]])
    got = triplet_loss(a, la, x, lx, MARGIN, mining=mining)
    assert got.item() == 0.0
    for g in torch.autograd.grad(got, (a, x)):
        assert torch.count_nonzero(g) == 0
    shifted = triplet_loss(a, la, x, lx, MARGIN + 0.25, mining=mining)  # one triplet: 0.25 / 1
    assert shifted.item() == 0.25


def test_bad_mining_is_rejected():
    a, la, x, lx, _ = _case("gauss", "mixed", False)
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(a, la, x, lx, MARGIN, mining="semi")


# ----------------------------------------------------------------------------- J3 and GAN terms
def test_quantization_loss_by_hand():
    hv = torch.tensor([[0.5, -0.2], [0.3, 0.0]], dtype=torch.float64, requires_grad=True)
    ht = torch.tensor([[-0.5, -0.4], [0.1, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)  # sign(0) = +1
    ref = ((hv - b) ** 2).mean() + ((ht - b) ** 2).mean()
    torch.testing.assert_close(quantization_loss(hv, ht), ref)
    torch.testing.assert_close(quantization_loss(hv, ht, world_size=4), ref / 4)
    (g,) = torch.autograd.grad(quantization_loss(hv, ht), hv)
    torch.testing.assert_close(g, 2 * (hv - b).detach() / 4)  # no gradient through B


def test_adversarial_losses_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    log_sig = F.logsigmoid
    d = -(log_sig(real).mean() + log_sig(-fake).mean())
    torch.testing.assert_close(discriminator_loss(real, fake), d)
    torch.testing.assert_close(discriminator_loss(real[:, None], fake[:, None], world_size=2), d / 2)
    g = -(log_sig(fake).mean() + log_sig(real).mean())
    torch.testing.assert_close(adversarial_generator_loss(fake, real), g)
    torch.testing.assert_close(adversarial_generator_loss(fake, real, world_size=4), g / 4)


# ----------------------------------------------------------------------------- all terms, distributed
N, WEIGHTS = 16, (1.0, 0.5, 2.0, 1.5, 0.7)
KEYS = ("j1", "j2", "j3", "j4", "j5", "loss")


def _batch(kind):
    """(fv, ft, hv, ht) (N, 16) and labels (N, 5). ``sign``: hashes +-0.5, so cosines stay exact
    and H_v + H_t has exact zeros (sign(0) = +1); ``gauss``: continuous, tie-free."""
    gen = torch.Generator().manual_seed(7)
    if kind == "sign":
        fv, ft, hv, ht = (_rows(N, 16, kind, gen) for _ in range(4))
        hv, ht = hv / 2, ht / 2
    else:
        fv, ft, hv, ht = torch.randn(4, N, 16, generator=gen, dtype=torch.float64)
        hv, ht = torch.tanh(hv), torch.tanh(ht)
    labels = (torch.rand(N, 5, generator=gen) < 0.35).double()
    labels[[3, 9]] = 0        # anchors without positives
    labels[12] = 1            # an anchor that shares a label with every labelled row
    return (fv, ft, hv, ht), labels


def _terms_and_grads(leaves, labels, sl, mining, world, gather_fn, count_sum):
    """Shares of J1..J5 and the total for rows ``sl`` of the replicated leaves, and the gradients
    of share * world_size w.r.t. every leaf (zeros where unused)."""
    local = [x[sl] for x in leaves]
    gathered = [gather_fn(x) for x in local]
    terms = cmfah_losses(*local, labels[sl], *gathered, gather(labels[sl]), sl.start, MARGIN,
                         mining=mining, weights=WEIGHTS, world_size=world, count_sum=count_sum)
    out = {}
    for key in KEYS:
        grads = torch.autograd.grad(terms[key] * world, leaves, retain_graph=True, allow_unused=True)
        out[key] = (terms[key].detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)])
    return out


def _reference():
    ref = {}
    for kind in ("sign", "gauss"):
        feats, labels = _batch(kind)
        for mining in ("all", "hard"):
            leaves = [x.clone().requires_grad_() for x in feats]
            ref[kind, mining] = _terms_and_grads(leaves, labels, slice(0, N), mining, 1,
                                                 lambda x: x, lambda c: c)
    return ref


def _worker(rank, world, out_path):
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    out = {}
    for kind in ("sign", "gauss"):
        feats, labels = _batch(kind)
        for mining in ("all", "hard"):
            # Every rank holds the same leaves, as DDP replicates parameters; rank r's loss
            # reaches rows sl directly and all rows through the autograd all-gather.
            leaves = [x.clone().requires_grad_() for x in feats]
            res = _terms_and_grads(leaves, labels, sl, mining, world,
                                   lambda x: gather(x, grad=True), all_reduce_sum)
            # Two all-reduces per case (gloo on a busy CPU is slow): shares summed, grads averaged.
            shares = all_reduce_sum(torch.stack([share for share, _ in res.values()]))
            grads = all_reduce_sum(torch.cat([g.reshape(-1) for _, gs in res.values() for g in gs])) / world
            grads = grads.split([g.numel() for _, gs in res.values() for g in gs])
            out[f"{kind}/{mining}"] = {k: (shares[i], [g.view_as(x) for g, x in zip(grads[4 * i:4 * i + 4], leaves)])
                                       for i, k in enumerate(res)}
    torch.save(out, f"{out_path}.{rank}")


def test_cmfah_terms_match_naive_composition():
    feats, labels = _batch("gauss")
    fv, ft, hv, ht = feats
    own = torch.arange(N)
    for mining in ("all", "hard"):
        got = cmfah_losses(fv, ft, hv, ht, labels, fv, ft, hv, ht, labels, 0, MARGIN, mining=mining,
                           weights=WEIGHTS)

        def trip(a, x, self_index=None):
            return naive_trip(a, labels, x, labels, MARGIN, self_index, mining)

        ref = {"j1": trip(fv, fv, own) + trip(ft, ft, own), "j2": trip(hv, hv, own) + trip(ht, ht, own),
               "j3": quantization_loss(hv, ht), "j4": trip(fv, ft) + trip(ft, fv),
               "j5": trip(hv, ht) + trip(ht, hv)}
        ref["loss"] = sum(w * ref[f"j{i + 1}"] for i, w in enumerate(WEIGHTS))
        for key in KEYS:
            assert ref[key] > 0
            torch.testing.assert_close(got[key], ref[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_terms_and_grads_match_single_process(tmp_path, world):
    ref = _reference()
    run_distributed(_worker, world, str(tmp_path / "out"))
    for rank in range(world):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        for (kind, mining), ref_terms in ref.items():
            for key, (share_sum, grads) in got[f"{kind}/{mining}"].items():
                ref_value, ref_grads = ref_terms[key]
                torch.testing.assert_close(share_sum, ref_value, rtol=1e-10, atol=1e-14)
                for g, r in zip(grads, ref_grads):
                    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward) and the op count."""

    def __init__(self):
        super().__init__()
        self.numel, self.mm = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("mining", ["all", "hard"])
@pytest.mark.parametrize("n, big_n, chunk", [(64, 8192, 256), (512, 4096, 128)])
def test_no_cubic_tensor(mining, n, big_n, chunk):
    """n N^2 float32 would be 17 GB (64 x 8192^2) or 34 GB (512 x 4096^2); every tensor of the
    forward and backward pass stays within two rows of (chunk, N + 1)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(n, 16, generator=gen).requires_grad_()
    x = torch.randn(big_n, 16, generator=gen).requires_grad_()
    la, lx = (torch.rand(n, 8, generator=gen) < 0.2).float(), (torch.rand(big_n, 8, generator=gen) < 0.2).float()
    with _LargestTensor() as mode:
        loss = triplet_loss(a, la, x, lx, MARGIN, mining=mining, chunk=chunk)
        loss.backward()
    assert torch.isfinite(loss) and loss > 0 and a.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert mode.mm >= 3 * -(-n // chunk)      # the backward pass's matmuls were seen too
    assert mode.numel <= 2 * min(n, chunk) * (big_n + 1) < n * big_n * big_n // 1000
