"""TensorBoard reports of an evaluation (``launch/eval.py``): curves drawn as images, and
retrieval examples over the whole split.

``common``: the recall@K curves (K = 1..50, both directions) as an image; 4 query images with
their top-5 captions (text, ✓ correct / ✗ wrong) and 4 query captions with their top-5 images (a
grid, green border correct, red wrong). ``hamming``: the PR and P@K curves as images, the PR
curves also in TensorBoard's PR Curves tab, each bit's balance over the database as histograms
(``codes/bit_balance_{image,text}``: the mean of a bit, 0 = balanced), and for a few queries
their 5 nearest database items with labels. The examples and PR curves are also logged at each
validation and the final test of a training run (``val/``, ``test/`` prefixes).
"""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from xmdist.data.splits import read_split_captions, read_split_images
from xmdist.metrics.hashing import pr_counts

CURVE_KS = range(1, 51)
GREEN, RED = (0, 170, 0), (210, 0, 0)
CAPTION_PX = 15  # caption text in image strips: readable when TensorBoard shows the strip at card width


def _font(size: int = CAPTION_PX):
    """A scalable font of ``size`` px where Pillow has FreeType, else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


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


def hamming_report(writer, split, metrics: dict, codes: dict, balance: dict[str, torch.Tensor],
                   label_names: list[str], step: int, title: str, examples: int) -> None:
    """Scalars, curve images, bit balance and nearest-item examples of a hashing evaluation."""
    name = split.name
    for k, v in metrics.items():
        if isinstance(v, float):
            writer.add_scalar(f"{name}/{k}", v, step)
    c = {d: metrics[f"curves_{d}"] for d in ("i2t", "t2i")}
    title = f"{name} -> {metrics['database_split']}, {title}"
    writer.add_image(f"{name}/pr_curve", draw_xy({d: (c[d]["pr_recall"], c[d]["pr_precision"]) for d in c},
                                                 f"{title}: precision vs recall", "recall", "precision", 1.0),
                     step, dataformats="HWC")
    writer.add_image(f"{name}/precision_at_k", draw_xy({d: (c[d]["k"], c[d]["precision_at_k"]) for d in c},
                                                       f"{title}: P@K", "K (log)", "precision",
                                                       max(c["i2t"]["k"]), log_x=True), step, dataformats="HWC")
    for modality in ("image", "text"):
        writer.add_histogram(f"codes/bit_balance_{modality}", balance[modality], step)
    hamming_pr_curves(writer, codes, f"{name}/", step)
    for direction, q_mod, db_mod in (("i2t", "image", "text"), ("t2i", "text", "image")):
        writer.add_text(f"examples/{direction}", hashing_examples(codes, q_mod, db_mod, label_names, examples), step)


def add_hamming_pr_curve(writer, tag: str, hits, retrieved, relevant: int, pairs: int, step: int) -> None:
    """A precision-recall curve in TensorBoard's PR Curves tab from pair counts over Hamming radius
    r = 0..K (:func:`xmdist.metrics.hashing.pr_counts`). Threshold i of K + 1 is the similarity
    1 - r/K with r = K - i, so this is the curve ``add_pr_curve`` draws from every (query, item)
    pair's relevance and that similarity (micro-averaged over pairs), without listing the pairs."""
    tp = np.asarray(hits, np.float64)[::-1]
    fp = np.asarray(retrieved, np.float64)[::-1] - tp
    fn, tn = relevant - tp, (pairs - relevant) - fp
    precision, recall = tp / np.maximum(1e-7, tp + fp), tp / np.maximum(1e-7, tp + fn)
    writer.add_pr_curve_raw(tag, tp, fp, tn, fn, precision, recall, step, num_thresholds=len(tp))


def hamming_pr_curves(writer, encoded: dict, prefix: str, step: int) -> None:
    """``{prefix}pr_{i2t,t2i}_{K}bit``: both directions' PR curves of a hashing evaluation."""
    q, db = encoded["query"], encoded["db"]
    bits = q["image"].shape[1]
    for name, q_mod, db_mod in (("i2t", "image", "text"), ("t2i", "text", "image")):
        counts = pr_counts(q[q_mod], db[db_mod], q["labels"], db["labels"])
        add_hamming_pr_curve(writer, f"{prefix}pr_{name}_{bits}bit", *counts, step)


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
    font = _font()
    em = max(6, int(font.getlength("n")))  # mean glyph width, for wrapping
    line_h = CAPTION_PX + 5
    lines = textwrap.wrap(caption, max(20, (w - 12) // em))[:4]
    head = 8 + line_h * len(lines)
    im = Image.new("RGB", (w, head + th + 8), "white")
    d = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        d.text((6, 4 + line_h * i), line, fill="black", font=font)
    for i, (tile, ok) in enumerate(zip(tiles, correct)):
        x0 = 6 + i * (tw + 6)
        d.rectangle([x0, head, x0 + tw - 1, head + th - 1], fill=GREEN if ok else RED)
        im.paste(tile, (x0 + border, head + border))
    return np.asarray(im)


def common_report(writer, split, decoder, metrics: dict, emb: dict, curve: dict, cpi: int, step: int,
                  title: str, examples: int) -> None:
    """Scalars, the recall@K curve image and retrieval examples of a common-space evaluation."""
    name = split.name
    for k, v in metrics.items():
        writer.add_scalar(f"{name}/{k}", v, step)
    writer.add_image(f"{name}/recall_at_k_curve", draw_curve(curve, f"{name} split, {title}:"), step,
                     dataformats="HWC")
    common_examples(writer, split, decoder, emb, cpi, step, title, examples)


def common_examples(writer, split, decoder, emb: dict, cpi: int, step: int, title: str, examples: int,
                    prefix: str = "") -> None:
    """``examples`` query images (evenly spaced over the split) with their top-5 captions as a text
    table beside the image, and as many query captions with their top-5 images as a strip (the
    caption printed above it, each image framed green when it is the caption's own) plus the
    same as text; tags ``{prefix}examples/i2t_J/...`` and ``{prefix}examples/t2i_J``."""
    name = split.name
    img, cap = emb["img"], emb["cap"]
    n = len(img)
    ids = emb["ids"].tolist()  # row i of the embeddings is sample ids[i] (a capped or damaged split: fewer rows)
    by_id = read_split_captions(split)
    captions = [by_id[i] for i in ids]
    q_img = sorted(set(np.linspace(0, n - 1, examples).round().astype(int).tolist()))
    q_cap = [int(i) * cpi + j % cpi for j, i in enumerate(q_img)]  # a different caption position each
    top_cap = (img[q_img] @ cap.T).topk(min(5, len(cap)), dim=1)
    top_img = (cap[q_cap] @ img.T).topk(min(5, n), dim=1)
    shown = {ids[i] for i in q_img} | {ids[int(r)] for r in top_img.indices.flatten()}
    pixels = read_split_images(split, shown, decoder)
    for j, i in enumerate(q_img):
        rows = ["| rank | | caption | of image | score |", "|---|---|---|---|---|"]
        for r, (c, s) in enumerate(zip(top_cap.indices[j].tolist(), top_cap.values[j].tolist()), 1):
            mark, cap_md = "✓" if c // cpi == i else "✗", captions[c // cpi][c % cpi].replace("|", "\\|")
            rows.append(f"| {r} | {mark} | {cap_md} | {ids[c // cpi]} | {s:.3f} |")
        text = (f"**query image** id {ids[i]} ({name}, {title}); top-5 captions of the {n} images scored "
                f"(✓: a caption of this image)\n\n" + "\n".join(rows))
        writer.add_text(f"{prefix}examples/i2t_{j}/captions", text, step)
        writer.add_image(f"{prefix}examples/i2t_{j}/image", np.asarray(_pil(pixels[ids[i]], 128)), step,
                         dataformats="HWC")
    for j, c in enumerate(q_cap):
        rows = top_img.indices[j].tolist()
        correct = [r == c // cpi for r in rows]
        query = captions[c // cpi][c % cpi]
        writer.add_image(f"{prefix}examples/t2i_{j}", image_row(f'"{query}" (image {ids[c // cpi]})',
                                                          [pixels[ids[r]] for r in rows], correct),
                         step, dataformats="HWC")
        listing = ", ".join(f"{'✓' if ok else '✗'} {ids[r]} ({s:.3f})"
                            for r, ok, s in zip(rows, correct, top_img.values[j].tolist()))
        writer.add_text(f"{prefix}examples/t2i_{j}/query", f"**query caption** \"{query}\" (of image {ids[c // cpi]}); "
                        f"top-5 images: {listing}", step)
