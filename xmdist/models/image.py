"""Image backbones: torchvision CNNs (pooled features) and a small CNN for synthetic data.

``build_backbone(name, weights)`` returns ``(module, feature_dim)``; the module maps images
(B, 3, H, W) to pooled features (B, feature_dim). ``weights`` is None (random init), a
torchvision weight-enum name (``DEFAULT``, ``IMAGENET1K_V1``) or a path to a state-dict file.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from xmdist.config import ConfigError
from xmdist.data.decode import normalize_images

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19")


class SmallCNN(nn.Module):
    """Four conv blocks and global pooling: a fast from-scratch encoder for small images."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        blocks = []
        for i in range(4):
            blocks += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def _load_weights(name: str, weights: str):
    """Resolve ``weights`` into a state dict, with a message that says what to do on failure."""
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        raise ConfigError(f"model.weights: {name} has no weights named {weights!r}") from None
    try:
        return enum.get_state_dict(progress=False)
    except Exception as e:  # no network, no cache: say where the file must go
        raise ConfigError(
            f"could not load {name} weights {weights} ({type(e).__name__}: {e}). Download "
            f"{enum.url} elsewhere and pass model.weights=/path/to/file.pth, or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}") from None


def build_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    if name == "small_cnn":
        net = SmallCNN()
        if weights:
            net.load_state_dict(_load_weights(name, weights))
        return net, net.out_dim
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: small_cnn, {', '.join(TORCHVISION_BACKBONES)}")
    net = torchvision.models.get_model(name, weights=None)
    if weights:
        net.load_state_dict(_load_weights(name, weights))
    if name.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()  # pooled 2048/512-d features
    else:  # VGG: fc7 (4096) as in VSE++ -- drop the last classifier layer
        dim = net.classifier[-1].in_features
        net.classifier = nn.Sequential(*list(net.classifier.children())[:-1])
    return net, dim


class ImageEncoder(nn.Module):
    """Backbone -> Linear(feat, d) -> L2 norm. ``finetune=False`` freezes the backbone."""

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
