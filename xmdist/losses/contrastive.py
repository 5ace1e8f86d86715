"""VSE++ hinge losses over a global batch, computed for this rank's rows only.

Pure functions of tensors (no process group): a method gathers embeddings once and passes
local and global tensors; image ids locate the local pairs among the global ones. Summing the returned value over ranks gives
the loss of the whole global batch, so a single process with local == global
is the reference the distributed computation must equal.

Shapes: ``img``/``txt`` (n, d) local pairs, ``img_all``/``txt_all`` (N, d) gathered pairs,
``ids``/``ids_all`` (n,)/(N,) image ids. Pair i is (img[i], txt[i]); pairs sharing an image id
(several captions of one image) are positives of each other, never negatives.
"""
from __future__ import annotations

import torch


def hinge_terms(scores: torch.Tensor, positive: torch.Tensor, same: torch.Tensor,
                margin: float, max_violation: bool) -> torch.Tensor:
    """Per-row hinge cost: ``scores`` (n, N), ``positive`` (n,) the row's own pair score,
    ``same`` (n, N) True where column shares the row's image (excluded from negatives)."""
    cost = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(same, 0.0)
    return cost.max(dim=1).values if max_violation else cost.sum(dim=1)


def vse_loss(img: torch.Tensor, txt: torch.Tensor, img_all: torch.Tensor, txt_all: torch.Tensor,
             ids: torch.Tensor, ids_all: torch.Tensor, margin: float = 0.2,
             max_violation: bool = True, reduction: str = "sum") -> torch.Tensor:
    """This rank's share of the VSE loss over the global batch.

    Image->text: rows ``offset..offset+n`` of ``S = img_all @ txt_all.T`` (each local image
    against every caption). Text->image: the same columns of ``S`` (each local caption against
    every image). Memory O(n*N). ``reduction="sum"`` is the paper's; ``"mean"`` divides by the
    global batch N, which scales gradients by 1/N, so the learning rate must grow accordingly.
    """
    big_n = img_all.shape[0]
    same = ids[:, None] == ids_all[None, :]  # (n, N)
    pos = (img * txt).sum(dim=1)  # (n,) == diagonal entries S[offset + i, offset + i]
    i2t = img @ txt_all.t()  # (n, N): local rows of S
    t2i = txt @ img_all.t()  # (n, N): local columns of S, transposed
    loss = hinge_terms(i2t, pos, same, margin, max_violation).sum() \
        + hinge_terms(t2i, pos, same, margin, max_violation).sum()
    if reduction == "mean":
        loss = loss / big_n
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return loss
