"""CMFAH model: co-attention against a hand computation, the ablation switches, shapes and
ranges, padding invariance, gradients, the pixel path and bf16 autocast (METHODS.md 3)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xmdist.data.decode import normalize_images
from xmdist.models.cmfah import CMFAHModel, ModalityDiscriminator, co_attention

B, M1, D_R, M2, VOCAB, E, BITS = 3, 49, 512, 12, 30, 32, 16
LENGTHS = (12, 5, 1)
SMALL = {"dim": 64, "feature_dim": 64, "text_channels": 16}  # where only the wiring matters


def _model(seed: int = 0, **kw) -> CMFAHModel:
    torch.manual_seed(seed)
    return CMFAHModel(torch.randn(VOCAB, E), BITS, region_dim=kw.pop("region_dim", D_R), **kw)


def _batch(seed: int = 1, lengths=LENGTHS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(M2)[None, :] < torch.tensor(lengths)[:, None]
    words = torch.randint(0, VOCAB, (len(lengths), M2), generator=g).masked_fill(~mask, VOCAB)
    return {"regions": torch.rand(len(lengths), M1, D_R, generator=g), "words": words, "word_mask": mask}


def _close(x: dict, y: dict, atol: float = 1e-6) -> None:
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------- co-attention


def test_co_attention_hand_case():
    """2 regions, 3 words, the third masked. c over the real words:
    c = [[cos((1,0),(1,0)), cos((1,0),(1,1))], [cos((0,1),(1,0)), cos((0,1),(1,1))]]
      = [[1, 1/sqrt2], [0, 1/sqrt2]]
    region scores sum_k c_ik = (1 + 1/sqrt2, 1/sqrt2) -> a = (e, 1) / (e + 1)
    word scores sum_i c_ik = (1, sqrt2)              -> b = (e, e^sqrt2, 0) / (e + e^sqrt2)."""
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]]])
    mask = torch.tensor([[True, True, False]])
    a, b = co_attention(v, t, mask)
    e, r2 = math.e, math.sqrt(2)
    torch.testing.assert_close(a, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    torch.testing.assert_close(b, torch.tensor([[e / (e + e ** r2), e ** r2 / (e + e ** r2), 0.0]]))
    assert b[0, 2].item() == 0.0 and a.dtype == b.dtype == torch.float32
    t2 = t.clone()
    t2[0, 2] = torch.tensor([-7.0, 0.5])  # a masked word's vector enters nothing
    a2, b2 = co_attention(v, t2, mask)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_ablation_switches_give_the_stated_weights():
    model, batch = _model(**SMALL), _batch()
    mask = batch["word_mask"]
    uniform_a = torch.full((B, M1), 1 / M1)
    uniform_b = mask.float() / torch.tensor(LENGTHS, dtype=torch.float32)[:, None]
    out = {}
    for mode in ("co", "none", "image", "text"):
        model.attention = mode
        out[mode] = model(batch)
    co = out["co"]
    v, (t, _) = model.regions(batch["regions"]), model.words(batch["words"], mask)
    a, b = co_attention(v, t, mask)
    torch.testing.assert_close(co["region_weights"], a)
    torch.testing.assert_close(co["word_weights"], b)
    assert not torch.allclose(co["region_weights"], uniform_a)
    assert not torch.allclose(co["word_weights"][:2], uniform_b[:2])  # row 2 has 1 word: b = 1
    torch.testing.assert_close(out["none"]["region_weights"], uniform_a)
    torch.testing.assert_close(out["none"]["word_weights"], uniform_b)
    torch.testing.assert_close(out["image"]["region_weights"], co["region_weights"])  # -ia
    torch.testing.assert_close(out["image"]["word_weights"], uniform_b)
    torch.testing.assert_close(out["text"]["region_weights"], uniform_a)  # -ta
    torch.testing.assert_close(out["text"]["word_weights"], co["word_weights"])
    for o in out.values():
        assert (o["word_weights"][~mask] == 0).all()
        torch.testing.assert_close(o["region_weights"].sum(1), torch.ones(B))
        torch.testing.assert_close(o["word_weights"].sum(1), torch.ones(B))


def test_masked_words_change_nothing():
    model, batch = _model(**SMALL), _batch()
    ref = model(batch)
    other = dict(batch, words=batch["words"].masked_fill(~batch["word_mask"], 7))
    _close(ref, model(other), atol=0)
    with torch.no_grad():  # a trainable table whose padding row moved: still zero at the slots
        model.embed.weight[model.pad_index] = 3.0
    _close(ref, model(batch), atol=0)


def test_single_modality_encoders_use_uniform_weights():
    model, batch = _model(**SMALL), _batch()
    x, w, m = batch["regions"], batch["words"], batch["word_mask"]
    co = model(batch)
    torch.testing.assert_close(model.encode_image(x, w, m), co["hv"])
    torch.testing.assert_close(model.encode_text(w, m, x), co["ht"])
    model.attention = "none"
    none = model(batch)
    model.attention = "co"
    torch.testing.assert_close(model.encode_image(x), none["hv"])
    torch.testing.assert_close(model.encode_text(w, m), none["ht"])


# ---------------------------------------------------------------- shapes, padding, gradients


@pytest.mark.parametrize("readout", ["mean", "last"])
def test_shapes_ranges_and_text_state_at_last_real_word(readout):
    model, batch = _model(readout=readout), _batch()
    out = model(batch)
    assert out["fv"].shape == out["ft"].shape == (B, 512)
    assert out["hv"].shape == out["ht"].shape == (B, BITS)
    assert out["region_weights"].shape == (B, M1) and out["word_weights"].shape == (B, M2)
    for k, x in out.items():
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), k
    assert (out["hv"].abs() < 1).all() and (out["ht"].abs() < 1).all()
    for i, n in enumerate(LENGTHS):  # each text alone, cut at its length: the same pair outputs
        alone = model({"regions": batch["regions"][i:i + 1], "words": batch["words"][i:i + 1, :n],
                       "word_mask": batch["word_mask"][i:i + 1, :n]})
        for k in ("fv", "ft", "hv", "ht", "region_weights"):
            torch.testing.assert_close(alone[k][0], out[k][i], atol=1e-5, rtol=1e-5, msg=k)
        torch.testing.assert_close(alone["word_weights"][0], out["word_weights"][i, :n])


@pytest.mark.parametrize("freeze", [True, False])
def test_gradients(freeze):
    model, batch = _model(freeze_words=freeze), _batch()
    out = model(batch)
    g = torch.Generator().manual_seed(2)
    loss = sum((out[k] * torch.randn(out[k].shape, generator=g)).sum() for k in ("fv", "ft", "hv", "ht"))
    loss.backward()
    names = ["region_proj.weight", "text_cnn.fc.weight", "lstm_v.weight_ih_l0", "lstm_v.weight_hh_l0",
             "lstm_t.weight_ih_l0", "lstm_t.weight_hh_l0", "hash_v.weight", "hash_t.weight"]
    names += [f"text_cnn.convs.{i}.weight" for i in range(3)]
    params = dict(model.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    emb = model.embed.weight
    if freeze:
        assert not emb.requires_grad and emb.grad is None
    else:
        assert emb.grad[batch["words"][batch["word_mask"]]].abs().sum() > 0
        assert (emb.grad[model.pad_index] == 0).all()


def test_bad_masks_and_settings_are_refused():
    model, batch = _model(**SMALL), _batch()
    empty = batch["word_mask"].clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model(dict(batch, word_mask=empty))
    holes = batch["word_mask"].clone()
    holes[0, 3] = False
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        model.encode_text(batch["words"], holes)
    with pytest.raises(ValueError, match="attention"):
        _model(attention="cross")


# ---------------------------------------------------------------- pixel path, autocast, D


class _Trunk(nn.Module):
    """Stand-in for a trainable VGG cut at pool5: 64 px -> {"pool5": (B, 4, 512)}."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 512, 32, stride=32)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen = x
        return {"pool5": self.conv(x).flatten(2).transpose(1, 2)}


def test_pixel_path_forward_and_backward():
    torch.manual_seed(0)
    trunk = _Trunk()
    model = CMFAHModel(torch.randn(VOCAB, E), BITS, trunk=trunk, text_channels=32)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    batch = _batch(lengths=(4, 2))
    out = model({"images": images, "words": batch["words"], "word_mask": batch["word_mask"]})
    torch.testing.assert_close(trunk.seen, normalize_images(images))
    assert out["region_weights"].shape == (2, 4) and out["hv"].shape == (2, BITS)
    (out["hv"].sum() + out["ht"].sum() + out["fv"].sum()).backward()
    assert trunk.conv.weight.grad is not None and trunk.conv.weight.grad.abs().sum() > 0
    assert model.encode_image(images).shape == (2, BITS)


def test_bf16_autocast_outputs_float32():
    model, batch = _model(**SMALL), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    for k, x in out.items():
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), k
    torch.testing.assert_close(out["word_weights"].sum(1), torch.ones(B))
    assert (out["word_weights"][~batch["word_mask"]] == 0).all()


def test_discriminators():
    torch.manual_seed(0)
    d_v, d_t = ModalityDiscriminator(512), ModalityDiscriminator(512)
    layers = [m for m in d_v.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(512, 256), (256, 128), (128, 1)]
    assert sum(isinstance(m, nn.LeakyReLU) for m in d_v.net) == 2
    assert not set(map(id, d_v.parameters())) & set(map(id, d_t.parameters()))
    f = torch.randn(5, 512)
    assert d_v(f).shape == (5,) and d_v(f).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d_t(f).dtype == torch.float32


@pytest.mark.parametrize("readout", ["mean", "last"])
def test_readout_by_hand(readout):
    # F_v, F_t from the LSTMs run by hand on each pair's weighted sequence (text: its real words only)
    model, batch = _model(readout=readout), _batch()
    out = model(batch)
    with torch.no_grad():
        v = model.regions(batch["regions"])
        t, _ = model.words(batch["words"], batch["word_mask"])
        for i, n in enumerate(LENGTHS):
            seq_v = (out["region_weights"][i, :, None] * M1) * v[i]
            seq_t = (out["word_weights"][i, :n, None] * n) * t[i, :n]
            for seq, lstm, f in ((seq_v, model.lstm_v, out["fv"][i]), (seq_t, model.lstm_t, out["ft"][i])):
                states, _ = lstm(seq[None])
                want = states[0].mean(0) if readout == "mean" else states[0, -1]
                torch.testing.assert_close(f, want, atol=1e-5, rtol=1e-5)


def test_readout_must_be_known():
    with pytest.raises(ValueError, match="readout"):
        _model(readout="max")
