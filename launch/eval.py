"""Evaluate a checkpoint of a run: metrics to JSON, metrics and retrieval examples to TensorBoard.

    # the best validation checkpoint on the test split, 2 processes (same numbers as the run's eval.json)
    torchrun --nproc_per_node=2 launch/eval.py --checkpoint runs/demo --split test --out results.json
    # another checkpoint, COCO-1K protocol, another TensorBoard directory
    torchrun ... launch/eval.py --checkpoint runs/coco --which step_00012000 --folds 5 \
        --out coco1k.json --tb runs/coco/tb_eval_1k

``--mode common`` (the only mode so far): common-space R@1/5/10, medr, meanr and rsum with
``xmdist.evaluate.evaluate`` (every rank encodes its share). With TensorBoard (``--tb``, default
RUN/tb_eval; ``--tb none`` skips it) the split is encoded a second time for: the metrics as
scalars ``SPLIT/...``, the recall@K curves (K = 1..50, both directions; also in the JSON) drawn
as an image, and retrieval examples over the whole split: 4 query images with their top-5
captions (text, ✓ correct / ✗ wrong) and 4 query captions with their top-5 images (a grid, green
border correct, red wrong). Everything is logged at the checkpoint's training step.
Exit codes: 0 done, 2 bad input (missing run, checkpoint, shards; the message says which), 1 other.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmdist.config import ConfigError  # noqa: E402
from xmdist.data.info import ShardError, ShardSet  # noqa: E402
from xmdist.cli import run_launcher  # noqa: E402
from xmdist.dist import DistEnv, init_distributed  # noqa: E402
from xmdist.inference import RunError, load_run, read_split_images, read_split_meta  # noqa: E402
from xmdist.logger import setup_console  # noqa: E402

log = logging.getLogger("xmdist.eval")
CURVE_KS = range(1, 51)
GREEN, RED = (0, 170, 0), (210, 0, 0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory written by train.py")
    p.add_argument("--which", default="best", help="best (default), latest or step_XXXXXXXX")
    p.add_argument("--shards", help="shard set directory (default: the run's data.shards)")
    p.add_argument("--split", help="split to evaluate (default: the run's data.test_split)")
    p.add_argument("--folds", type=int, help="1: whole split; 5: COCO-1K (default: the run's eval.folds)")
    p.add_argument("--mode", default="common", choices=sorted(MODES), help="evaluation protocol")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--tb", help="TensorBoard directory (default RUN_DIR/tb_eval; 'none': no TensorBoard)")
    p.add_argument("--examples", type=int, default=4, help="query images and captions shown (default 4)")
    p.add_argument("--batch-size", type=int, default=0, help="images per rank per step (default: eval.batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


# ---------------------------------------------------------------- modes


def common_mode(ctx: dict) -> tuple[dict, dict | None]:
    """Common-space retrieval: (metrics, embeddings for TensorBoard or None)."""
    from xmdist.evaluate import encode_split, evaluate

    loaded, env, a = ctx["loaded"], ctx["env"], ctx["args"]
    cfg = loaded.config
    common = (loaded.model, ctx["split"], loaded.decoder, env, cfg.model.embed_dim, ctx["batch_size"],
              cfg.data.num_workers, ctx["cpi"])
    metrics = evaluate(*common, a.folds, 0, loaded.autocast)
    if not ctx["tb"]:
        return metrics, None
    img, cap = encode_split(*common, 0, loaded.autocast)
    return metrics, {"img": img, "cap": cap}


# A hashing mode ("hamming": mAP / precision@K / PR of sign codes) plugs in here with the same
# signature once a hashing method exists.
MODES = {"common": common_mode}


# ---------------------------------------------------------------- TensorBoard


def recall_curve(img: torch.Tensor, cap: torch.Tensor, cpi: int, folds: int) -> dict[str, list[float]]:
    from xmdist.metrics import recall_at_k

    n = len(img) - len(img) % folds
    m = recall_at_k(img[:n], cap[: n * cpi], ks=CURVE_KS, folds=folds, captions_per_image=cpi)
    return {d: [m[f"{d}_r{k}"] for k in CURVE_KS] for d in ("i2t", "t2i")}


def draw_curve(curve: dict[str, list[float]], title: str) -> np.ndarray:
    """Recall@K (K = 1..50) of both directions as an RGB image (H, W, 3) uint8."""
    w, h, left, right, top, bottom = 640, 420, 50, 20, 30, 40
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    x = lambda k: left + (k - 1) / (CURVE_KS[-1] - 1) * (w - left - right)  # noqa: E731
    y = lambda r: top + (100 - r) / 100 * (h - top - bottom)  # noqa: E731
    for r in range(0, 101, 10):
        d.line([(x(1), y(r)), (x(CURVE_KS[-1]), y(r))], fill=(225, 225, 225))
        d.text((left - 28, y(r) - 6), f"{r:3d}", fill="black")
    for k in (1, 5, 10, 20, 30, 40, 50):
        d.line([(x(k), y(0)), (x(k), y(100))], fill=(225, 225, 225))
        d.text((x(k) - 6, h - bottom + 6), str(k), fill="black")
    d.rectangle([x(1), y(100), x(CURVE_KS[-1]), y(0)], outline="black")
    for (name, values), color in zip(curve.items(), ((31, 119, 180), (255, 127, 14))):
        d.line([(x(k), y(v)) for k, v in zip(CURVE_KS, values)], fill=color, width=2)
    d.text((left, 8), f"{title}   recall@K (%) vs K", fill="black")
    d.text((w - 200, 8), "i2t", fill=(31, 119, 180))
    d.text((w - 160, 8), "t2i", fill=(255, 127, 14))
    d.text((w // 2 - 5, h - 16), "K", fill="black")
    return np.asarray(im)


def _pil(image: torch.Tensor, size: int) -> Image.Image:
    im = Image.fromarray(image.permute(1, 2, 0).numpy())
    scale = max(1, -(-size // max(im.size)))  # small images are enlarged (nearest) for display
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def image_row(caption: str, images: list[torch.Tensor], correct: list[bool], border: int = 4) -> np.ndarray:
    """The query caption above its top images, each framed green (correct) or red (wrong)."""
    tiles = [_pil(im, 96) for im in images]
    tw, th = max(t.width for t in tiles) + 2 * border, max(t.height for t in tiles) + 2 * border
    w = len(tiles) * (tw + 6) + 6
    lines = textwrap.wrap(caption, max(20, w // 7))[:4]
    head = 8 + 14 * len(lines)
    im = Image.new("RGB", (w, head + th + 8), "white")
    d = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        d.text((6, 4 + 14 * i), line, fill="black")
    for i, (tile, ok) in enumerate(zip(tiles, correct)):
        x0 = 6 + i * (tw + 6)
        d.rectangle([x0, head, x0 + tw - 1, head + th - 1], fill=GREEN if ok else RED)
        im.paste(tile, (x0 + border, head + border))
    return np.asarray(im)


def log_tensorboard(tb_dir: str, loaded, split, metrics: dict, emb: dict, curve: dict, cpi: int,
                    examples: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    step, name = loaded.step, split.name
    writer = SummaryWriter(tb_dir)
    for k, v in metrics.items():
        writer.add_scalar(f"{name}/{k}", v, step)
    writer.add_image(f"{name}/recall_at_k_curve", draw_curve(curve, f"{name} split, {loaded.checkpoint}:"), step,
                     dataformats="HWC")
    ids, captions = read_split_meta(split)
    img, cap = emb["img"], emb["cap"]
    n = len(img)
    q_img = sorted(set(np.linspace(0, n - 1, examples).round().astype(int).tolist()))
    q_cap = [int(i) * cpi + j % cpi for j, i in enumerate(q_img)]  # a different caption position each
    top_cap = (img[q_img] @ cap.T).topk(min(5, len(cap)), dim=1)
    top_img = (cap[q_cap] @ img.T).topk(min(5, n), dim=1)
    shown = {ids[i] for i in q_img} | {ids[int(r)] for r in top_img.indices.flatten()}
    pixels = read_split_images(split, shown, loaded)
    for j, i in enumerate(q_img):
        rows = ["| rank | | caption | of image | score |", "|---|---|---|---|---|"]
        for r, (c, s) in enumerate(zip(top_cap.indices[j].tolist(), top_cap.values[j].tolist()), 1):
            mark, cap_md = "✓" if c // cpi == i else "✗", captions[c // cpi][c % cpi].replace("|", "\\|")
            rows.append(f"| {r} | {mark} | {cap_md} | {ids[c // cpi]} | {s:.3f} |")
        text = (f"**query image** id {ids[i]} ({name}, {loaded.checkpoint}); top-5 captions of the whole split "
                f"(✓: a caption of this image)\n\n" + "\n".join(rows))
        writer.add_text(f"examples/i2t_{j}/captions", text, step)
        writer.add_image(f"examples/i2t_{j}/image", np.asarray(_pil(pixels[ids[i]], 128)), step, dataformats="HWC")
    for j, c in enumerate(q_cap):
        rows = top_img.indices[j].tolist()
        correct = [r == c // cpi for r in rows]
        query = captions[c // cpi][c % cpi]
        writer.add_image(f"examples/t2i_{j}", image_row(f'"{query}" (image {ids[c // cpi]})',
                                                          [pixels[ids[r]] for r in rows], correct),
                         step, dataformats="HWC")
        listing = ", ".join(f"{'✓' if ok else '✗'} {ids[r]} ({s:.3f})"
                            for r, ok, s in zip(rows, correct, top_img.values[j].tolist()))
        writer.add_text(f"examples/t2i_{j}/query", f"**query caption** \"{query}\" (of image {ids[c // cpi]}); "
                        f"top-5 images: {listing}", step)
    writer.close()


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        env = DistEnv.from_environ(device=args.device)
        setup_console(env)
        loaded = load_run(args.checkpoint, args.which, env.device)  # every rank checks before any collective
        cfg = loaded.config
        shards = ShardSet.open(args.shards or cfg.data.shards)
        split = shards.split(args.split or cfg.data.test_split)
        args.folds = args.folds or cfg.eval.folds
        if args.folds < 1 or args.examples < 1:
            raise RunError("--folds and --examples must be >= 1")
        tb = None if args.tb == "none" else (args.tb or str(Path(args.checkpoint) / "tb_eval"))
        init_distributed(env, cfg.train.dist_timeout_s)
        ctx = {"loaded": loaded, "env": env, "args": args, "split": split, "cpi": shards.captions_per_image,
               "batch_size": args.batch_size or cfg.eval.batch_size, "tb": tb}
        metrics, emb = MODES[args.mode](ctx)
        if env.is_main:
            result = {"run": str(Path(args.checkpoint).resolve()), "split": split.name,
                      "checkpoint": loaded.checkpoint, "step": loaded.step, "folds": args.folds, "mode": args.mode,
                      "shards": str(shards.root.resolve()), **metrics}
            if emb is not None:
                result["recall_curve"] = recall_curve(emb["img"], emb["cap"], shards.captions_per_image, args.folds)
                log_tensorboard(tb, loaded, split, metrics, emb, result["recall_curve"], shards.captions_per_image,
                                args.examples)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            log.info("%s of %s (%s) -> %s%s", args.mode, split.name, loaded.checkpoint, args.out,
                     f", TensorBoard {tb}" if tb else "")
        return 0

    return run_launcher(body, (ConfigError, ShardError, RunError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
