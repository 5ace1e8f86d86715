"""CMFAH's supervised hashing losses over a global batch (METHODS.md section 3).

Pure functions of tensors, like :mod:`xmdist.losses.hashing`: a method gathers features, hash
outputs and labels once (``gather(x, grad=True)``) and passes local and gathered tensors with this
rank's ``offset``. Every loss returns this rank's SHARE: the sum over ranks is the single-process
loss on the concatenated batch, and under DDP's gradient averaging ``share * world_size`` gives
the single-process gradient. Collectives come in as functions (``count_sum``: an all-reduce sum,
no gradient); the defaults are one process.

Shapes: ``n`` anchors on this rank (global rows ``offset .. offset + n``), ``N`` in the global
batch. ``fv``/``ft`` (n, d) features, ``hv``/``ht`` (n, K) real-valued hash outputs, ``labels``
(n, L) multi-hot; ``*_all`` the gathered (N, .) versions. ``s`` is the cosine similarity; a
positive of an anchor shares >= 1 label with it, a negative shares none.

``triplet_loss(mining="all")`` is the exact mean over all (anchor, positive, negative) triplets
without any (n, N, N) tensor: per anchor, negatives sorted by descending similarity with running
sums give ``sum_q [m - s_ap + s_aq]+ = P[k] - k (s_ap - m)`` (``k`` the number of negatives above
the threshold, found by ``searchsorted``, ``P[k]`` the sum of the ``k`` most similar):
O(n N log N) time, O(n N) memory, processed ``chunk`` anchors at a time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
INF = float("inf")


def _identity(x: Tensor) -> Tensor:
    return x


def _relevant(labels: Tensor, labels_all: Tensor) -> Tensor:
    """(n, N) True where row i shares >= 1 label with column j (multi-hot (n, L), (N, L));
    0/1 products are exact in float32, also under TF32."""
    return (labels.to(torch.float32) @ labels_all.to(torch.float32).t()) > 0


def _all_triplets(s: Tensor, pos: Tensor, neg: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Sum of ``[m - s_ap + s_aq]+`` over every (a, p, q) of these rows and the triplet count.

    ``s`` (c, N) similarities, ``pos``/``neg`` (c, N) masks. Keys ``-s`` of the negatives
    (non-negatives +inf, last) sort ascending, i.e. negatives by descending similarity; the
    number with ``s_aq > t`` (strictly: a negative at the threshold adds 0) is the count of keys
    below ``-t``. Summing the k largest directly (not total minus a prefix) avoids cancellation
    when few negatives violate the margin. Gradients: ``-k`` to s_ap, 1 to each violating s_aq.
    """
    keys, order = torch.where(neg, -s, INF).sort(dim=1)
    top = torch.where(neg.gather(1, order), -keys, 0.0)          # (c, N) descending, then zeros
    sums = F.pad(top.cumsum(dim=1), (1, 0))                       # (c, N + 1): sums[k] = top-k sum
    t = s - margin                                                # (c, N) threshold per positive
    k = torch.searchsorted(keys.detach(), -t.detach())            # (c, N) negatives with s_aq > t
    hinge = sums.gather(1, k) - k * t                             # (c, N) sum over q for each p
    count = (pos.sum(dim=1) * neg.sum(dim=1)).sum()
    return torch.where(pos, hinge, 0.0).sum(), count


def _hard_triplets(s: Tensor, pos: Tensor, neg: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Sum over anchors of ``[m - min_p s_ap + max_q s_aq]+`` and the number of anchors with both
    a positive and a negative. Ties share the gradient evenly (``amin``/``amax``)."""
    valid = pos.any(dim=1) & neg.any(dim=1)
    hardest = margin - torch.where(pos, s, INF).amin(dim=1) + torch.where(neg, s, -INF).amax(dim=1)
    return torch.relu(torch.where(valid, hardest, 0.0)).sum(), valid.sum()


def triplet_loss(anchors: Tensor, anchor_labels: Tensor, others: Tensor, other_labels: Tensor,
                 margin: float, *, self_index: Tensor | None = None, mining: str = "all",
                 count_sum: Callable[[Tensor], Tensor] = _identity, chunk: int = 256) -> Tensor:
    """This rank's share of ``trip(A, X)``: the mean of ``[m - s(A_a, X_p) + s(A_a, X_q)]+``
    over the valid triplets of the global batch (scalar).

    ``anchors`` (n, d) this rank's rows of A, ``others`` (N, d) all rows of X (gathered with
    gradient), labels (n, L)/(N, L) multi-hot. ``self_index`` (n,) long, within a modality:
    each anchor's own global row in ``others``, neither its positive nor its negative. An anchor
    without positives or negatives adds no triplet. ``mining="all"``: every (a, p, q);
    ``"hard"``: per anchor the lowest-similarity positive and the highest-similarity negative.
    Share = local hinge sum / global count (``count_sum`` all-reduces the int64 count; 0 -> 1,
    so an empty set gives 0 with a zero gradient). Memory O(chunk * N) per chunk of anchors.
    """
    if mining not in ("all", "hard"):
        raise ValueError(f"mining must be 'all' or 'hard', got {mining!r}")
    terms = _all_triplets if mining == "all" else _hard_triplets
    xn = F.normalize(others, dim=1)
    cols = torch.arange(others.shape[0], device=others.device)
    total, count = anchors.new_zeros(()), torch.zeros((), dtype=torch.int64, device=anchors.device)
    for lo in range(0, max(anchors.shape[0], 1), chunk):         # one pass even for n = 0: a graph
        s = F.normalize(anchors[lo:lo + chunk], dim=1) @ xn.t()   # (c, N)
        pos = _relevant(anchor_labels[lo:lo + chunk], other_labels)
        neg = ~pos
        if self_index is not None:
            own = self_index[lo:lo + chunk, None] == cols[None, :]
            pos, neg = pos & ~own, neg & ~own
        part, cnt = terms(s, pos, neg, margin)
        total, count = total + part, count + cnt
    return total / count_sum(count).clamp_min(1).to(total.dtype)


def quantization_loss(hv: Tensor, ht: Tensor, world_size: int = 1) -> Tensor:
    """This rank's share of ``J3 = mse(H_v, B) + mse(H_t, B)``, ``B = sign(H_v + H_t)`` (n, K)
    with sign(0) = +1 and no gradient through B; mse = local mean / world_size (equal n)."""
    with torch.no_grad():
        b = torch.where(hv + ht >= 0, 1.0, -1.0).to(hv.dtype)
    return (F.mse_loss(hv, b) + F.mse_loss(ht, b)) / world_size


def cmfah_losses(fv: Tensor, ft: Tensor, hv: Tensor, ht: Tensor, labels: Tensor,
                 fv_all: Tensor, ft_all: Tensor, hv_all: Tensor, ht_all: Tensor, labels_all: Tensor,
                 offset: int, margin: float, *, mining: str = "all",
                 weights: Sequence[float] = (1, 1, 1, 1, 1), world_size: int = 1,
                 count_sum: Callable[[Tensor], Tensor] = _identity) -> dict[str, Tensor]:
    """This rank's shares of CMFAH's J1..J5 and ``loss = alpha J1 + beta J2 + gamma J3 +
    delta J4 + phi J5`` (``weights``; METHODS 3). Within a modality (J1 features, J2 hashes) an
    anchor's own row ``offset + i`` is excluded; across modalities (J4 features, J5 hashes) an
    item's other view is its positive when it has a label. Shapes in the module docstring.
    """
    kw = dict(mining=mining, count_sum=count_sum)
    own = offset + torch.arange(fv.shape[0], device=fv.device)

    def within(a: Tensor, a_all: Tensor) -> Tensor:
        return triplet_loss(a, labels, a_all, labels_all, margin, self_index=own, **kw)

    def across(a: Tensor, x_all: Tensor) -> Tensor:
        return triplet_loss(a, labels, x_all, labels_all, margin, **kw)

    out = {"j1": within(fv, fv_all) + within(ft, ft_all),
           "j2": within(hv, hv_all) + within(ht, ht_all),
           "j3": quantization_loss(hv, ht, world_size),
           "j4": across(fv, ft_all) + across(ft, fv_all),
           "j5": across(hv, ht_all) + across(ht, hv_all)}
    out["loss"] = sum(w * out[f"j{i + 1}"] for i, w in enumerate(weights))
    return out


def discriminator_loss(d_real_logits: Tensor, d_fake_logits: Tensor, world_size: int = 1) -> Tensor:
    """Share of one discriminator's BCE: logits (n,) or (n, 1) on DETACHED features of its own
    modality (real, target 1) and of the other one (target 0). For ``D_v``: real = D_v(F_v),
    fake = D_v(F_t); for ``D_t`` the reverse. Local means / world_size."""
    real = F.binary_cross_entropy_with_logits(d_real_logits, torch.ones_like(d_real_logits))
    fake = F.binary_cross_entropy_with_logits(d_fake_logits, torch.zeros_like(d_fake_logits))
    return (real + fake) / world_size


def adversarial_generator_loss(logits_v_on_text: Tensor, logits_t_on_image: Tensor,
                               world_size: int = 1) -> Tensor:
    """Share of the generator's ``L_adv,G``: BCE towards 1 of ``D_v(F_t)`` and ``D_t(F_v)``
    (logits (n,) or (n, 1), features NOT detached), so the feature networks are rewarded when
    each discriminator takes the other modality for its own. Local means / world_size."""
    fool_v = F.binary_cross_entropy_with_logits(logits_v_on_text, torch.ones_like(logits_v_on_text))
    fool_t = F.binary_cross_entropy_with_logits(logits_t_on_image, torch.ones_like(logits_t_on_image))
    return (fool_v + fool_t) / world_size
