"""mFSR: VSE++ encoders + feature separation into modality/semantic/specific parts, and
the reconstruction networks (DCGAN image generator and discriminators, GRU caption decoder).

Architecture only; the losses are in :mod:`xmdist.losses.mfsr`. Only the semantic part
``se`` is used for retrieval. The discriminators are separate modules, not part of
:class:`MFSRModel`, because they have their own optimiser.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from xmdist.data.decode import IMAGENET_MEAN, IMAGENET_STD
from xmdist.models.image import ImageEncoder
from xmdist.models.text import TextEncoder

PARTS = ("mo", "se", "sp")


class FeatureSeparation(nn.Module):
    """Pooled feature (B, in_dim) -> ``{"mo", "se", "sp"}``, each (B, dim), unit-norm, float32.

    A shared trunk followed by three linear heads: the three parts are a decomposition of one
    feature, so they share its first transformation and differ only in the projection that
    separates them (and the trunk is paid for once, not three times). ``trunk``:

    * ``"relu"``: ``Linear + ReLU`` (the paper's MLP);
    * ``"leaky"``: ``Linear + LeakyReLU(0.1)``: no unit can stop passing gradient;
    * ``"linear"``: ``Linear`` alone: each head is a linear map of the feature, the function
      class VSE++'s projection has, so the retrieval part ``se`` keeps every direction of it.

    ``init``: ``"default"`` is torch's (weights U(+-1/sqrt(fan_in)): each layer scales the feature
    by about 1/sqrt(3), biases of the same size added); ``"orthogonal"`` makes every layer an
    orthogonal map with zero bias, so the feature reaches the heads at its own scale and a step
    of Adam changes each layer relatively less.

    ``residual`` names the parts computed as ``normalize(x + head(trunk(x)))``, their heads
    started at zero (needs ``dim == in_dim``): ``"none"`` (the paper's MLP), ``"se"`` (the
    retrieval part only: at step 0 it is the encoder feature itself, as in VSE++, and the
    separation learns a correction to it, while ``mo`` and ``sp`` stay free to move away from
    the feature, which their losses ask of them) or ``"all"``.
    """

    TRUNKS = ("relu", "leaky", "linear")
    INITS = ("default", "orthogonal")
    RESIDUALS = {"none": (), "se": ("se",), "all": PARTS}

    def __init__(self, in_dim: int, dim: int, hidden: int | None = None, trunk: str = "relu", init: str = "default",
                 residual: str = "none"):
        super().__init__()
        if residual not in self.RESIDUALS:
            raise ValueError(f"separation residual must be one of {', '.join(self.RESIDUALS)}, got {residual!r}")
        self.residual = self.RESIDUALS[residual]
        if self.residual and dim != in_dim:
            raise ValueError(f"a residual separation needs the part size ({dim}) to equal the feature size ({in_dim})")
        if trunk not in self.TRUNKS:
            raise ValueError(f"separation trunk must be one of {', '.join(self.TRUNKS)}, got {trunk!r}")
        hidden = hidden or in_dim
        act = {"relu": [nn.ReLU(inplace=True)], "leaky": [nn.LeakyReLU(0.1, inplace=True)], "linear": []}[trunk]
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), *act)
        self.heads = nn.ModuleDict({p: nn.Linear(hidden, dim) for p in PARTS})
        if init not in self.INITS:
            raise ValueError(f"separation init must be one of {', '.join(self.INITS)}, got {init!r}")
        if init == "orthogonal":
            for layer in (self.trunk[0], *self.heads.values()):
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)
        for p in self.residual:
            nn.init.zeros_(self.heads[p].weight)
            nn.init.zeros_(self.heads[p].bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.trunk[0].weight.dtype)
        h = self.trunk(x)
        return {p: F.normalize((x + head(h) if p in self.residual else head(h)).float(), dim=-1)
                for p, head in self.heads.items()}


def _doublings(size: int, name: str) -> int:
    """Number of stride-2 layers between 4x4 and ``size`` (a power of two >= 8)."""
    k = size.bit_length() - 3
    if size < 8 or size != 4 << k:
        raise ValueError(f"{name} must be a power of two >= 8, got {size}")
    return k


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """DCGAN generator: code (B, in_dim) -> image (B, 3, out_size, out_size) in [-1, 1].

    A 4x4 transposed convolution of the code (a linear layer onto a 4x4 map), then stride-2
    transposed convolutions that double the size and halve the channels, BatchNorm + ReLU
    after each but the last, tanh at the output (Radford et al.).
    """

    def __init__(self, in_dim: int, ngf: int = 64, out_size: int = 64):
        super().__init__()
        k = _doublings(out_size, "out_size")
        chans = [ngf * 2 ** (k - 1 - i) for i in range(k)] + [3]  # 64 px: 8ngf, 4ngf, 2ngf, ngf, 3
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, chans[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True)]
        for i in range(k):
            layers.append(nn.ConvTranspose2d(chans[i], chans[i + 1], 4, 2, 1, bias=i == k - 1))
            layers += [nn.Tanh()] if i == k - 1 else [nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code.to(self.net[0].weight.dtype)[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN discriminator on (B, in_channels, in_size, in_size) images in [-1, 1].

    Returns ``{"logits": (B,), "features": (B, 8ndf*16 at 64 px)}``: the features are the
    flattened last 4x4 map before the output layer, used for feature matching. D1 judges
    images (``in_channels=3``); D2 judges channel-concatenated pairs (``in_channels=6``).
    """

    def __init__(self, ndf: int = 64, in_channels: int = 3, in_size: int = 64):
        super().__init__()
        k = _doublings(in_size, "in_size")
        chans = [in_channels] + [ndf * 2 ** i for i in range(k)]  # 64 px: 3, ndf, 2ndf, 4ndf, 8ndf
        layers: list[nn.Module] = []
        for i in range(k):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1, bias=i == 0))
            if i > 0:  # DCGAN: no BatchNorm on the input layer
                layers.append(nn.BatchNorm2d(chans[i + 1]))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.features = nn.Sequential(*layers)
        self.out = nn.Conv2d(chans[-1], 1, 4, 1, 0)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x.to(self.out.weight.dtype))
        return {"logits": self.out(h).flatten().float(), "features": h.flatten(1).float()}


class CaptionDecoder(nn.Module):
    """GRU caption decoder whose initial state is ``tanh(FC(code))``.

    ``forward`` uses teacher forcing: tokens[:, :-1] in, logits for tokens[:, 1:] out.
    """

    def __init__(self, vocab_size: int, in_dim: int, word_dim: int = 300, hidden: int = 1024,
                 num_layers: int = 1):
        super().__init__()
        self.num_layers, self.hidden = num_layers, hidden
        self.init_state = nn.Linear(in_dim, num_layers * hidden)
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden, num_layers=num_layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def _state(self, code: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (layers, B, hidden); tanh keeps it in the range of GRU states."""
        h = torch.tanh(self.init_state(code.to(self.init_state.weight.dtype)))
        return h.view(code.shape[0], self.num_layers, self.hidden).transpose(0, 1).contiguous()

    def forward(self, code: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``code`` (B, in_dim), ``tokens`` (B, L) from <start>, 0-padded, ``lengths`` (B,)
        counting <start> and <end> -> logits (B, L-1, V); padded steps give bias-only logits."""
        steps = tokens.shape[1] - 1
        # The <end> token is never an input, so each caption feeds lengths - 1 steps.
        packed = pack_padded_sequence(self.embed(tokens[:, :-1]), (lengths - 1).cpu(),
                                      batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed, self._state(code))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)
        return self.out(out).float()

    @torch.no_grad()
    def greedy(self, code: torch.Tensor, max_len: int, start: int = 1, end: int = 2) -> torch.Tensor:
        """Greedy decoding for logging: (B, max_len) ids without <start>; 0 (pad) after <end>."""
        state = self._state(code)
        word = torch.full((code.shape[0], 1), start, dtype=torch.long, device=code.device)
        done = torch.zeros(code.shape[0], dtype=torch.bool, device=code.device)
        ids = []
        for _ in range(max_len):
            out, state = self.gru(self.embed(word), state)
            word = self.out(out).argmax(-1)  # (B, 1)
            ids.append(word[:, 0].masked_fill(done, 0))
            done |= word[:, 0] == end
        return torch.stack(ids, 1)


def target_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Reconstruction target: (B, 3, H, W) uint8 RGB or ImageNet-normalised floats ->
    (B, 3, size, size) float32 in [-1, 1]."""
    if images.dim() != 4:
        raise ValueError(f"image reconstruction needs images (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 127.5 - 1
    else:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        x = (images.float() * std + mean) * 2 - 1
    if x.shape[-2:] != (size, size):
        # Antialiased bilinear weights are convex, so the result stays in [-1, 1].
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class MFSRModel(nn.Module):
    """VSE encoders -> per-modality feature separation -> optional reconstruction networks.

    ``forward(batch)`` -> ``img_{mo,se,sp}``, ``txt_{mo,se,sp}`` (B, sep_dim) unit-norm; with
    ``image_recon`` also ``fake`` (B, 3, S, S) = G([v_mo; v_se; v_sp]); with ``caption_recon``
    also ``cap_logits`` (B, L-1, V) from the decoder fed [l_mo; l_se; l_sp] (teacher forcing).
    Switched-off networks are not built, so ablation runs carry no unused parameters.
    """

    def __init__(self, vocab_size: int, backbone: str, embed_dim: int, sep_dim: int,
                 word_dim: int = 300, text_layers: int = 1, weights: str | None = None,
                 finetune: bool = True, image_recon: bool = True, caption_recon: bool = True,
                 image_size: int = 64, ngf: int = 64, decoder_hidden: int = 1024,
                 decoder_layers: int = 1, sep_trunk: str = "relu",
                 sep_init: str = "default", sep_residual: str = "none"):
        super().__init__()
        self.image = ImageEncoder(backbone, embed_dim, weights, finetune)
        self.text = TextEncoder(vocab_size, word_dim, embed_dim, text_layers)
        self.sep_image = FeatureSeparation(embed_dim, sep_dim, trunk=sep_trunk, init=sep_init,
                                           residual=sep_residual)
        self.sep_text = FeatureSeparation(embed_dim, sep_dim, trunk=sep_trunk, init=sep_init,
                                           residual=sep_residual)
        self.image_size = image_size
        self.generator = Generator(3 * sep_dim, ngf, image_size) if image_recon else None
        self.decoder = CaptionDecoder(vocab_size, 3 * sep_dim, word_dim, decoder_hidden,
                                      decoder_layers) if caption_recon else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, sep_dim) semantic vectors, unit-norm: what retrieval uses."""
        return self.sep_image(self.image(images))["se"]

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, sep_dim) semantic vectors, unit-norm: what retrieval uses."""
        return self.sep_text(self.text(tokens, lengths))["se"]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img = self.sep_image(self.image(batch["images"]))
        txt = self.sep_text(self.text(batch["tokens"], batch["lengths"]))
        out = {f"img_{p}": img[p] for p in PARTS} | {f"txt_{p}": txt[p] for p in PARTS}
        if self.generator is not None:
            out["fake"] = self.generator(torch.cat([img[p] for p in PARTS], 1)).float()
        if self.decoder is not None:
            out["cap_logits"] = self.decoder(torch.cat([txt[p] for p in PARTS], 1),
                                             batch["tokens"], batch["lengths"])
        return out
