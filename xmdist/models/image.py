"""The VSE image encoder: a backbone of :mod:`xmdist.models.backbones`, a linear projection.

``ImageEncoder(backbone, embed_dim, weights)`` maps images (B, 3, H, W) -- uint8 RGB or
ImageNet-normalised floats -- to (B, embed_dim) through ``build_backbone(backbone, weights)``
(pooled features) and ``Linear(feature_dim, embed_dim)``; the caller normalises the embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from xmdist.data.decode import normalize_images
from xmdist.models.backbones import build_backbone


class ImageEncoder(nn.Module):
    """Backbone -> Linear(feat, d) (the model L2-normalises). ``finetune=False`` freezes the backbone."""

    def __init__(self, backbone: str, embed_dim: int, weights: str | None = None, finetune: bool = True):
        super().__init__()
        self.backbone, feat_dim = build_backbone(backbone, weights)
        self.finetune = finetune
        if not finetune:
            self.backbone.requires_grad_(False)
        self.fc = nn.Linear(feat_dim, embed_dim)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if not self.finetune:  # frozen BatchNorm statistics stay frozen too
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W): uint8 RGB (normalised here, on the device) or normalised floats."""
        if images.dtype == torch.uint8:
            images = normalize_images(images)
        images = images.to(self.fc.weight.dtype)  # bf16/fp16 engines hold low-precision weights
        return self.fc(self.backbone(images))
