"""Hash networks for cross-modal hashing on precomputed features (DJSRH, SGRN).

Image: ``Linear(d_i, K)`` on fixed CNN features (or an MLP with ``image_hidden`` units), or on
the output of a trainable CNN ``trunk`` fed uint8 images (end-to-end fine-tuning, as DJSRH's
code does); text: ``Linear(d_t, text_hidden) -> ReLU -> Linear(text_hidden, K)`` on tag
bag-of-words. Both return the real-valued hash layer ``h``; codes are ``tanh(alpha h)`` in
training and ``sign(h)`` at test.
"""
from __future__ import annotations

import torch
from torch import nn

from xmdist.data.decode import normalize_images


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class HashModel(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, bits: int, image_hidden: int = 0, text_hidden: int = 4096,
                 trunk: nn.Module | None = None):
        super().__init__()
        self.bits, self.trunk = bits, trunk  # trunk: images -> {layer: (B, image_dim)}
        self.image = _mlp(image_dim, image_hidden, bits)
        self.text = _mlp(text_dim, text_hidden, bits)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: features (B, d_i) or regions (B, m, d) (flattened), or uint8 images (B, 3, H, W)
        when the model has a trunk."""
        if self.trunk is not None:
            (x,) = self.trunk(normalize_images(x) if x.dtype == torch.uint8 else x).values()
        return self.image(x.flatten(1))

    def encode_text(self, tags: torch.Tensor) -> torch.Tensor:
        return self.text(tags)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["images"] if self.trunk is not None else batch["features"]
        return {"hi": self.encode_image(x), "ht": self.encode_text(batch["tags"])}
