"""VSE++ over the global batch: distributed loss and gradients equal the single-process ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from conftest import run_distributed
from xmdist.dist import all_reduce_sum, gather
from xmdist.losses.contrastive import vse_loss

N, D = 16, 8


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    ids = torch.arange(N) // 2  # pairs (0,1), (2,3)...: two captions of one image each
    ids[5] = ids[12]  # and one image whose captions sit on different ranks
    return img, txt, ids


def _reference(max_violation: bool, reduction: str):
    img, txt, ids = _batch()
    img.requires_grad_(), txt.requires_grad_()
    loss = vse_loss(img, txt, img, txt, ids, ids, margin=0.2, max_violation=max_violation, reduction=reduction)
    loss.backward()
    return loss.detach(), img.grad, txt.grad


def _worker(rank, world, max_violation, reduction, out_path):
    img, txt, ids = _batch()
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    img_l, txt_l, ids_l = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_(), ids[sl]
    loss = vse_loss(img_l, txt_l, gather(img_l, grad=True), gather(txt_l, grad=True), ids_l, gather(ids_l),
                    margin=0.2, max_violation=max_violation, reduction=reduction)
    loss.backward()
    total = all_reduce_sum(loss.detach())
    torch.save({"loss": total, "img_grad": gather(img_l.grad), "txt_grad": gather(txt_l.grad)},
               f"{out_path}.{rank}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("max_violation", [True, False])
def test_global_loss_and_grads_match_single_process(tmp_path, world, max_violation):
    ref_loss, ref_img, ref_txt = _reference(max_violation, "sum")
    run_distributed(_worker, world, max_violation, "sum", str(tmp_path / "out"))
    for rank in range(world):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["img_grad"], ref_img, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["txt_grad"], ref_txt, rtol=1e-12, atol=1e-12)


def test_mean_reduction_divides_by_global_batch(tmp_path):
    ref_sum = _reference(True, "sum")[0]
    ref_mean, ref_img, _ = _reference(True, "mean")
    torch.testing.assert_close(ref_mean, ref_sum / N)
    run_distributed(_worker, 2, True, "mean", str(tmp_path / "out"))
    got = torch.load(f"{tmp_path / 'out'}.0", weights_only=True)
    torch.testing.assert_close(got["loss"], ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["img_grad"], ref_img, rtol=1e-12, atol=1e-12)


def test_same_image_pairs_are_not_negatives():
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    txt = img.clone()
    # Pairs 0 and 1 are two captions of one image: identical embeddings must cost nothing.
    ids = torch.tensor([7, 7, 9])
    assert vse_loss(img, txt, img, txt, ids, ids, margin=0.2).item() == pytest.approx(0.0)
    # Were they different images, each would violate the margin against the other.
    ids = torch.tensor([7, 8, 9])
    assert vse_loss(img, txt, img, txt, ids, ids, margin=0.2).item() == pytest.approx(4 * 0.2)


def test_max_violation_takes_hardest_negative_only():
    img = torch.eye(3, dtype=torch.float64)
    txt = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.5, 0, 0.5]], dtype=torch.float64)
    ids = torch.arange(3)
    s = img @ txt.t()
    by_hand = sum(max(max(0.2 + s[i, j] - s[i, i], 0) for j in range(3) if j != i) for i in range(3)) \
        + sum(max(max(0.2 + s[j, i] - s[i, i], 0) for j in range(3) if j != i) for i in range(3))
    assert vse_loss(img, txt, img, txt, ids, ids, margin=0.2).item() == pytest.approx(float(by_hand))


def _ddp_worker(rank, world, out_path):
    """Trainer-style step: DDP averages gradients, so the rank's loss share is scaled by world."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D, D).double()
    feats, _, ids = _batch(1)
    ddp = DistributedDataParallel(model)
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    emb = F.normalize(ddp(feats[sl]), dim=1)
    txt = emb.flip(0).roll(1, 0)  # any second modality that depends on the parameters
    loss = vse_loss(emb, txt, gather(emb, grad=True), gather(txt, grad=True), ids[sl], gather(ids[sl]))
    (loss * world).backward()
    torch.save({"w": model.weight.grad}, f"{out_path}.{rank}")


def test_ddp_parameter_gradients_are_exact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(D, D).double()
    feats, _, ids = _batch(1)
    n = N // 2
    embs = F.normalize(model(feats), dim=1)
    txts = torch.cat([embs[r * n:(r + 1) * n].flip(0).roll(1, 0) for r in range(2)])
    vse_loss(embs, txts, embs, txts, ids, ids).backward()
    run_distributed(_ddp_worker, 2, str(tmp_path / "out"))
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        torch.testing.assert_close(got["w"], model.weight.grad, rtol=1e-10, atol=1e-12)
