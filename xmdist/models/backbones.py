"""The image backbone factory: torchvision CNNs and a small CNN, as trained encoders or fixed extractors.

Two ways to use a backbone:

* ``build_backbone(name, weights)`` -> ``(module, feature_dim)``: the trainable trunk of the VSE
  image encoder (:class:`xmdist.models.image.ImageEncoder`), mapping images (B, 3, H, W) to
  pooled features (B, feature_dim): a torchvision ResNet with ``fc`` replaced by Identity
  (512-d for resnet18/34, 2048-d otherwise), a VGG with its classifier's last layer dropped
  (fc7, 4096-d, as in VSE++), or ``small_cnn`` (:class:`SmallCNN`, four conv blocks, 256-d), a
  fast from-scratch encoder for the small synthetic images.
* ``build_extractor(backbone, layers, weights)`` -> a frozen :class:`FeatureExtractor` in eval
  mode (dropout off, BatchNorm statistics fixed; :class:`TrainableExtractor` for end-to-end
  fine-tuning) mapping normalised images, made by :func:`eval_transform`, to ``{layer: features}``,
  for methods that train on precomputed features. Known layers (``LAYERS``):

  * ``alexnet fc7``: 4096-d output of the classifier's second ReLU (the DJSRH / SGRN input);
  * ``vgg16|vgg19 fc7``: 4096-d output of the classifier's second ReLU (VSE++);
  * ``vgg16|vgg19 pool5``: the last max-pool map (512, h, w) as (h * w, 512) regions,
    row-major; (49, 512) at 224 px (CMFAH);
  * ``resnet18|34|50|101|152 pool``: global average pool (512-d for 18/34, 2048-d otherwise).

  :func:`feature_shape` gives a layer's shape at an input size, :func:`describe_weights` what to
  record about the weights next to the features.

Weights (:func:`load_weights`) are a torchvision weight-enum name (``DEFAULT``,
``IMAGENET1K_V1``), or a state-dict file (``.pth`` / ``.pt``, or any existing path); None (and
``random`` for extractors) means random initialisation. Without a network a named enum cannot be
downloaded: the error says which file to fetch and where to put it. Feature shard sets are
written by ``python launch/extract_features.py`` (:mod:`xmdist.tools.features`), which can also
encode with the image encoder of a trained run.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from xmdist.config import ConfigError
from xmdist.data.decode import IMAGENET_MEAN, IMAGENET_STD

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TORCHVISION_BACKBONES = (*_RESNETS, "vgg16", "vgg19")  # build_backbone's, besides small_cnn
LAYERS: dict[str, tuple[str, ...]] = {
    "alexnet": ("fc7",),
    "vgg16": ("fc7", "pool5"),
    "vgg19": ("fc7", "pool5"),
    **{name: ("pool",) for name in _RESNETS},
}
RANDOM = "random"
RANDOM_WARNING = ("RANDOM WEIGHTS: these features come from an untrained network and are meaningless "
                  "for retrieval; they exist for tests and offline smoke runs only")


class FeatureError(ValueError):
    """An unknown backbone or layer, an unusable input size, or weights that cannot be loaded."""


# ---------------------------------------------------------------- weights and construction


def _weights_file(weights: str) -> Path | None:
    """The file ``weights`` names, decided exactly as ``load_weights`` decides; None: an enum name."""
    path = Path(weights).expanduser()
    return path if path.suffix in (".pth", ".pt") or path.exists() else None


def load_weights(name: str, weights: str):
    """Resolve ``weights`` into a state dict, with a message that says what to do on failure."""
    path = _weights_file(weights)
    if path is not None:
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


def _torchvision_net(name: str, seed: int | None = None, meta: bool = False) -> nn.Module:
    """Untrained torchvision ``name``: initialised from the global random state, from a private one
    seeded with ``seed`` (the caller's state is left alone), or on the meta device (no init at all,
    for weights that are assigned right after)."""
    if meta:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None)
    if seed is None:
        return torchvision.models.get_model(name, weights=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None)


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


def build_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """Trainable trunk (pooled features) of the VSE image encoder and its feature dimension.

    Random initialisation draws from the global random state (a training seed reproduces it);
    ``weights`` are then loaded strictly over it, with ``model.weights`` in the messages.
    """
    if name == "small_cnn":
        net = SmallCNN()
        if weights:
            net.load_state_dict(load_weights(name, weights))
        return net, net.out_dim
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: small_cnn, {', '.join(TORCHVISION_BACKBONES)}")
    net = _torchvision_net(name)
    if weights:
        net.load_state_dict(load_weights(name, weights))
    if name in _RESNETS:
        dim = net.fc.in_features
        net.fc = nn.Identity()  # pooled 2048/512-d features
    else:  # VGG: fc7 (4096) as in VSE++ -- drop the last classifier layer
        dim = net.classifier[-1].in_features
        net.classifier = nn.Sequential(*list(net.classifier.children())[:-1])
    return net, dim


# ---------------------------------------------------------------- fixed feature extractors


def known_layers(layers: Mapping[str, Sequence[str]] = LAYERS) -> str:
    """``alexnet: fc7; vgg16: fc7, pool5; ...`` for error messages."""
    return "; ".join(f"{name}: {', '.join(names)}" for name, names in layers.items())


def check_layer(backbone: str, layer: str, layers: Mapping[str, Sequence[str]] = LAYERS) -> None:
    """FeatureError unless ``layers`` (default ``LAYERS``) has ``layer`` for ``backbone``."""
    if backbone not in layers:
        raise FeatureError(f"unknown backbone {backbone!r}; known backbones and layers: {known_layers(layers)}")
    if layer not in layers[backbone]:
        raise FeatureError(f"{backbone} has no layer {layer!r} (has: {', '.join(layers[backbone])}); "
                           f"known backbones and layers: {known_layers(layers)}")


def min_image_size(backbone: str) -> int:
    # AlexNet's three 3x3/2 max-pools need a 3x3 map each, which conv1 (11x11/4) only gives from
    # 63 px on; the others are size-agnostic thanks to adaptive pooling, 32 px keeps pool5 non-empty.
    return 63 if backbone == "alexnet" else 32


def feature_shape(backbone: str, layer: str, image_size: int = 224) -> tuple[int, ...]:
    """Shape of one image's features at a square input of ``image_size`` pixels."""
    check_layer(backbone, layer)
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
        self.requires_grad_(True).train()  # the base class leaves itself in eval mode

    def train(self, mode: bool = True) -> "TrainableExtractor":
        return nn.Module.train(self, mode)


def state_mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
                     ) -> tuple[list[str], list[str], list[str]]:
    """Keys of ``expected`` missing from ``state``, keys of ``state`` not in ``expected``, and keys
    in both with other shapes (a short message where ``load_state_dict`` lists every key)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, shaped


def _check_state(backbone: str, weights: str, expected: Mapping[str, torch.Tensor], state: Any) -> None:
    """A short message for a file that is not a ``backbone`` state dict (torch's lists every key)."""
    if not isinstance(state, Mapping):
        raise FeatureError(f"{weights} holds a {type(state).__name__}, not a {backbone} state dict")
    missing, unexpected, shaped = state_mismatches(expected, state)
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
    if weights in (None, RANDOM):
        net = _torchvision_net(backbone, seed=seed)
    else:
        try:
            state = load_weights(backbone, weights)
            net = _torchvision_net(backbone, meta=True)  # no random init of weights that are overwritten anyway
        except (OSError, RuntimeError, ValueError) as e:
            # load_weights names the training config key; this module's callers take --weights
            raise FeatureError(str(e).replace("model.weights", "--weights")) from None
        _check_state(backbone, weights, net.state_dict(), state)
        net.load_state_dict(state, assign=True)
        net.float()  # assign=True keeps the file's dtype; half-precision files exist
    return (TrainableExtractor if trainable else FeatureExtractor)(backbone, net, layers)


def describe_weights(backbone: str, weights: str | None) -> dict[str, Any]:
    """What to record about ``weights`` next to features: enum member and URL, or file and hash."""
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
