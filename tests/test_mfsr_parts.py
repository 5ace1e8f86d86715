"""mFSR parts: module shapes and ranges, loss values against hand computations, and the
global-batch terms (L_se, L_mo, L_sp) at world sizes 1, 2, 4 against a single process."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_distributed
from xmdist.data.decode import normalize_images
from xmdist.dist import all_reduce_sum, gather
from xmdist.losses.contrastive import vse_loss
from xmdist.losses.mfsr import (caption_loss, discriminator_loss, generator_loss, modality_loss,
                                specific_loss)
from xmdist.models.mfsr import (CaptionDecoder, Discriminator, FeatureSeparation, Generator,
                                MFSRModel, target_images)

DIM, SIZE, VOCAB = 16, 32, 20
N, DELTA = 16, 1.5  # above the gap between the test's modality means: the margin term is active


def _unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _tokens(b: int, max_words: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions <start> w.. <end>, 0-padded, like ``xmdist.data.vocab.pad_captions``."""
    lengths = torch.randint(3, max_words + 3, (b,), generator=g)
    lengths[0] = max_words + 2  # the longest fills the width
    tokens = torch.zeros(b, max_words + 2, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, n - 1] = 1, 2
        tokens[i, 1:n - 1] = torch.randint(4, VOCAB, (n - 2,), generator=g)
    return tokens, lengths


# ---- modules ---------------------------------------------------------------------------------

def test_feature_separation_gives_three_unit_vectors():
    out = FeatureSeparation(32, DIM)(torch.randn(5, 32))
    assert set(out) == {"mo", "se", "sp"}
    for v in out.values():
        assert v.shape == (5, DIM) and v.dtype == torch.float32
        torch.testing.assert_close(v.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("trunk", FeatureSeparation.TRUNKS)
def test_feature_separation_trunks(trunk):
    torch.manual_seed(0)
    sep = FeatureSeparation(32, DIM, trunk=trunk)
    x = torch.randn(6, 32)
    for v in sep(x).values():
        torch.testing.assert_close(v.norm(dim=1), torch.ones(6))
    h = sep.trunk(x)
    if trunk == "relu":
        assert (h >= 0).all() and (h == 0).any()
    elif trunk == "leaky":
        assert (h < 0).any()
        torch.testing.assert_close(h, F.leaky_relu(sep.trunk[0](x), 0.1))
    else:  # an affine map of the feature: h(a) + h(b) - h(0) = h(a + b)
        a, b, z = x[:3], x[3:], torch.zeros(3, 32)
        torch.testing.assert_close(sep.trunk(a) + sep.trunk(b) - sep.trunk(z), sep.trunk(a + b))


def test_feature_separation_orthogonal_init_keeps_the_feature_scale():
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    orth = FeatureSeparation(32, 32, trunk="linear", init="orthogonal")
    for layer in (orth.trunk[0], *orth.heads.values()):
        assert (layer.bias == 0).all()
        torch.testing.assert_close(layer.weight @ layer.weight.T, torch.eye(32), atol=1e-5, rtol=0)
    with torch.no_grad():  # orthogonal maps without bias: the norm of every row is kept
        h = orth.heads["se"](orth.trunk(x))
        torch.testing.assert_close(h.norm(dim=1), x.norm(dim=1), atol=1e-4, rtol=1e-4)
        default = FeatureSeparation(32, 32, trunk="linear")
        assert default.heads["se"](default.trunk(x)).norm(dim=1).mean() < 0.6 * x.norm(dim=1).mean()
    with pytest.raises(ValueError, match="default, orthogonal"):
        FeatureSeparation(32, DIM, init="xavier")


def test_residual_separation_starts_as_the_feature():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    sep = FeatureSeparation(32, 32, residual="all")
    for v in sep(x).values():  # heads at zero: every part is the normalised feature
        torch.testing.assert_close(v, F.normalize(x, dim=-1))
    loss = sep(x)["se"].sum() + 0.0
    loss.backward()
    assert sep.heads["se"].weight.grad.abs().sum() > 0  # the correction learns from step 0
    only_se = FeatureSeparation(32, 32, residual="se")(x)  # mo and sp: the paper's heads
    torch.testing.assert_close(only_se["se"], F.normalize(x, dim=-1))
    for p in ("mo", "sp"):
        assert (only_se[p] - F.normalize(x, dim=-1)).abs().max() > 0.1
    with pytest.raises(ValueError, match="part size"):
        FeatureSeparation(32, 16, residual="se")
    with pytest.raises(ValueError, match="none, se, all"):
        FeatureSeparation(32, 32, residual=True)


def test_feature_separation_refuses_an_unknown_trunk():
    with pytest.raises(ValueError, match="relu, leaky, linear"):
        FeatureSeparation(32, DIM, trunk="gelu")


@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_discriminators(size):
    fake = Generator(3 * DIM, ngf=8, out_size=size)(torch.randn(4, 3 * DIM))
    assert fake.shape == (4, 3, size, size)
    assert fake.min() >= -1 and fake.max() <= 1
    d1 = Discriminator(ndf=8, in_channels=3, in_size=size)(fake)
    d2 = Discriminator(ndf=8, in_channels=6, in_size=size)(torch.cat([fake, fake], 1))
    for d in (d1, d2):
        assert d["logits"].shape == (4,)
        assert d["features"].shape == (4, 8 * 2 ** (size.bit_length() - 4) * 16)


def test_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="out_size"):
        Generator(8, out_size=48)
    with pytest.raises(ValueError, match="in_size"):
        Discriminator(in_size=4)


def _model(**switches) -> MFSRModel:
    torch.manual_seed(0)
    return MFSRModel(VOCAB, "small_cnn", embed_dim=32, sep_dim=DIM, word_dim=8, weights=None,
                     image_size=SIZE, ngf=8, decoder_hidden=16, **switches).eval()


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens, lengths = _tokens(b, 6, g)
    return {"images": torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
            "tokens": tokens, "lengths": lengths, "image_ids": torch.arange(b)}


def test_model_outputs_and_retrieval_encoders():
    model, batch = _model(), _batch()
    with torch.no_grad():
        out = model(batch)
        img, txt = model.encode_image(batch["images"]), model.encode_text(batch["tokens"], batch["lengths"])
    for key in ("img_mo", "img_se", "img_sp", "txt_mo", "txt_se", "txt_sp"):
        assert out[key].shape == (4, DIM)
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(4))
    assert out["fake"].shape == (4, 3, SIZE, SIZE) and out["fake"].abs().max() <= 1
    assert out["cap_logits"].shape == (4, batch["tokens"].shape[1] - 1, VOCAB)
    torch.testing.assert_close(img, out["img_se"])
    torch.testing.assert_close(txt, out["txt_se"])


def test_switches_drop_the_reconstruction_networks():
    model = _model(image_recon=False, caption_recon=False)
    assert model.generator is None and model.decoder is None
    with torch.no_grad():
        out = model(_batch())
    assert "fake" not in out and "cap_logits" not in out


def test_target_images_from_uint8_and_normalised_floats_agree():
    images = _batch()["images"]
    from_uint8 = target_images(images, 16)
    assert from_uint8.shape == (4, 3, 16, 16)
    assert from_uint8.min() >= -1 and from_uint8.max() <= 1
    torch.testing.assert_close(target_images(normalize_images(images), 16), from_uint8)
    torch.testing.assert_close(target_images(images, SIZE), images.float() / 127.5 - 1)


def test_caption_decoder_overfits_one_batch():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    tokens, lengths = _tokens(4, 5, g)
    code = torch.randn(4, 12, generator=g)
    dec = CaptionDecoder(VOCAB, 12, word_dim=16, hidden=32)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = caption_loss(dec(code, tokens, lengths), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    ids = dec.greedy(code, max_len=9)
    assert ids.shape == (4, 9) and ids.min() >= 0 and ids.max() < VOCAB
    # Overfitted, greedy decoding reproduces the captions, then pads after <end>.
    for i, n in enumerate(lengths.tolist()):
        assert ids[i, :n - 1].tolist() == tokens[i, 1:n].tolist()
        assert (ids[i, n - 1:] == 0).all()


# ---- losses by hand --------------------------------------------------------------------------

def test_caption_loss_by_hand_and_padding_ignored():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.5, 0.5, 3.0]]])  # (1, 2, V=3)
    tokens = torch.tensor([[1, 2, 0]])  # <start> <end> <pad>: one real target (2)
    by_hand = -math.log(math.exp(1.0) / (math.exp(2.0) + 1 + math.exp(1.0)))
    assert caption_loss(logits, tokens).item() == pytest.approx(by_hand)
    changed = logits.clone()
    changed[0, 1] = torch.tensor([9.0, -4.0, 0.0])  # the padded step
    assert caption_loss(changed, tokens).item() == pytest.approx(by_hand)


def _bce(logit: float, label: int) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -math.log(p if label else 1 - p)


def test_discriminator_loss_by_hand():
    real, fake, mis = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0]), torch.tensor([1.0, 0.0])
    real_t = (_bce(2.0, 1) + _bce(-1.0, 1)) / 2
    fake_t = (_bce(0.5, 0) + _bce(-3.0, 0)) / 2
    mis_t = (_bce(1.0, 0) + _bce(0.0, 0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(real_t + fake_t)
    assert discriminator_loss(real, fake, mis).item() == pytest.approx(real_t + (fake_t + mis_t) / 2)


def test_generator_loss_by_hand():
    d1, d2 = torch.tensor([0.3, -2.0]), torch.tensor([1.5, 0.0])
    real = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)  # mean (2, 1)
    fake = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)  # mean (0.5, 1)
    adv = (_bce(0.3, 1) + _bce(-2.0, 1)) / 2 + (_bce(1.5, 1) + _bce(0.0, 1)) / 2
    loss = generator_loss(d1, d2, real, fake, beta=0.5)
    assert loss.item() == pytest.approx(adv + 0.5 * 1.5 ** 2)
    loss.backward()
    assert real.grad is None  # the real features are the target, not trained by G's loss
    torch.testing.assert_close(fake.grad, torch.tensor([[-0.75, 0.0], [-0.75, 0.0]]))


def test_specific_loss_orthogonal_and_identical():
    se = torch.eye(4)[:3]  # (3, 4)
    sp = torch.eye(4)[1:]  # orthogonal row by row
    assert specific_loss(se, sp, se, sp, global_n=3).item() == pytest.approx(0.0)
    assert specific_loss(se, 3 * se, se, se, global_n=3).item() == pytest.approx(2.0)


def test_modality_loss_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean (.5, .5); squared spreads .5 each
    l = torch.tensor([[0.0, -1.0], [0.0, -1.0]])  # mean (0, -1); spreads 0
    gap = math.hypot(0.5, 1.5)
    assert modality_loss(v, l, v, l, delta=2.0).item() == pytest.approx(1.0 / 2 + (2.0 - gap) ** 2)
    assert modality_loss(v, l, v, l, delta=1.0).item() == pytest.approx(0.5)  # means far enough apart


# ---- global-batch terms: ranks' shares and gradients equal one process -----------------------

def _vectors():
    g = torch.Generator().manual_seed(0)
    names = ("img_se", "txt_se", "img_mo", "txt_mo", "img_sp", "txt_sp")
    vecs = {k: _unit(N, DIM, g=g) for k in names}
    vecs["img_mo"] = F.normalize(vecs["img_mo"] + 0.5, dim=1)  # the two modalities' means differ
    ids = torch.arange(N) // 2  # two captions per image, and one image across ranks
    ids[5] = ids[12]
    return vecs, ids


def _shares(v: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's L_se, L_mo, L_sp shares from local tensors ``v`` (gathered with gradient)."""
    g = {k: gather(x, grad=True) for k, x in v.items() if k not in ("img_sp", "txt_sp")}
    se = vse_loss(v["img_se"], v["txt_se"], g["img_se"], g["txt_se"], ids, gather(ids),
                  margin=0.2, max_violation=True)
    mo = modality_loss(v["img_mo"], v["txt_mo"], g["img_mo"], g["txt_mo"], delta=DELTA)
    sp = specific_loss(v["img_se"], v["img_sp"], v["txt_se"], v["txt_sp"], global_n=N)
    return {"se": se, "mo": mo, "sp": sp}


def _naive(v: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The specified formulas written out on the whole batch (vse_loss has its own tests)."""
    m_v, m_l = v["img_mo"].mean(0), v["txt_mo"].mean(0)
    mo = ((v["img_mo"] - m_v) ** 2).sum(1).mean() + ((v["txt_mo"] - m_l) ** 2).sum(1).mean() \
        + torch.relu(DELTA - torch.linalg.vector_norm(m_v - m_l)) ** 2
    sp = (F.cosine_similarity(v["img_se"], v["img_sp"]) ** 2
          + F.cosine_similarity(v["txt_se"], v["txt_sp"]) ** 2).mean()
    se = vse_loss(v["img_se"], v["txt_se"], v["img_se"], v["txt_se"], ids, ids,
                  margin=0.2, max_violation=True)
    return {"se": se, "mo": mo, "sp": sp}


def _loss_and_grads(terms, vecs, ids):
    """Each term's value and the gradients of all vectors, one backward per term."""
    result = {}
    for term in ("se", "mo", "sp"):
        leaves = {k: x.clone().requires_grad_() for k, x in vecs.items()}
        loss = terms(leaves, ids)[term]
        loss.backward()
        result[term] = (loss.detach(), {k: x.grad if x.grad is not None else torch.zeros_like(x)
                                        for k, x in leaves.items()})
    return result


def _worker(rank, world, out_path):
    vecs, ids = _vectors()
    n = N // world
    local = {k: x[rank * n:(rank + 1) * n] for k, x in vecs.items()}
    got = _loss_and_grads(_shares, local, ids[rank * n:(rank + 1) * n])
    torch.save({t: (all_reduce_sum(loss), grads) for t, (loss, grads) in got.items()}, f"{out_path}.{rank}")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_terms_match_single_process(tmp_path, world):
    vecs, ids = _vectors()
    ref = _loss_and_grads(_naive, vecs, ids)
    assert ref["se"][0] > 0 and ref["sp"][0] > 0
    assert (vecs["img_mo"].mean(0) - vecs["txt_mo"].mean(0)).norm() < DELTA
    run_distributed(_worker, world, str(tmp_path / "out"))
    n = N // world
    for rank in range(world):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        for term, (ref_loss, ref_grads) in ref.items():
            torch.testing.assert_close(got[term][0], ref_loss, rtol=1e-12, atol=1e-12)
            for k, g in ref_grads.items():
                torch.testing.assert_close(got[term][1][k], g[rank * n:(rank + 1) * n], rtol=1e-12,
                                           atol=1e-12, msg=lambda m: f"{term} d/d{k} rank {rank}: {m}")
