"""Hash networks for cross-modal hashing on precomputed features (DJSRH, SGRN).

Image: ``Linear(d_i, K)`` on fixed CNN features (or an MLP with ``image_hidden`` units); text:
``Linear(d_t, text_hidden) -> ReLU -> Linear(text_hidden, K)`` on tag bag-of-words. Both return
the real-valued hash layer ``h``; codes are ``tanh(alpha h)`` in training and ``sign(h)`` at test.
"""
from __future__ import annotations

import torch
from torch import nn


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class HashModel(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, bits: int, image_hidden: int = 0, text_hidden: int = 4096):
        super().__init__()
        self.image = _mlp(image_dim, image_hidden, bits)
        self.text = _mlp(text_dim, text_hidden, bits)

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.image(features)

    def encode_text(self, tags: torch.Tensor) -> torch.Tensor:
        return self.text(tags)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"hi": self.encode_image(batch["features"]), "ht": self.encode_text(batch["tags"])}
