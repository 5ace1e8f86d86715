"""Encode the images of a shard set with a fixed CNN and write a *feature shard set*.

    # one process (the GPU if there is one, else the CPU)
    python launch/extract_features.py --shards shards/coco --out shards/coco-alexnet-fc7 \
        --backbone alexnet --layer fc7
    # 8 GPUs: every rank encodes its share of each split and writes its own shards
    torchrun --nproc_per_node=8 launch/extract_features.py --shards shards/coco \
        --out shards/coco-vgg19-pool5 --backbone vgg19 --layer pool5 --precision bf16
    # offline: weights from a file (the error message says which file and where it can go)
    python launch/extract_features.py ... --weights ~/models/vgg19-dcbb9e9d.pth

The output has the source's splits and keys. Each sample holds ``KEY.json`` (the source JSON:
id, captions, ...), ``KEY.{layer}.npy`` (float16 unless ``--dtype float32``; shape ``feature_shape``)
and the source's ``KEY.labels.npy`` / ``KEY.tags.npy``; ``_info.json`` records the backbone, layer,
weights, dtype and feature_shape (layers: ``xmdist/features.py``). Ranks write complete shards
into ``OUT/_partial/rNNN/``; rank 0 renames them into OUT and writes ``_info.json`` last, so OUT
must be on a filesystem every rank sees, and a directory without ``_info.json`` is incomplete.

Exit codes: 0 done, 2 bad arguments or input (``error: ...`` on stderr), 1 other errors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from xmdist.data.decode import DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, decode_meta, decode_rgb  # noqa: E402
from xmdist.data.info import ShardError, ShardSet, Split  # noqa: E402
from xmdist.data.loader import EvalStream, make_loader  # noqa: E402
from xmdist.data.writer import (INFO_NAME, FORMAT_NAME, FORMAT_VERSION, ShardSetWriter, clear_shard_set,  # noqa: E402
                                encode_json, encode_npy, foreign_files, shard_name)
from xmdist.cli import run_launcher  # noqa: E402
from xmdist.dist import DistEnv, all_reduce_sum, barrier, init_distributed  # noqa: E402
from xmdist.features import (RANDOM_WARNING, FeatureError, build_extractor, describe_weights,  # noqa: E402
                             eval_transform, feature_shape)
from xmdist.logger import setup_console  # noqa: E402

log = logging.getLogger("xmdist.extract")
PARTIAL = "_partial"  # OUT/_partial/rNNN: one ShardSetWriter directory per rank
COPIED = ("labels.npy", "tags.npy")  # source members carried over verbatim when present
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """Arguments that cannot work together (reported with exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="source shard set (launch/make_shards.py)")
    p.add_argument("--out", required=True, help="output directory for the feature shard set")
    p.add_argument("--backbone", required=True,
                   help="alexnet, vgg16, vgg19, resnet18 ... resnet152, or run (a trained xmdist run: "
                        "--weights RUN_DIR --layer embed)")
    p.add_argument("--layer", required=True, help="fc7 (alexnet, vgg), pool5 (vgg), pool (resnet), embed (run)")
    p.add_argument("--splits", default=None,
                   help="comma-separated, e.g. train,val (default: every split of the source)")
    p.add_argument("--weights", default="DEFAULT",
                   help="torchvision weights name (DEFAULT, IMAGENET1K_V1), a .pth file, or 'random' "
                        "(untrained: tests and offline smoke runs only, recorded in _info.json)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass per rank")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast for the forward pass (fp16 needs CUDA)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per rank")
    p.add_argument("--image-size", type=int, default=224, help="center crop side (default 224)")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the crop (default 256)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="at most this many per output shard")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --weights random")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds other files (they are kept)")
    return p.parse_args(argv)


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
    feature_shape(args.backbone, args.layer, args.image_size, args.weights)  # unknown backbone/layer, too small

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


def encode_split(model: torch.nn.Module, split: Split, writer: ShardSetWriter, batcher: FeatureBatcher,
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
        if tuple(feats.shape[1:]) != shape:  # feature_shape() and the network disagree: a bug
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


def write_info(out: Path, info: dict) -> None:
    """``_info.json`` atomically, as ``ShardSetWriter.finish`` writes it."""
    tmp = out / (INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / INFO_NAME)


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


def run(args: argparse.Namespace, env: DistEnv) -> None:
    source, splits = check_args(args, env)
    shape = feature_shape(args.backbone, args.layer, args.image_size, args.weights)
    # Built before the process group exists: weights that cannot be loaded fail identically on
    # every rank, so all ranks exit with the message instead of waiting in a collective.
    model = build_extractor(args.backbone, [args.layer], args.weights, seed=args.seed)
    setup_console(env)
    init_distributed(env)
    weights = describe_weights(args.backbone, args.weights) if env.is_main else {}
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
                nonfinite += encode_split(model, split, writer, batcher, args, env, shape)
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
        write_info(out, info)
        summary = ", ".join(f"{name} {info['splits'][name]['num_samples']}" for name in names)
        print(f"wrote {args.backbone} {args.layer} {list(shape)} features ({summary}) to {out} on "
              f"{env.world_size} rank(s) in {time.time() - start:.1f}s"
              + (" -- RANDOM WEIGHTS, not real features" if weights.get("random_weights") else ""))
    barrier()  # every rank returns only once the set is complete


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but CUDA is not available on this machine")
        run(args, DistEnv.from_environ(device=args.device))
        return 0

    return run_launcher(body, (ShardError, FeatureError, UsageError))


if __name__ == "__main__":
    sys.exit(main())
