"""Feature shard sets: encode a shard set's images with a fixed image encoder and write the features.

The encoder is a torchvision CNN cut at a layer (:mod:`xmdist.models.backbones`) or, with
backbone ``run``, the image encoder of a trained xmdist run (``weights`` = RUN_DIR, its best
checkpoint), e.g. a VSE++ encoder trained on the synthetic shards, whose images no ImageNet
network has seen: layer ``embed`` is its image embedding, layer ``regions`` the last spatial
feature map of its image encoder (the last 4-d activation larger than 1 x 1, e.g. the small
CNN's (256, 8, 8) at 64 px) as ``(h * w, channels)`` regions, row-major, like ``pool5``. :func:`extractor_for`,
:func:`shape_for` and :func:`weights_record` dispatch between the two; ``LAYERS`` lists both.

:func:`extract_features` is the whole of ``launch/extract_features.py`` (usage, output format:
:mod:`xmdist.cli.extract_features`) after argument parsing: every rank writes complete shards of
its share of each split (:func:`write_split_features`) into ``OUT/_partial/rNNN/``; rank 0 renames
them into OUT (:func:`merge_partials`) and writes ``_info.json`` (:func:`feature_info`) last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from xmdist.data.decode import DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, decode_meta, decode_rgb
from xmdist.data.info import ShardSet, Split
from xmdist.data.loader import EvalStream, make_loader
from xmdist.data.writer import (INFO_NAME, FORMAT_NAME, FORMAT_VERSION, ShardSetWriter, clear_shard_set,
                                encode_json, encode_npy, foreign_files, shard_name)
from xmdist.dist import DistEnv, all_reduce_sum, barrier, init_distributed
from xmdist.io import write_json_atomic
from xmdist.models import backbones
from xmdist.models.backbones import (RANDOM_WARNING, FeatureError, build_extractor, check_layer,
                                     describe_weights, eval_transform, feature_shape)
from xmdist.methods import load_config
from xmdist.tools.runs import RunError, load_run, resolve_checkpoint
from xmdist.train.logger import setup_console

log = logging.getLogger("xmdist.extract")
RUN = "run"  # the backbone name of a trained run's image encoder
LAYERS: dict[str, tuple[str, ...]] = {**backbones.LAYERS, RUN: ("embed", "regions")}
PARTIAL = "_partial"  # OUT/_partial/rNNN: one ShardSetWriter directory per rank
COPIED = ("labels.npy", "tags.npy")  # source members carried over verbatim when present
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """Arguments that cannot work together (reported with exit status 2)."""


# ---------------------------------------------------------------- the encoder of a trained run


def run_config(run_dir: str | None):
    """The config of the run in ``run_dir``; FeatureError if there is none."""
    path = Path(run_dir or "") / "config.yaml"
    if not run_dir or not path.is_file():
        raise FeatureError(f"backbone 'run' needs --weights RUN_DIR (a directory written by launch/train.py); "
                           f"{path} not found")
    return load_config(path)


class RunImageEncoder(nn.Module):
    """The frozen image encoder of a trained xmdist run: ``{"embed": method.encode_images(model,
    images), "regions": (B, h * w, C) last spatial feature map}`` (the layers asked for)."""

    backbone = RUN

    def __init__(self, run_dir: str | None, layers: Sequence[str] = ("embed",)):
        super().__init__()
        run_config(run_dir)
        try:
            loaded = load_run(run_dir)
        except RunError as e:
            raise FeatureError(str(e)) from None
        self.model, self.method = loaded.model.requires_grad_(False), loaded.method
        self.layers = tuple(dict.fromkeys(layers))
        self._maps: list[torch.Tensor] = []
        if "regions" in self.layers:  # every module's 4-d output, in forward order
            for m in self.model.modules():
                m.register_forward_hook(lambda _m, _i, out: self._maps.append(out) if
                                        isinstance(out, torch.Tensor) and out.dim() == 4 else None)

    def train(self, mode: bool = True) -> "RunImageEncoder":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._maps.clear()
        out = {"embed": self.method.encode_images(self.model, images)}
        if "regions" in self.layers:
            spatial = [m for m in self._maps if m.shape[-2] * m.shape[-1] > 1]
            if not spatial:
                raise FeatureError(f"the image encoder of run {self.method.cfg.method} has no spatial feature map")
            out["regions"] = spatial[-1].flatten(2).transpose(1, 2).float()  # (B, C, h, w) -> (B, h*w, C)
            self._maps.clear()
        return {k: out[k] for k in self.layers}


def extractor_for(backbone: str, layers: Sequence[str], weights: str | None, seed: int = 0) -> nn.Module:
    """A frozen ``{layer: features}`` module: ``build_extractor``, or the encoder of run ``weights``."""
    for layer in layers:
        check_layer(backbone, layer, LAYERS)
    if backbone == RUN:
        return RunImageEncoder(weights, layers)
    return build_extractor(backbone, layers, weights, seed=seed)


def shape_for(backbone: str, layer: str, image_size: int, weights: str | None) -> tuple[int, ...]:
    """``feature_shape``; for run ``weights``, the shape its encoder gives a blank image of that size."""
    check_layer(backbone, layer, LAYERS)
    if backbone == RUN:
        run_config(weights)
        with torch.no_grad():
            out = RunImageEncoder(weights, [layer])(torch.zeros(1, 3, image_size, image_size))
        return tuple(out[layer].shape[1:])
    return feature_shape(backbone, layer, image_size)


def weights_record(backbone: str, weights: str | None) -> dict[str, Any]:
    """``describe_weights``, or the run directory and its checkpoint that encoded the images."""
    if backbone == RUN:
        return {"weights": str(weights), "run_checkpoint": resolve_checkpoint(Path(weights), "best")}
    return describe_weights(backbone, weights)


# ---------------------------------------------------------------- writing a feature shard set


def check_args(args: argparse.Namespace, env: DistEnv) -> tuple[ShardSet, dict[str, Split | None]]:
    """Everything that can be wrong with the input, checked by every rank before any collective.

    Returns the source and the splits to encode (None for a split the source has but empty).
    """
    for name in ("batch_size", "samples_per_shard", "image_size", "resize"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.resize < args.image_size:
        raise UsageError(f"--resize ({args.resize}) must be >= --image-size ({args.image_size})")
    if args.precision == "fp16" and env.device.type != "cuda":
        raise UsageError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    shape_for(args.backbone, args.layer, args.image_size, args.weights)  # unknown backbone/layer, too small

    source = ShardSet.open(args.shards)
    if args.splits is None:  # e.g. train/val/test, or dcmh's train/query/retrieval
        names = list(source.info["splits"])
    else:
        names = list(dict.fromkeys(s.strip() for s in args.splits.split(",") if s.strip()))
    if not names:
        raise UsageError("no split to encode (--splits is empty)")
    splits: dict[str, Split | None] = {}
    for name in names:
        entry = source.info["splits"].get(name)
        empty = entry is not None and int(entry.get("num_samples", 0)) == 0
        splits[name] = None if empty else source.split(name)  # unknown split, missing shard files

    out = Path(args.out)
    if out.resolve() == source.root.resolve():
        raise UsageError("--out must differ from --shards (the source would be deleted)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    other = [name for name in foreign_files(out) if name != PARTIAL]
    if other and not args.overwrite:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        raise UsageError(f"--out {out} contains files that are not an xmdist shard set ({shown}); pass "
                         "--overwrite to write there anyway (only old shards and _info.json are deleted)")
    return source, splits


class FeatureBatcher:
    """The decoder role of ``EvalStream``: raw samples -> normalised images + members to write.

    A sample that cannot be decoded is skipped with a warning (as in training and evaluation);
    the final ``_info.json`` reports the samples missing per split.
    """

    def __init__(self, image_size: int, resize: int, copied: tuple[str, ...]):
        self.transform, self.image_size, self.resize = eval_transform(image_size, resize), image_size, resize
        self.copied = copied

    def eval_batch(self, samples: list[dict]) -> dict:
        images, records = [], []
        for sample in samples:
            try:
                meta = decode_meta(sample)
                # id first and an int, then the source's other fields (captions, split, ...)
                record = {"__key__": sample["__key__"],
                          "json": encode_json({"id": int(meta["id"]), **{k: v for k, v in meta.items() if k != "id"}}),
                          **{m: sample[m] for m in self.copied}}
                images.append(self.transform(decode_rgb(sample, self.resize)))
                records.append(record)
            except DECODE_ERRORS as e:
                log.warning("skipping sample %s of %s: %s: %s", sample.get("__key__"), sample.get("__url__"),
                            type(e).__name__, e)
        size = self.image_size
        return {"images": torch.stack(images) if images else torch.empty(0, 3, size, size), "records": records}


def write_split_features(model: nn.Module, split: Split, writer: ShardSetWriter, batcher: FeatureBatcher,
                         args: argparse.Namespace, env: DistEnv, shape: tuple[int, ...]) -> int:
    """Write this rank's share of ``split``; returns the number of non-finite feature values."""
    member, out_dtype = f"{args.layer}.npy", getattr(torch, args.dtype)
    autocast = (torch.autocast(env.device.type, dtype=AUTOCAST[args.precision]) if args.precision in AUTOCAST
                else contextlib.nullcontext())
    stream = EvalStream(split, batcher, args.batch_size, env.rank, env.world_size)
    nonfinite, done, start, last_log = 0, 0, time.time(), time.time()
    for batch in make_loader(stream, args.num_workers, pin_memory=env.device.type == "cuda"):
        if not batch["records"]:
            continue
        images = batch["images"].to(env.device, non_blocking=True)
        if env.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast:
            feats = model(images)[args.layer]
        if tuple(feats.shape[1:]) != shape:  # shape_for() and the network disagree: a bug
            raise RuntimeError(f"{args.backbone} {args.layer} gave {tuple(feats.shape[1:])}, expected {shape}")
        feats = feats.float().to(out_dtype)  # float16 overflows above 65504: counted, reported below
        nonfinite += int((~torch.isfinite(feats)).sum())
        for record, feat in zip(batch["records"], feats.cpu().numpy()):
            key = record.pop("__key__")
            writer.write(split.name, key, {**record, member: encode_npy(feat)})
        done += len(batch["records"])
        if time.time() - last_log > 30:
            last_log = time.time()
            log.info("%s: %d images on rank %d (%.0f/s)", split.name, done, env.rank, done / (last_log - start))
    return nonfinite


def merge_partials(out: Path, world: int, names: list[str]) -> dict[str, list[dict]]:
    """Rename every rank's shards into ``out`` as ``{split}-{index:06d}.tar``, rank by rank."""
    shards: dict[str, list[dict]] = {name: [] for name in names}
    for rank in range(world):
        part = out / PARTIAL / f"r{rank:03d}"
        info = json.loads((part / INFO_NAME).read_text())
        for name in names:
            for shard in info["splits"][name]["shards"]:
                final = shard_name(name, len(shards[name]))
                os.replace(part / shard["name"], out / final)
                shards[name].append({"name": final, "num_samples": shard["num_samples"]})
    shutil.rmtree(out / PARTIAL)
    return shards


def feature_info(args: argparse.Namespace, env: DistEnv, source: ShardSet, shape: tuple[int, ...],
                 weights: dict, members: list[str], shards: dict[str, list[dict]]) -> dict:
    """The feature set's ``_info.json``: what was extracted how, plus the source's metadata."""
    src = source.info
    counts = {name: sum(s["num_samples"] for s in shards[name]) for name in shards}
    missing = {name: src["splits"][name]["num_samples"] - n for name, n in counts.items()
               if n != src["splits"][name]["num_samples"]}
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "source": "features",
        "backbone": args.backbone, "layer": args.layer, "feature_shape": list(shape), "dtype": args.dtype,
        **weights, "precision": args.precision,
        "transform": {"resize": args.resize, "crop": args.image_size,
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "captions_per_image": source.captions_per_image,
        "label_names": src.get("label_names", []), "tag_vocab": src.get("tag_vocab", []),
        "origin": {"shards": str(source.root.resolve()),
                   **{k: src[k] for k in ("source", "seed", "image_size") if k in src}},
        "extracted_splits": list(shards), **({"missing": missing} if missing else {}),
        "generator": {"shards": args.shards, "splits": args.splits, "weights": args.weights, "seed": args.seed,
                      "batch_size": args.batch_size, "samples_per_shard": args.samples_per_shard,
                      "world_size": env.world_size, "device": env.device.type},
        "members": sorted(members),
        # every split of the source appears (readers expect them); those not extracted stay empty
        "splits": {name: {"num_samples": counts.get(name, 0), "shards": shards.get(name, [])}
                   for name in dict.fromkeys([*src["splits"], *shards])},
    }


def extract_features(args: argparse.Namespace, env: DistEnv) -> None:
    """Write the feature shard set ``args`` (``xmdist.cli.extract_features.parse_args``) describes."""
    source, splits = check_args(args, env)
    shape = shape_for(args.backbone, args.layer, args.image_size, args.weights)
    # Built before the process group exists: weights that cannot be loaded fail identically on
    # every rank, so all ranks exit with the message instead of waiting in a collective.
    model = extractor_for(args.backbone, [args.layer], args.weights, seed=args.seed)
    setup_console(env)
    init_distributed(env)
    weights = weights_record(args.backbone, args.weights) if env.is_main else {}
    if weights.get("random_weights"):
        log.warning(RANDOM_WARNING)
    model.to(env.device)
    if env.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # one input size throughout

    out, start = Path(args.out), time.time()
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clear_shard_set(out)  # _info.json first: the old set is invalid from here on
        shutil.rmtree(out / PARTIAL, ignore_errors=True)  # an interrupted earlier run
    barrier()
    names = list(splits)
    copied = tuple(m for m in COPIED if m in source.info.get("members", COPIED))
    members = ["json", f"{args.layer}.npy", *copied]
    batcher = FeatureBatcher(args.image_size, args.resize, copied)
    nonfinite = 0
    with ShardSetWriter(out / PARTIAL / f"r{env.rank:03d}", members, args.samples_per_shard, names) as writer:
        for name, split in splits.items():
            if split is not None:
                nonfinite += write_split_features(model, split, writer, batcher, args, env, shape)
        nonfinite = int(all_reduce_sum(torch.tensor([nonfinite], device=env.device)).item())
        if nonfinite:  # every rank knows the total, so all of them stop here together
            raise FeatureError(f"{nonfinite} feature values are not finite in {args.dtype} "
                               f"(precision {args.precision}): use --dtype float32 or --precision fp32")
        writer.finish({"rank": env.rank})
    barrier()
    if env.is_main:
        shards = merge_partials(out, env.world_size, names)
        info = feature_info(args, env, source, shape, weights, members, shards)
        if "missing" in info:
            log.warning("samples missing (unreadable in the source): %s", info["missing"])
        write_json_atomic(out / INFO_NAME, info, indent=1)  # as ShardSetWriter.finish writes it
        summary = ", ".join(f"{name} {info['splits'][name]['num_samples']}" for name in names)
        print(f"wrote {args.backbone} {args.layer} {list(shape)} features ({summary}) to {out} on "
              f"{env.world_size} rank(s) in {time.time() - start:.1f}s"
              + (" -- RANDOM WEIGHTS, not real features" if weights.get("random_weights") else ""))
    barrier()  # every rank returns only once the set is complete
