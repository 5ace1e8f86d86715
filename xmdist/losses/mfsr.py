"""mFSR losses: modality, specific, adversarial image and caption terms.

Pure functions of tensors (no process group). The semantic loss ``L_se`` is
:func:`xmdist.losses.contrastive.vse_loss` on the ``se`` vectors.

Two kinds of term:
- Global-batch terms (:func:`modality_loss`, :func:`specific_loss`) return this rank's
  SHARE: summed over ranks it equals the loss of the concatenated global batch, and with
  the autograd all-gather so do its gradients (like ``vse_loss``). A single process,
  local == global, is the reference.
- Local terms (:func:`discriminator_loss`, :func:`generator_loss`, :func:`caption_loss`)
  are means over this rank's samples; DDP's gradient averaging turns them into the mean of
  the per-rank losses (equal to the global mean when ranks hold equal batches).

Shapes: ``n`` pairs on this rank, ``N`` in the global batch, ``d`` the part dimension.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modality_loss(v_mo: torch.Tensor, l_mo: torch.Tensor, v_mo_all: torch.Tensor,
                  l_mo_all: torch.Tensor, delta: float) -> torch.Tensor:
    """This rank's share of
    ``L_mo = mean_i(||v_mo_i - m_v||^2 + ||l_mo_i - m_l||^2) + [delta - ||m_v - m_l||]_+^2``.

    ``v_mo``/``l_mo`` (n, d) local modality vectors; ``v_mo_all``/``l_mo_all`` (N, d) the
    gathered ones (with gradient), whose means are ``m_v``, ``m_l``. Share:
    ``sum_{local i}(||v_i - m_v||^2 + ||l_i - m_l||^2) / N + (n / N) * margin_term``. The
    weights n/N sum to 1 over ranks, so the shares sum to ``L_mo`` (with equal batches the
    margin term is simply divided by the world size).
    """
    big_n, n = v_mo_all.shape[0], v_mo.shape[0]
    m_v, m_l = v_mo_all.mean(0), l_mo_all.mean(0)  # (d,)
    spread = ((v_mo - m_v).pow(2).sum() + (l_mo - m_l).pow(2).sum()) / big_n
    margin = (delta - (m_v - m_l).norm()).clamp(min=0).pow(2)
    return spread + margin * (n / big_n)


def specific_loss(v_se: torch.Tensor, v_sp: torch.Tensor, l_se: torch.Tensor, l_sp: torch.Tensor,
                  global_n: int) -> torch.Tensor:
    """This rank's share of ``L_sp = mean_i(cos(v_se_i, v_sp_i)^2 + cos(l_se_i, l_sp_i)^2)``.

    All inputs (n, d) local; share = local sum / ``global_n`` (N). Each pair costs 0 when
    its semantic and specific parts are orthogonal and 2 when they are parallel.
    """
    cos_v = F.cosine_similarity(v_se, v_sp, dim=1)
    cos_l = F.cosine_similarity(l_se, l_sp, dim=1)
    return (cos_v.pow(2).sum() + cos_l.pow(2).sum()) / global_n


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       mismatch_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Discriminator BCE, per-rank mean: real (n,) -> 1, fake (n,) -> 0.

    With ``mismatch_logits`` (n,) (D2's mismatched real pairs, also -> 0) the two negative
    kinds share the negative half, as in GAN-CLS (Reed et al. 2016):
    ``BCE(real, 1) + (BCE(fake, 0) + BCE(mismatch, 0)) / 2``; without it
    ``BCE(real, 1) + BCE(fake, 0)``. Each BCE is a mean over its logits.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if mismatch_logits is None:
        return real + fake
    mismatch = F.binary_cross_entropy_with_logits(mismatch_logits, torch.zeros_like(mismatch_logits))
    return real + (fake + mismatch) / 2


def generator_loss(d1_fake_logits: torch.Tensor, d2_fake_logits: torch.Tensor,
                   real_features: torch.Tensor, fake_features: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """``L_G = -log D1(G) - log D2(x, G) + beta * ||mean(real_feat) - mean(fake_feat)||^2``.

    Non-saturating form: ``-log D`` is BCE against label 1, a mean over the (n,) logits.
    ``real_features``/``fake_features`` (n, F) are D1's penultimate features of the real and
    generated images, averaged over this rank's batch; the real ones are the target the
    generator matches, so no gradient flows into them.
    """
    adv = F.binary_cross_entropy_with_logits(d1_fake_logits, torch.ones_like(d1_fake_logits)) \
        + F.binary_cross_entropy_with_logits(d2_fake_logits, torch.ones_like(d2_fake_logits))
    matching = (real_features.detach().mean(0) - fake_features.mean(0)).pow(2).sum()
    return adv + beta * matching


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy of ``logits`` (n, L-1, V) against ``tokens[:, 1:]`` ((n, L), 0 =
    padding, ignored): the mean over this rank's real target tokens, <end> included."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=0)
