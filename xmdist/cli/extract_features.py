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
weights, dtype and feature_shape (layers: ``xmdist/models/backbones.py``; the work is done by
``xmdist/tools/features.py``). Ranks write complete shards into ``OUT/_partial/rNNN/``; rank 0
renames them into OUT and writes ``_info.json`` last, so OUT must be on a filesystem every rank
sees, and a directory without ``_info.json`` is incomplete.

Exit codes: 0 done, 2 bad arguments or input (``error: ...`` on stderr), 1 other errors.
"""
from __future__ import annotations

import argparse
import sys

import torch

from xmdist.cli import HelpFormatter, run_launcher
from xmdist.data.info import ShardError
from xmdist.dist import DistEnv
from xmdist.models.backbones import FeatureError
from xmdist.tools.features import UsageError, check_args, extract_features

__all__ = ["check_args", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but CUDA is not available on this machine")
        extract_features(args, DistEnv.from_environ(device=args.device))
        return 0

    return run_launcher(body, (ShardError, FeatureError, UsageError))


if __name__ == "__main__":
    sys.exit(main())
