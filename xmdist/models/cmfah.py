"""CMFAH: region and word features, cross-modal co-attention, LSTMs, hash layers (METHODS.md 3).

Architecture only; the losses are in :mod:`xmdist.losses.cmfah`. Shapes: ``B`` pairs, ``m1``
regions of ``d_r`` (VGG19 pool5: 49 x 512 at 224 px), ``m2`` word slots, common width ``d``,
LSTM width ``d_f``, ``K`` bits.

* Image: regions (B, m1, d_r), or uint8 images (B, 3, H, W) through a trainable ``trunk``
  returning ``{layer: (B, m1, d_r)}``, -> ``tanh(Linear(d_r, d))``: v (B, m1, d).
* Text: word ids (B, m2) into the SkipGram table (V_w, e) given at construction (row ``V_w``
  is a zero padding row added here), masked slots zeroed -> TextCNN (one zero-padded,
  'same'-length ``Conv1d + ReLU`` per width, concatenated) -> ``tanh(Linear(., d))``: t
  (B, m2, d). tanh on both sides puts regions and words in one bounded, signed range.
* Co-attention: ``c_ik = cos(v_i, t_k)`` over real words; region weights
  ``a = softmax_i(sum_k c_ik)``, word weights ``b = softmax_k(sum_i c_ik)`` (masked words get
  exactly 0). ``attention``: ``co`` (both), ``none`` (-ca: uniform 1/m1 and 1/n_words),
  ``image`` (-ia: only a from the words, b uniform), ``text`` (-ta: only b from the regions, a
  uniform). Encoding one modality alone (a query) gives uniform weights on that side.
* ``F_v``, ``F_t``: one LSTM per modality over ``a_i v_i`` / ``b_k t_k``, read out as the mean
  of its hidden states over the sequence (``readout="mean"``, text: over the real words) or as
  its last hidden state (``"last"``, text: at the last real word); ``H = tanh(Linear(F, K))``;
  codes are ``sign(H)``. The last state of a 49-64 step region sequence learns slowly (measured
  in RESULTS.md: level with the unsupervised methods after the synthetic budget); the mean gives
  every region a direct gradient path.

Word masks must be prefixes (real words first, padding after) with at least one real word;
anything else raises ValueError. :class:`ModalityDiscriminator` (D_v, D_t) is a separate
module with its own optimiser. Outputs are float32 under bf16 autocast; the cosine and both
softmaxes are computed in float32.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from xmdist.data.decode import normalize_images

Tensor = torch.Tensor
ATTENTION = ("co", "none", "image", "text")
READOUTS = ("mean", "last")


def co_attention(v: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """v (B, m1, d), t (B, m2, d), mask (B, m2) bool, >= 1 True per row -> region weights a
    (B, m1) and word weights b (B, m2), float32, each summing to 1; b is exactly 0 where masked."""
    # Autocast would run the matmul in bf16 even on float32 inputs: switch it off here.
    with torch.autocast(v.device.type, enabled=False):
        c = F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).transpose(1, 2)
        c = c.masked_fill(~mask[:, None, :], 0.0)  # (B, m1, m2): padding enters no sum
        a = c.sum(2).softmax(1)
        b = c.sum(1).masked_fill(~mask, float("-inf")).softmax(1)
    return a, b


def _cpu_lstm_in_fp32(x: Tensor):
    """Autocast off for an LSTM on the CPU: oneDNN has no bf16 LSTM kernel on CPUs without
    AVX-512 BF16 ("could not create a primitive descriptor"), so CPU runs keep it in float32
    (its inputs here are float32); on GPUs the LSTM runs under autocast."""
    return torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext()


def uniform_region_weights(v: Tensor) -> Tensor:
    """v (B, m1, d) -> (B, m1) float32, all 1/m1."""
    return torch.full(v.shape[:2], 1.0 / v.shape[1], device=v.device)


def uniform_word_weights(mask: Tensor) -> Tensor:
    """mask (B, m2) bool -> (B, m2) float32: 1/(number of real words) on real words, 0 elsewhere."""
    m = mask.float()
    return m / m.sum(1, keepdim=True)


def word_lengths(mask: Tensor) -> Tensor:
    """mask (B, m2) -> lengths (B,) int64 on the CPU (what packing needs); ValueError unless
    every row is a prefix mask with >= 1 real word (a text of no words has no last state)."""
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    # -1 marks a row with padding before a real word: one device->host copy checks both.
    checked = torch.where((mask == prefix).all(1), lengths, -1).cpu()
    bad = (checked < 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"word_mask rows {bad[:8]} are empty or not a prefix; every text needs "
                         f">= 1 real word, real words first and padding only at the end")
    return checked


class TextCNN(nn.Module):
    """(B, m2, e) word vectors -> (B, m2, d): 'same'-length ``Conv1d + ReLU`` per width,
    concatenated over widths, then ``tanh(Linear)`` per position."""

    def __init__(self, in_dim: int, dim: int, widths: Sequence[int] = (1, 2, 3), channels: int = 256):
        super().__init__()
        self.widths = tuple(widths)
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, channels, w) for w in self.widths)
        self.fc = nn.Linear(len(self.widths) * channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # (B, e, m2)
        # 'same' length by explicit zero padding, (w - 1) // 2 before and w // 2 after (as
        # padding="same" does, without its warning and copy for even widths)
        h = [F.relu(conv(F.pad(x, ((w - 1) // 2, w // 2)))) for w, conv in zip(self.widths, self.convs)]
        return torch.tanh(self.fc(torch.cat(h, 1).transpose(1, 2)))


class CMFAHModel(nn.Module):
    """``forward(batch)`` -> ``fv``, ``ft`` (B, d_f), ``hv``, ``ht`` (B, K) in (-1, 1),
    ``region_weights`` (B, m1), ``word_weights`` (B, m2), all float32.

    Batch keys: ``regions`` (B, m1, d_r) float, or ``images`` (B, 3, H, W) uint8 (or
    normalised float) when the model has a ``trunk``; ``words`` (B, m2) int64 ids into
    ``word_vectors`` (anything at masked slots); ``word_mask`` (B, m2) bool, True = real word.
    """

    def __init__(self, word_vectors: Tensor, bits: int, region_dim: int = 512, dim: int = 512,
                 feature_dim: int = 512, widths: Sequence[int] = (1, 2, 3), text_channels: int = 256,
                 attention: str = "co", freeze_words: bool = True, trunk: nn.Module | None = None,
                 length_scaled: bool = True, readout: str = "mean"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        self.readout = readout
        table = torch.as_tensor(word_vectors, dtype=torch.float32)
        self.attention, self.bits, self.trunk = attention, bits, trunk
        # attention weights sum to 1, so a_i v_i is 1/m1 of a region: scaled by the sequence length
        # (m1, or the number of real words) the LSTM sees inputs of the regions' own size, and
        # uniform weights (-ca) leave the sequence as it is; False is the formula as printed
        self.length_scaled = length_scaled
        self.pad_index = table.shape[0]  # the zero row appended below
        self.embed = nn.Embedding.from_pretrained(torch.cat([table, table.new_zeros(1, table.shape[1])]),
                                                  freeze=freeze_words, padding_idx=self.pad_index)
        self.region_proj = nn.Linear(region_dim, dim)
        self.text_cnn = TextCNN(table.shape[1], dim, widths, text_channels)
        self.lstm_v = nn.LSTM(dim, feature_dim, batch_first=True)
        self.lstm_t = nn.LSTM(dim, feature_dim, batch_first=True)
        self.hash_v = nn.Linear(feature_dim, bits)
        self.hash_t = nn.Linear(feature_dim, bits)

    # ------------------------------------------------------------ per-modality features

    def regions(self, x: Tensor) -> Tensor:
        """Regions (B, m1, d_r), or images (B, 3, H, W) with a trunk -> v (B, m1, d)."""
        if self.trunk is not None:
            (x,) = self.trunk(normalize_images(x) if x.dtype == torch.uint8 else x).values()
        return torch.tanh(self.region_proj(x.to(self.region_proj.weight.dtype)))

    def words(self, words: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, m2), mask (B, m2) -> t (B, m2, d) and lengths (B,) on the CPU."""
        mask = mask.bool()
        lengths = word_lengths(mask)
        # Padding slots may hold any id: they read the zero row, and are zeroed again in case a
        # trainable table's padding row was changed, so the CNN sees zeros there as at the ends.
        e = self.embed(words.masked_fill(~mask, self.pad_index))
        e = e * mask[..., None].to(e.dtype)
        return self.text_cnn(e), lengths

    def _weights(self, v: Tensor | None, t: Tensor | None,
                 mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(a, b) for the modalities present (None for an absent one); a side whose other
        modality is absent, or whose attention is switched off, gets uniform weights."""
        both = v is not None and t is not None and self.attention != "none"
        att = co_attention(v, t, mask.bool()) if both else None
        a = b = None
        if v is not None:
            a = att[0] if both and self.attention in ("co", "image") else uniform_region_weights(v)
        if t is not None:
            b = att[1] if both and self.attention in ("co", "text") else uniform_word_weights(mask.bool())
        return a, b

    def _image_feature(self, v: Tensor, a: Tensor) -> Tensor:
        """(B, m1, d), (B, m1) -> F_v (B, d_f): the LSTM over a_i v_i, read out (``readout``)."""
        a = a * v.shape[1] if self.length_scaled else a
        seq = (a[..., None] * v.float()).to(self.lstm_v.weight_ih_l0.dtype)
        with _cpu_lstm_in_fp32(seq):
            states, (h, _) = self.lstm_v(seq)
        return states.mean(1) if self.readout == "mean" else h[-1]

    def _text_feature(self, t: Tensor, b: Tensor, lengths: Tensor) -> Tensor:
        """(B, m2, d), (B, m2), (B,) -> F_t (B, d_f): the LSTM over the real words, read out
        (``readout``: the mean of its states, or the state at the last real word)."""
        b = b * lengths.to(b.device, b.dtype)[:, None] if self.length_scaled else b
        seq = (b[..., None] * t.float()).to(self.lstm_t.weight_ih_l0.dtype)
        packed = pack_padded_sequence(seq, lengths, batch_first=True, enforce_sorted=False)
        with _cpu_lstm_in_fp32(seq):
            states, (h, _) = self.lstm_t(packed)  # h comes back in the batch's order
        if self.readout == "last":
            return h[-1]
        # padded positions come back as zeros: their sum over the real words / the count
        states, _ = pad_packed_sequence(states, batch_first=True)
        return states.sum(1) / lengths.to(states.device, states.dtype)[:, None]

    # ------------------------------------------------------------ public encoders

    def encode_pair(self, x: Tensor, words: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Both modalities with cross-modal attention: the dict of ``forward``."""
        v = self.regions(x)
        t, lengths = self.words(words, mask)
        a, b = self._weights(v, t, mask)
        fv, ft = self._image_feature(v, a), self._text_feature(t, b, lengths)
        return {"fv": fv.float(), "ft": ft.float(),
                "hv": torch.tanh(self.hash_v(fv)).float(), "ht": torch.tanh(self.hash_t(ft)).float(),
                "region_weights": a, "word_weights": b}

    def encode_image(self, x: Tensor, words: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Regions or images -> H_v (B, K) float32; without words the region weights are uniform."""
        v = self.regions(x)
        use_words = words is not None and self.attention in ("co", "image")
        t = self.words(words, mask)[0] if use_words else None
        a, _ = self._weights(v, t, mask)
        return torch.tanh(self.hash_v(self._image_feature(v, a))).float()

    def encode_text(self, words: Tensor, mask: Tensor, x: Tensor | None = None) -> Tensor:
        """ids (B, m2), mask (B, m2) -> H_t (B, K) float32; without x the word weights are uniform."""
        t, lengths = self.words(words, mask)
        v = self.regions(x) if x is not None and self.attention in ("co", "text") else None
        _, b = self._weights(v, t, mask)
        return torch.tanh(self.hash_t(self._text_feature(t, b, lengths))).float()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["images"] if self.trunk is not None else batch["regions"]
        return self.encode_pair(x, batch["words"], batch["word_mask"])


class ModalityDiscriminator(nn.Module):
    """Features (B, d_f) -> logits (B,) float32 that they come from this discriminator's
    modality: ``Linear-LeakyReLU-Linear-LeakyReLU-Linear`` (the paper's 3-layer MLP)."""

    def __init__(self, in_dim: int = 512, hidden: Sequence[int] = (256, 128), slope: float = 0.2):
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(nn.Linear(in_dim, h1), nn.LeakyReLU(slope), nn.Linear(h1, h2),
                                 nn.LeakyReLU(slope), nn.Linear(h2, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f.to(self.net[0].weight.dtype)).flatten().float()
