"""Typed run configuration.

Dataclasses are the schema; YAML files in ``configs/`` are experiments; ``--set a.b=c``
overrides single values. Resolution order: dataclass defaults -> YAML -> overrides. Every
key is checked before any work starts: unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key (``optim.lr: expected float, got 'fast'``).

The ``model`` and ``loss`` sections belong to the method: the caller passes a ``schema``
function (``xmdist.methods.get_method``) mapping a method name to its :class:`MethodSchema`,
so ``method: vsepp`` validates against VSE++'s dataclasses. This module imports nothing from
xmdist: ``xmdist.methods.load_config`` is the one-argument form everything else uses.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or impossible."""


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    # an xmdist shard set directory (*.tar + _info.json), or other WebDataset shards: a brace pattern,
    # glob, .tar, directory of .tar files, pipe:/http(s) URL, a list of them, or weighted sources
    # ('::'-joined, or a list of {shards, weight}); see xmdist/data/sources.py
    shards: str | list[str | dict[str, Any]] = "shards/synthetic"
    val_shards: str | list[str | dict[str, Any]] = ""  # other shard sets: the validation split ("": none)
    test_shards: str | list[str | dict[str, Any]] = ""  # other shard sets: the test split ("": none)
    shard_weights: list[float] = field(default_factory=list)  # '::'-joined sources: their weights (resampled)
    # upsampling: a weight multiplies each of the source's shards' chance (open_clip's
    # --train-data-upsampling-factors); share: a weight is the source's share of the draws
    weight_mode: str = "upsampling"
    train_num_samples: int = 0  # other shard sets without per-shard counts: samples per epoch (resampled)
    captions_per_image: int = 0  # other shard sets: captions used per image (0: 1)
    image_key: str = ""  # other shard sets: the image member ("": the first of jpg, jpeg, png, webp)
    caption_key: str = ""  # other shard sets: member (txt) or json:FIELD ("": txt, json caption, json captions)
    open_retries: int = 2  # a remote shard that fails to open is retried this often, then skipped and counted
    open_timeout_s: float = 60.0  # http(s) shards: seconds without data before the read fails
    vocab_samples: int = 1_000_000  # vocabulary: at most this many training captions are read (0: all)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    batch_size: int = 128  # per rank; the global batch is batch_size * world_size
    global_batch_size: int = 0  # > 0: the global batch, split evenly over the ranks (replaces batch_size)
    num_workers: int = 2  # loader processes per rank
    shuffle_buffer: int = 2000  # samples held by each worker's shuffle buffer
    caption_mode: Literal["all", "random"] = "all"  # all: every caption is a pair (VSE++ epochs)
    min_word_count: int = 4  # vocabulary: words seen at least this often in train captions
    vocab: str | None = None  # a vocab.json to use instead of building one (saves a pass over train)
    features: str = ""  # hashing methods: member with image features (default: the set's layer, e.g. fc7)
    labels: list[str] = field(default_factory=list)  # hashing relevance: these label names only ([]: all)
    max_caption_words: int = 40
    crop_size: int = 224  # training crop / evaluation centre crop, pixels
    eval_resize: int = 256  # evaluation: resize shorter side, then centre crop
    max_pixels: int = 100_000_000  # images declaring more (width x height) are skipped before decoding; 0: no limit
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    hflip: bool = True  # captions that name left/right want this off
    pin_memory: bool = True  # only used on CUDA
    jpeg_draft: bool = True  # decode large JPEGs at reduced scale (never below crop/resize size)
    gpu_decode: bool = False  # decode JPEGs on the GPU (nvJPEG) when CPU decoding is the bottleneck
    resampled: bool = False  # draw shards with replacement (each worker from the whole split)
    epoch_steps: int = 0  # steps per epoch; 0: one pass over the split (floor(pairs / global batch))
    allow_changed_shards: bool = False  # resume even when the training shards differ from the checkpoint's

    def validate(self) -> None:
        check(bool(self.shards.strip() if isinstance(self.shards, str) else self.shards), "data.shards",
              "required: the shard set directory (launch/make_shards.py writes one) or a shard pattern")
        check(all(w > 0 for w in self.shard_weights), "data.shard_weights", "must all be > 0")
        check(self.weight_mode in ("upsampling", "share"), "data.weight_mode",
              f"must be 'upsampling' (a weight multiplies each shard's chance, as open_clip's upsampling "
              f"factors) or 'share' (a weight is the source's share of the draws), got {self.weight_mode!r}")
        check(self.train_num_samples >= 0, "data.train_num_samples", "must be >= 0 (0: counted per shard)")
        check(self.captions_per_image >= 0, "data.captions_per_image", "must be >= 0")
        check(self.open_retries >= 0, "data.open_retries", "must be >= 0")
        check(self.open_timeout_s > 0, "data.open_timeout_s", "must be > 0")
        check(self.vocab_samples >= 0, "data.vocab_samples", "must be >= 0 (0: all)")
        check(self.batch_size >= 2, "data.batch_size", "must be >= 2 (negatives come from the batch)")
        check(self.global_batch_size >= 0, "data.global_batch_size", "must be >= 0 (0: use data.batch_size)")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check(self.epoch_steps >= 0, "data.epoch_steps", "must be >= 0")
        check(self.min_word_count >= 1, "data.min_word_count", "must be >= 1")
        check(self.max_caption_words >= 1, "data.max_caption_words", "must be >= 1")
        check(self.crop_size >= 8, "data.crop_size", "must be >= 8")
        check(self.max_pixels >= 0, "data.max_pixels", "must be >= 0 (0: no limit)")
        check(self.eval_resize >= self.crop_size, "data.eval_resize", "must be >= data.crop_size")
        lo_hi = self.crop_scale
        check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, "data.crop_scale",
              f"must be [min, max] with 0 < min <= max <= 1, got {lo_hi}")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    grad_clip: float = 2.0  # max global grad norm; 0 disables
    lr_decay_epochs: list[int] = field(default_factory=lambda: [15])  # x lr_decay at each
    lr_decay: float = 0.1
    warmup_steps: int = 0  # linear warm-up from 0
    lr_scale: dict[str, float] = field(default_factory=dict)  # e.g. {text: 10}: lr x 10 under model.text

    def validate(self) -> None:
        check(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be finite and > 0, got {self.lr}")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
              f"must be finite and >= 0, got {self.weight_decay}")
        check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              f"must be two values in [0, 1), got {self.betas}")
        check(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", "must be finite and >= 0")
        check(0 < self.lr_decay <= 1, "optim.lr_decay", "must be in (0, 1]")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(all(v > 0 for v in self.lr_scale.values()), "optim.lr_scale", "factors must be > 0")
        check(all(e >= 0 for e in self.lr_decay_epochs), "optim.lr_decay_epochs", "must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: int = 0  # stop after this many optimiser steps in total (0: run all epochs)
    seed: int = 0
    backend: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0  # deepspeed only: 0, 1 or 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 50  # steps between TensorBoard/console logs
    eval_every: int = 0  # steps between validation runs (0: at the end of every epoch)
    ckpt_every: int = 1000  # steps between checkpoints (also written after every evaluation)
    media_every: int = 500  # steps between image/text samples in TensorBoard (methods that have them)
    keep_last: int = 3  # step checkpoints kept besides the best one
    dist_timeout_s: int = 1800  # process-group timeout
    watchdog_s: int = 1800  # no progress for this long: dump every thread's stack, exit 3 (0: off)
    max_nonfinite: int = 5  # non-finite loss/gradient steps are skipped; abort after this many in a row
    deterministic: bool = False  # torch.use_deterministic_algorithms

    def validate(self) -> None:
        check(self.epochs >= 1, "train.epochs", "must be >= 1")
        check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(self.zero_stage in (0, 1, 2), "train.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        check(self.zero_stage == 0 or self.backend == "deepspeed", "train.zero_stage",
              "ZeRO needs train.backend=deepspeed")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        check(self.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
        check(self.media_every >= 1, "train.media_every", "must be >= 1")
        check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        check(self.dist_timeout_s >= 10, "train.dist_timeout_s", "must be >= 10")
        check(self.watchdog_s >= 0, "train.watchdog_s", "must be >= 0 (0: off)")
        check(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")


@dataclass
class EvalConfig:
    batch_size: int = 256  # images per rank per encoding step
    folds: int = 1  # test protocol: 5 = COCO-1K (mean over 1000-image folds), 1 = full
    val_folds: int = 1
    max_val_images: int = 0  # cap the validation set for speed (0: all)
    database_split: str = ""  # hashing: the retrieval set the queries search ("": data.train_split)
    validation: bool = True  # False: no validation runs; the final test scores the last checkpoint
    examples: int = 4  # retrieval examples in TensorBoard at each validation and the final test (0: none)

    def validate(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        check(self.folds >= 1, "eval.folds", "must be >= 1")
        check(self.val_folds >= 1, "eval.val_folds", "must be >= 1")
        check(self.max_val_images >= 0, "eval.max_val_images", "must be >= 0")
        check(self.examples >= 0, "eval.examples", "must be >= 0")


@dataclass
class Config:
    method: str = "vsepp"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: Any = None  # the method's model dataclass
    loss: Any = None  # the method's loss dataclass

    def validate(self) -> None:
        """Every section's own checks: each section dataclass, a method's too, has ``validate()``."""
        for section in (self.data, self.optim, self.train, self.eval, self.model, self.loss):
            section.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing and checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        check(value in typing.get_args(tp), key, f"expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
              f"expected float, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, failing on unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for name in parents:
        child = node.setdefault(name, {})
        check(isinstance(child, dict), dotted, f"'{name}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=1e-3", "data.hflip=false"]`` -> ``[("optim.lr", 0.001), ...]`` (YAML values)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: overrides look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]}); "
                              f"quote strings holding braces or brackets inside a list") from None
        parsed.append((key.strip(), value))
    return parsed


class MethodSchema(Protocol):
    """What config resolution needs of a method: its section dataclasses and a cross-section check."""
    model_config: type
    loss_config: type

    def validate_config(self, cfg: "Config") -> None: ...


def build_config(raw: dict, overrides: list[str] = (), schema: Callable[[str], MethodSchema] = None) -> Config:
    """Resolve a config tree (from YAML) plus ``--set`` overrides into a validated Config.

    ``schema(name)`` gives the method's section types (raising ConfigError for an unknown name).
    """
    if schema is None:
        raise TypeError("build_config needs the method schema lookup (use xmdist.methods.build_config)")
    raw = dict(raw or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    method_name = raw.get("method", Config.method)
    check(isinstance(method_name, str), "method", f"expected str, got {method_name!r}")
    method = schema(method_name)
    model_raw, loss_raw = raw.pop("model", None) or {}, raw.pop("loss", None) or {}
    cfg = from_dict(Config, raw)
    cfg.model = _coerce(model_raw, method.model_config, "model")
    cfg.loss = _coerce(loss_raw, method.loss_config, "loss")
    cfg.validate()
    method.validate_config(cfg)
    return cfg


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (same tags, nothing executed) that refuses a mapping holding one key
    twice, where plain YAML keeps the last value silently."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: on line {first} and again on line "
                                f"{key_node.start_mark.line + 1} (YAML would keep only the last)", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _load_yaml_text(f) -> object:
    return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A config file as a tree; ``base: other.yaml`` (relative to the file) is read first and
    the file's values override it, section by section."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other")
    with open(path) as f:
        try:
            raw = _load_yaml_text(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return _deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), raw)


def load_config(path: str | Path | None, overrides: list[str] = (),
                schema: Callable[[str], MethodSchema] = None) -> Config:
    """Load ``path`` (YAML, optional) and apply overrides; errors name the file and key."""
    return build_config(read_yaml(path) if path is not None else {}, overrides, schema)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a reader never sees half a file)."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
