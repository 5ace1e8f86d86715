"""VSE model: image and caption encoders into one L2-normalised space (VSE++, mFSR's base)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmdist.models.image import ImageEncoder
from xmdist.models.text import TextEncoder


class VSEModel(nn.Module):
    """``forward(batch)`` -> ``{"img": (B, d), "txt": (B, d)}``, both unit-norm, float32."""

    def __init__(self, vocab_size: int, backbone: str, embed_dim: int, word_dim: int = 300,
                 text_layers: int = 1, weights: str | None = None, finetune: bool = True):
        super().__init__()
        self.image = ImageEncoder(backbone, embed_dim, weights, finetune)
        self.text = TextEncoder(vocab_size, word_dim, embed_dim, text_layers)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, lengths).float(), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"img": self.encode_image(batch["images"]),
                "txt": self.encode_text(batch["tokens"], batch["lengths"])}
