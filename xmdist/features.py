"""Fixed image features from torchvision CNNs, for methods that train on precomputed features.

Known layers (``LAYERS``):

* ``alexnet fc7``: 4096-d output of the classifier's second ReLU (the DJSRH / SGRN input);
* ``vgg16|vgg19 fc7``: 4096-d output of the classifier's second ReLU (VSE++);
* ``vgg16|vgg19 pool5``: the last max-pool map (512, h, w) as (h * w, 512) regions, row-major;
  (49, 512) at 224 px (CMFAH);
* ``resnet18|34|50|101|152 pool``: global average pool (512-d for 18/34, 2048-d otherwise);
* ``run embed``: the image embedding of a trained xmdist run (``--weights RUN_DIR``, its best
  checkpoint), e.g. a VSE++ encoder trained on the synthetic shards, whose images no
  ImageNet network has seen.

``build_extractor(backbone, layers, weights)`` returns a frozen :class:`FeatureExtractor` in eval
mode (dropout off, BatchNorm statistics fixed) mapping normalised images (B, 3, H, W), made by
:func:`eval_transform`, to ``{layer: features}``. Write a feature shard set with

    python launch/extract_features.py --shards shards/coco --out shards/coco-vgg19-fc7 \
        --backbone vgg19 --layer fc7
    torchrun --nproc_per_node=8 launch/extract_features.py --shards ... --out ... --backbone ...
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from xmdist.data.decode import IMAGENET_MEAN, IMAGENET_STD
from xmdist.models.image import _load_weights

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
LAYERS: dict[str, tuple[str, ...]] = {
    "alexnet": ("fc7",),
    "vgg16": ("fc7", "pool5"),
    "vgg19": ("fc7", "pool5"),
    **{name: ("pool",) for name in _RESNETS},
    "run": ("embed",),
}
RANDOM = "random"
RANDOM_WARNING = ("RANDOM WEIGHTS: these features come from an untrained network and are meaningless "
                  "for retrieval; they exist for tests and offline smoke runs only")


class FeatureError(ValueError):
    """An unknown backbone or layer, an unusable input size, or weights that cannot be loaded."""


def known_layers() -> str:
    """``alexnet: fc7; vgg16: fc7, pool5; ...`` for error messages."""
    return "; ".join(f"{name}: {', '.join(layers)}" for name, layers in LAYERS.items())


def check_layer(backbone: str, layer: str) -> None:
    if backbone not in LAYERS:
        raise FeatureError(f"unknown backbone {backbone!r}; known backbones and layers: {known_layers()}")
    if layer not in LAYERS[backbone]:
        raise FeatureError(f"{backbone} has no layer {layer!r} (has: {', '.join(LAYERS[backbone])}); "
                           f"known backbones and layers: {known_layers()}")


def min_image_size(backbone: str) -> int:
    # AlexNet's three 3x3/2 max-pools need a 3x3 map each, which conv1 (11x11/4) only gives from
    # 63 px on; the others are size-agnostic thanks to adaptive pooling, 32 px keeps pool5 non-empty.
    return 63 if backbone == "alexnet" else 32


def _run_config(run_dir: str | None):
    from xmdist.config import load_config

    path = Path(run_dir or "") / "config.yaml"
    if not run_dir or not path.is_file():
        raise FeatureError(f"backbone 'run' needs --weights RUN_DIR (a directory written by launch/train.py); "
                           f"{path} not found")
    return load_config(path)


def feature_shape(backbone: str, layer: str, image_size: int = 224, weights: str | None = None) -> tuple[int, ...]:
    """Shape of one image's features at a square input of ``image_size`` pixels."""
    check_layer(backbone, layer)
    if backbone == "run":
        return (_run_config(weights).model.embed_dim,)
    if image_size < min_image_size(backbone):
        raise FeatureError(f"{backbone} needs inputs of at least {min_image_size(backbone)} px, got {image_size}")
    if layer == "fc7":
        return (4096,)
    if layer == "pool5":  # five 2x2/2 max-pools: floor(size / 32) per side
        return ((image_size // 32) ** 2, 512)
    return (512,) if backbone in ("resnet18", "resnet34") else (2048,)


def eval_transform(image_size: int = 224, resize: int = 256) -> v2.Compose:
    """uint8 (3, H, W) -> float (3, image_size, image_size): Resize + CenterCrop + ImageNet norm."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class FeatureExtractor(nn.Module):
    """A torchvision CNN cut at the requested layers; ``forward`` returns ``{layer: (B, *shape)}``."""

    def __init__(self, backbone: str, net: nn.Module, layers: Sequence[str]):
        super().__init__()
        for layer in layers:
            check_layer(backbone, layer)
        self.backbone, self.layers = backbone, tuple(dict.fromkeys(layers))
        if backbone in _RESNETS:
            # conv1 ... layer4, avgpool in forward order; fc is dropped
            self.trunk = nn.Sequential(*list(net.children())[:-1])
        else:
            self.features, self.avgpool = net.features, net.avgpool
            # The classifier up to and including its second ReLU: fc6, ReLU, (Dropout,) fc7, ReLU.
            # AlexNet puts Dropout before each Linear, VGG after each ReLU.
            relus = [i for i, m in enumerate(net.classifier) if isinstance(m, nn.ReLU)]
            self.head = net.classifier[:relus[1] + 1] if "fc7" in self.layers else None
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # dropout would make features random; BN must use its statistics

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.backbone in _RESNETS:
            return {"pool": self.trunk(images).flatten(1)}
        maps = self.features(images)
        out = {}
        if "pool5" in self.layers:
            out["pool5"] = maps.flatten(2).transpose(1, 2)  # (B, 512, h, w) -> (B, h*w, 512)
        if self.head is not None:
            out["fc7"] = self.head(torch.flatten(self.avgpool(maps), 1))
        return out


class TrainableExtractor(FeatureExtractor):
    """The same cut, trainable (dropout active in training mode): end-to-end fine-tuning."""

    def __init__(self, backbone: str, net: nn.Module, layers: Sequence[str]):
        super().__init__(backbone, net, layers)
        self.requires_grad_(True)

    def train(self, mode: bool = True) -> "TrainableExtractor":
        return nn.Module.train(self, mode)


class RunImageEncoder(nn.Module):
    """The frozen image encoder of a trained xmdist run: ``{"embed": encode_image(images)}``."""

    backbone, layers = "run", ("embed",)

    def __init__(self, run_dir: str | None):
        super().__init__()
        from xmdist.inference import RunError, load_run

        _run_config(run_dir)
        try:
            self.model = load_run(run_dir).model.requires_grad_(False)
        except RunError as e:
            raise FeatureError(str(e)) from None

    def train(self, mode: bool = True) -> "RunImageEncoder":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embed": self.model.encode_image(images)}


def _weights_file(weights: str) -> Path | None:
    """The file ``weights`` names, decided exactly as ``_load_weights`` decides; None: an enum name."""
    path = Path(weights).expanduser()
    return path if path.suffix in (".pth", ".pt") or path.exists() else None


def _check_state(backbone: str, weights: str, expected: Mapping[str, torch.Tensor], state: Any) -> None:
    """A short message for a file that is not a ``backbone`` state dict (torch's lists every key)."""
    if not isinstance(state, Mapping):
        raise FeatureError(f"{weights} holds a {type(state).__name__}, not a {backbone} state dict")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shaped:
        raise FeatureError(f"{weights} is not a torchvision {backbone} state dict: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected and {len(shaped)} mis-shaped tensors "
                           f"(first: {(missing + unexpected + shaped)[0]})")


def build_extractor(backbone: str, layers: Sequence[str], weights: str | None = RANDOM,
                    seed: int = 0, trainable: bool = False) -> FeatureExtractor:
    """Frozen extractor; ``weights``: ``random`` (or None), a torchvision enum name or a file.

    Random weights are drawn from a private generator state seeded with ``seed``, so every rank
    of a run builds the same network without disturbing the caller's random state.
    """
    for layer in layers:
        check_layer(backbone, layer)
    if backbone == "run":
        return RunImageEncoder(weights)
    if weights in (None, RANDOM):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.get_model(backbone, weights=None)
    else:
        try:
            state = _load_weights(backbone, weights)
            with torch.device("meta"):  # no random init of weights that are overwritten anyway
                net = torchvision.models.get_model(backbone, weights=None)
        except (OSError, RuntimeError, ValueError) as e:
            # _load_weights names the training config key; this module's callers take --weights
            raise FeatureError(str(e).replace("model.weights", "--weights")) from None
        _check_state(backbone, weights, net.state_dict(), state)
        net.load_state_dict(state, assign=True)
        net.float()  # assign=True keeps the file's dtype; half-precision files exist
    return (TrainableExtractor if trainable else FeatureExtractor)(backbone, net, layers)


def describe_weights(backbone: str, weights: str | None) -> dict[str, Any]:
    """What to record about ``weights`` next to features: enum member and URL, or file and hash."""
    if backbone == "run":
        from xmdist.inference import resolve_checkpoint

        return {"weights": str(weights), "run_checkpoint": resolve_checkpoint(Path(weights), "best")}
    if weights in (None, RANDOM):
        return {"weights": RANDOM, "random_weights": True, "WARNING": RANDOM_WARNING}
    path = _weights_file(weights)
    if path is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {"weights": str(path.resolve()), "weights_sha256": digest.hexdigest(), "random_weights": False}
    # DEFAULT means different weights in different torchvision versions: record the member
    enum = torchvision.models.get_model_weights(backbone)[weights]
    return {"weights": str(enum), "weights_url": enum.url, "random_weights": False}
