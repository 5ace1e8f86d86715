"""Evaluate a checkpoint of a run: metrics to JSON, metrics and retrieval examples to TensorBoard.

    # the best validation checkpoint on the test split, 2 processes (same numbers as the run's eval.json)
    torchrun --nproc_per_node=2 launch/eval.py --checkpoint runs/demo --split test --out results.json
    # another checkpoint, COCO-1K protocol, another TensorBoard directory
    torchrun ... launch/eval.py --checkpoint runs/coco --which step_00012000 --folds 5 \
        --out coco1k.json --tb runs/coco/tb_eval_1k

    # a hashing run (DJSRH, SGRN): test queries against the training set as database
    torchrun ... launch/eval.py --checkpoint runs/sgrn64 --split test --database train --out sgrn64.json

``--mode`` follows the run's method unless given. ``common``: common-space R@1/5/10, medr, meanr
and rsum with ``xmdist.evaluate`` (every rank encodes its share, once). ``hamming``: sign
codes of the query split against the database split, mAP@all, mAP@K in both conventions
(``window`` DJSRH/DCMH, ``first`` AGAH/DGCPN), the P@K curve, the PR curve over Hamming radius
0..K and the chance level (fraction of relevant pairs), with ``xmdist.evaluate_hashing``; its
TensorBoard shows the PR and P@K curves as images and each bit's balance over the database as
histograms (``codes/bit_balance_{image,text}``: the mean of a bit, 0 = balanced), and for a few
queries their 5 nearest database items with labels.

``common`` with TensorBoard (``--tb``, default RUN/tb_eval; ``--tb none`` skips it) logs, from
the embeddings the metrics were computed on: the metrics as
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
    p.add_argument("--mode", choices=sorted(MODES), help="evaluation protocol (default: the method's)")
    p.add_argument("--database", help="hamming: the retrieval split (default: eval.database_split or the "
                                      "training split)")
    p.add_argument("--topk", type=int, default=50, help="hamming: K of mAP@K (default 50)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--tb", help="TensorBoard directory (default RUN_DIR/tb_eval; 'none': no TensorBoard)")
    p.add_argument("--examples", type=int, default=4, help="query images and captions shown (default 4)")
    p.add_argument("--batch-size", type=int, default=0, help="images per rank per step (default: eval.batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


# ---------------------------------------------------------------- modes


def common_mode(ctx: dict) -> tuple[dict, dict | None]:
    """Common-space retrieval: (metrics, embeddings for TensorBoard or None)."""
    from xmdist.evaluate import encode_split, score_split

    loaded, env, a = ctx["loaded"], ctx["env"], ctx["args"]
    cfg = loaded.config
    # encoded once, for the metrics and for TensorBoard
    img, cap = encode_split(loaded.model, ctx["split"], loaded.decoder, env, cfg.model.embed_dim, ctx["batch_size"],
                            cfg.data.num_workers, ctx["cpi"], 0, loaded.autocast)
    metrics = score_split(img, cap, ctx["split"].name, env, ctx["cpi"], a.folds)
    return metrics, ({"img": img, "cap": cap} if ctx["tb"] else None)


def hamming_mode(ctx: dict) -> tuple[dict, dict]:
    """Hashing: (metrics with curves, codes of queries and database)."""
    from xmdist.dist import broadcast_object
    from xmdist.evaluate_hashing import encode_codes, score

    loaded, env, a = ctx["loaded"], ctx["env"], ctx["args"]
    cfg = loaded.config
    database = ctx["shards"].split(a.database or cfg.eval.database_split or cfg.data.train_split)
    codes = {name: encode_codes(loaded.model, split, loaded.decoder, env, ctx["batch_size"], 0, loaded.autocast)
             for name, split in (("query", ctx["split"]), ("db", database))}
    metrics = score(codes["query"], codes["db"], topk=a.topk, curves=True) if env.is_main else None
    metrics = broadcast_object(metrics)
    metrics["database_split"] = database.name
    return metrics, codes


MODES = {"common": common_mode, "hamming": hamming_mode}


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


def draw_xy(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str,
            xmax: float, log_x: bool = False) -> np.ndarray:
    """Lines y(x) in [0, 1] (None points skipped) as an RGB image (H, W, 3) uint8."""
    w, h, left, right, top, bottom = 640, 420, 50, 20, 30, 40
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    fx = (lambda v: np.log10(max(v, 1)) / np.log10(max(xmax, 10))) if log_x else (lambda v: v / xmax)
    x = lambda v: left + fx(v) * (w - left - right)  # noqa: E731
    y = lambda v: top + (1 - v) * (h - top - bottom)  # noqa: E731
    for t in np.linspace(0, 1, 6):
        d.line([(x(0 if not log_x else 1), y(t)), (x(xmax), y(t))], fill=(225, 225, 225))
        d.text((left - 34, y(t) - 6), f"{t:.1f}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    ticks = [10 ** e for e in range(int(np.log10(max(xmax, 10))) + 1)] if log_x else np.linspace(0, xmax, 6)
    for t in ticks:
        d.text((x(t) - 8, h - bottom + 6), f"{t:g}", fill="black")
    colors = ((31, 119, 180), (255, 127, 14), (44, 160, 44))
    for i, ((name, (xs, ys)), color) in enumerate(zip(series.items(), colors)):
        pts = [(x(a), y(b)) for a, b in zip(xs, ys) if a is not None and b is not None]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        d.text((w - 200 + 50 * i, 8), name, fill=color)
    d.text((left, 8), title, fill="black")
    d.text((w // 2 - 40, h - 16), xlabel, fill="black")
    d.text((4, top - 20), ylabel, fill="black")
    return np.asarray(im)


def log_hashing_tensorboard(tb_dir: str, loaded, split, metrics: dict, codes: dict, label_names: list[str],
                            examples: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from xmdist.evaluate_hashing import bit_balance

    step, name = loaded.step, split.name
    writer = SummaryWriter(tb_dir)
    for k, v in metrics.items():
        if isinstance(v, float):
            writer.add_scalar(f"{name}/{k}", v, step)
    c = {d: metrics[f"curves_{d}"] for d in ("i2t", "t2i")}
    title = f"{name} -> {metrics['database_split']}, {loaded.checkpoint}"
    writer.add_image(f"{name}/pr_curve", draw_xy({d: (c[d]["pr_recall"], c[d]["pr_precision"]) for d in c},
                                                 f"{title}: precision vs recall", "recall", "precision", 1.0),
                     step, dataformats="HWC")
    writer.add_image(f"{name}/precision_at_k", draw_xy({d: (c[d]["k"], c[d]["precision_at_k"]) for d in c},
                                                       f"{title}: P@K", "K (log)", "precision",
                                                       max(c["i2t"]["k"]), log_x=True), step, dataformats="HWC")
    for modality in ("image", "text"):
        writer.add_histogram(f"codes/bit_balance_{modality}", bit_balance(codes["db"][modality]), step)
    for direction, q_mod, db_mod in (("i2t", "image", "text"), ("t2i", "text", "image")):
        writer.add_text(f"examples/{direction}", hashing_examples(codes, q_mod, db_mod, label_names, examples), step)
    writer.close()


def hashing_examples(codes: dict, q_mod: str, db_mod: str, label_names: list[str], examples: int) -> str:
    """Markdown: a few queries (evenly spaced) with their 5 nearest database items by Hamming
    distance (ties by index), each item's labels, ✓ when it shares one with the query."""
    q, db = codes["query"], codes["db"]
    name = lambda row: ", ".join(label_names[i] if i < len(label_names) else str(i)  # noqa: E731
                                 for i in row.nonzero().flatten().tolist()) or "(none)"
    out = []
    for i in sorted(set(np.linspace(0, len(q[q_mod]) - 1, examples).round().astype(int).tolist())):
        dist = 0.5 * (q[q_mod].shape[1] - db[db_mod] @ q[q_mod][i])
        top = torch.sort(dist, stable=True).indices[:5].tolist()
        rows = [f"| {r} | {'✓' if bool((db['labels'][t] * q['labels'][i]).any()) else '✗'} | {t} | "
                f"{int(dist[t])} | {name(db['labels'][t])} |" for r, t in enumerate(top, 1)]
        out.append(f"**query {i}** ({q_mod}; labels: {name(q['labels'][i])})\n\n| rank | | item | Hamming | labels |\n"
                   "|---|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(out)


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
        loaded = load_run(args.checkpoint, args.which, env.device, shards=args.shards)  # checked before collectives
        cfg = loaded.config
        args.mode = args.mode or ("common" if loaded.vocab is not None else "hamming")
        if args.mode == "common" and loaded.vocab is None:
            raise RunError(f"--mode common needs a caption model; {args.checkpoint} is a {cfg.method} run")
        shards = ShardSet.open(args.shards or cfg.data.shards)
        split = shards.split(args.split or cfg.data.test_split)
        args.folds = args.folds or cfg.eval.folds
        if args.folds < 1 or args.examples < 1:
            raise RunError("--folds and --examples must be >= 1")
        tb = None if args.tb == "none" else (args.tb or str(Path(args.checkpoint) / "tb_eval"))
        init_distributed(env, cfg.train.dist_timeout_s)
        ctx = {"loaded": loaded, "env": env, "args": args, "split": split, "shards": shards,
               "cpi": shards.captions_per_image,
               "batch_size": args.batch_size or cfg.eval.batch_size, "tb": tb}
        metrics, emb = MODES[args.mode](ctx)
        if env.is_main:
            result = {"run": str(Path(args.checkpoint).resolve()), "split": split.name,
                      "checkpoint": loaded.checkpoint, "step": loaded.step, "folds": args.folds, "mode": args.mode,
                      "shards": str(shards.root.resolve()), **metrics}
            if args.mode == "hamming" and tb:
                names = cfg.data.labels or shards.info.get("label_names", [])
                log_hashing_tensorboard(tb, loaded, split, metrics, emb, names, args.examples)
            elif emb is not None:
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
