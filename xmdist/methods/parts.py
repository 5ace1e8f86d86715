"""Pieces several methods share: frozen networks, the share convention, discriminator
optimisers, and reading what a feature shard set holds."""
from __future__ import annotations

import torch
from torch.func import functional_call

from xmdist.config import Config, ConfigError, OptimConfig
from xmdist.data.decode import IMAGE_KEYS
from xmdist.data.info import ShardError, ShardSet, Split
from xmdist.data.loader import iter_raw_samples
from xmdist.dist import DistEnv


def frozen(module: torch.nn.Module):
    """``module`` as a function of its inputs only: gradients reach the inputs, not its weights
    (a discriminator inside a generator's loss)."""
    weights = {k: v.detach() for k, v in module.named_parameters()}
    weights.update(dict(module.named_buffers()))
    return lambda *args: functional_call(module, weights, args)


def share(local_mean: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """A rank-local mean as this rank's share of the mean over ranks (equal local batches), the
    form every phase loss takes (see :mod:`xmdist.methods.base`)."""
    return local_mean / env.world_size


def discriminator_optim(lr: float = 2e-4) -> OptimConfig:
    """DCGAN's Adam for discriminators: betas (0.5, 0.999), no clipping, no decay."""
    return OptimConfig(name="adam", lr=lr, betas=[0.5, 0.999], grad_clip=0.0, lr_decay_epochs=[])


def first_sample(split: Split) -> dict:
    """The first readable raw sample of ``split`` (members as bytes): what the set holds."""
    for sample in iter_raw_samples(list(split.paths), fields=split.fields):
        return sample
    raise ShardError(f"split '{split.name}' has no readable sample")


def require_members(shards: ShardSet, sample: dict, members: list[str]) -> None:
    """ShardError naming what ``sample`` lacks of ``members`` (and what it has)."""
    missing = [m for m in members if m not in sample]
    if missing:
        raise ShardError(f"{shards.root}: samples have no {', '.join(missing)} (members: "
                         f"{', '.join(k for k in sample if not k.startswith('__'))})")


def label_columns(cfg: Config, shards: ShardSet) -> list[int] | None:
    """Columns of ``labels.npy`` named by ``data.labels`` (None: all labels define relevance)."""
    wanted = cfg.data.labels
    if not wanted:
        return None
    names = shards.info.get("label_names")
    if not names:
        raise ConfigError(f"data.labels: {shards.root / '_info.json'} names no labels")
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ConfigError(f"data.labels: unknown label(s) {unknown}; known: {names}")
    return [names.index(n) for n in wanted]


def feature_sample(cfg: Config, shards: ShardSet, pixels: bool, features: str = "image features",
                   layer_hint: str = "") -> tuple[str, dict]:
    """(the member holding the image features, the first training sample) of a feature shard set,
    checked to hold tags, labels, json and the features (or, with ``pixels``, an image)."""
    feature = cfg.data.features or shards.info.get("layer")
    if not feature and not pixels:
        raise ShardError(f"{shards.root} holds no precomputed {features} ({cfg.method} trains on them): write a "
                         f"feature set with launch/extract_features.py{layer_hint}, name the member with "
                         f"data.features, or train on the images with model.image_input=pixels")
    member = f"{feature}.npy"
    sample = first_sample(shards.split(cfg.data.train_split))
    wanted = ["tags.npy", "labels.npy", "json"]
    if not pixels:
        wanted.append(member)
    elif not any(k in sample for k in IMAGE_KEYS):
        wanted.append("an image (jpg/png)")  # named as such: no member is that
    require_members(shards, sample, wanted)
    return member, sample
