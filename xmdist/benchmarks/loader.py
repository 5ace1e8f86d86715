"""Loader benchmark: xmdist's shard stream against a per-file PIL ``Dataset`` on the same JPEGs.

Both produce the same training batches (RandomResizedCrop to the output size, normalisation,
tokenised captions) with the same number of worker processes. The per-file baseline opens each
JPEG with PIL and decodes it at full size, as VSE++'s data loader does; xmdist reads tar shards
sequentially and decodes JPEGs with libjpeg-turbo at reduced scale when the output size allows.
With a GPU, the nvJPEG path (``data.gpu_decode``) is measured too. ``--img2dataset`` measures
the same JPEG bytes in img2dataset's layout (``00000.tar`` with jpg/txt/json and ``_stats.json``)
read through a brace pattern, as ``data.shards`` reads such sets; ``--no-per-file`` leaves the
PIL baseline out. ``--open-clip-python PATH`` (with ``--img2dataset``) measures open_clip's own
``get_wds_dataset`` pipeline on the img2dataset layout in the same run, each repeat in a fresh
process of that Python (an environment with open_clip: it is no dependency of xmdist), and the
decode-only rate of libjpeg-turbo at the DCT scale xmdist uses for that output size, with the
same number of processes: the ceiling of any loader that decodes on those workers.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import subprocess
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

import simplejpeg

from xmdist.data.decode import IMAGENET_MEAN, IMAGENET_STD, SampleDecoder, _jpeg_scale
from xmdist.data.info import ShardSet
from xmdist.data.loader import StreamPlan, TrainStream, make_loader, worker_count
from xmdist.data.vocab import Vocab
from xmdist.data.writer import ShardSetWriter, encode_json


def _photo(args: tuple[int, int, int]) -> bytes:
    """A photo-like JPEG: smooth gradient, shapes and sensor noise (so it compresses like one)."""
    i, width, height = args
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)[None, None] + (x[..., None] * rng.uniform(-0.2, 0.2, 3)
                                                 + y[..., None] * rng.uniform(-0.2, 0.2, 3))
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(20, 300), y0 + rng.integers(20, 300)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.integers(0, 255, 3).tolist()))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, num: int, width: int, height: int, workers: int) -> None:
    """``root/images/*.jpg`` + ``captions.jsonl`` and the same JPEG bytes as ``root/shards``."""
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()) == [num, width, height]:
        return
    (root / "images").mkdir(parents=True, exist_ok=True)
    writer = ShardSetWriter(root / "shards", members=["jpg", "json"], splits=["train"],
                            samples_per_shard=max(10, min(1000, num // 20)))
    with Pool(workers) as pool, open(root / "captions.jsonl", "w") as captions:
        jobs = ((i, width, height) for i in range(num))
        for i, data in enumerate(pool.imap(_photo, jobs, chunksize=16)):
            caption = f"photo number {i % 97} with shapes"
            (root / "images" / f"{i:09d}.jpg").write_bytes(data)
            captions.write(json.dumps({"image": f"{i:09d}.jpg", "caption": caption}) + "\n")
            writer.write("train", f"{i:09d}", {"jpg": data, "json": encode_json({"id": i, "captions": [caption]})})
    writer.finish({"source": "loader-benchmark", "captions_per_image": 1})
    done.write_text(json.dumps([num, width, height]))


class PerFileDataset(Dataset):
    """The baseline: one JPEG file per sample, opened and fully decoded by PIL, VSE++'s transforms."""

    def __init__(self, root: Path, vocab: Vocab, size: int):
        from torchvision import transforms  # the classic PIL pipeline VSE++ uses

        self.root, self.vocab = root, vocab
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.items = [json.loads(line) for line in open(root / "captions.jsonl")]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        with Image.open(self.root / "images" / item["image"]) as img:
            image = self.transform(img.convert("RGB"))
        return image, self.vocab.encode(item["caption"]), i


def samples_per_s(loader, batches: int, finish=None, warmup: int = 16) -> float:
    """Steady-state samples/s over ``batches`` batches, after ``warmup`` untimed ones (worker
    start-up, the first fill of a shuffle buffer: once per epoch, not throughput)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        if finish:
            batch = finish(batch)
        n += len(batch["image_ids"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="/tmp/xm_loader_bench", help="where the benchmark JPEGs are (made once)")
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements of each loader, alternating; the median is reported")
    p.add_argument("--sizes", default="64,224,384", help="output crop sizes")
    p.add_argument("--img2dataset", action="store_true",
                   help="also the same JPEGs in img2dataset's layout through a brace pattern")
    p.add_argument("--no-per-file", dest="per_file", action="store_false", help="leave the PIL baseline out")
    p.add_argument("--open-clip-python", default=None, metavar="PATH",
                   help="a Python with open_clip: also open_clip's get_wds_dataset on the img2dataset "
                        "layout, and libjpeg-turbo's decode-only rate (needs --img2dataset)")
    p.add_argument("--crop-scale", default="0.08,1.0", help="RandomResizedCrop area scale, for every loader")


def _decode_share(job: tuple[list[bytes], int]) -> int:
    datas, size = job
    for data in datas:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        s = _jpeg_scale(height, width, size)
        simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // s), min_width=-(-width // s))
    return len(datas)


def decode_only_per_s(datas: list[bytes], size: int, workers: int) -> float:
    """JPEGs/s of libjpeg-turbo alone, at the DCT scale xmdist picks for ``size``, split over
    ``workers`` processes (bytes already in memory: no reading, cropping or collating)."""
    with Pool(workers) as pool:
        pool.map(_decode_share, [(datas[:8], size)] * workers)  # processes started, caches warm
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_share, [(datas[i::workers], size) for i in range(workers)]))
        return n / (time.perf_counter() - t0)


def open_clip_per_s(python: str, spec: dict) -> float:
    """One measurement of open_clip's pipeline (``open_clip_column.py`` in ``python``)."""
    script = Path(__file__).with_name("open_clip_column.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own packages, not the worktree
    done = subprocess.run([python, str(script), json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"open_clip's pipeline failed in {python} (is open-clip-torch installed there, "
                         f"with webdataset<=0.2.86?):\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"])


def img2dataset_split(root: Path, split):
    """``split`` rewritten once in img2dataset's layout under ``root/img2dataset``, opened through
    a brace pattern as ``data.shards`` would be."""
    from xmdist.config import DataConfig
    from xmdist.data.webset import open_shards
    from xmdist.tools.img2dataset_layout import write_img2dataset

    out = root / "img2dataset"
    if not (out / "done").exists():
        write_img2dataset(split, out, per_shard=max(10, min(1000, split.num_samples // 20)))
        (out / "done").write_text("")
    last = len(list(out.glob("*.tar"))) - 1
    return open_shards(DataConfig(shards=f"{out}/{{00000..{last:05d}}}.tar")).split("train")


def run(args: argparse.Namespace) -> dict:
    root = Path(args.data)
    make_data(root, args.num, args.width, args.height, max(1, os.cpu_count() or 1))
    split = ShardSet.open(root / "shards").split("train")
    vocab = Vocab.build((f"photo number {i} with shapes" for i in range(97)), 1)
    steps = split.num_samples // args.batch_size
    result = {"images": f"{args.num} JPEGs {args.width}x{args.height}", "workers": args.workers,
              "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "sizes": {}}
    if args.open_clip_python and not args.img2dataset:
        raise SystemExit("--open-clip-python measures open_clip on the img2dataset layout: add --img2dataset")
    i2d = img2dataset_split(root, split) if args.img2dataset else None
    scale = tuple(float(x) for x in args.crop_scale.split(","))
    result["crop_scale"] = list(scale)
    if args.open_clip_python:
        pattern = f"{root / 'img2dataset'}/{{00000..{len(i2d.paths) - 1:05d}}}.tar"
        jpegs = [p.read_bytes() for p in sorted((root / "images").glob("*.jpg"))[:2000]]
        result["open_clip_pattern"] = pattern
    for size in (int(s) for s in args.sizes.split(",")):
        decoder = SampleDecoder(vocab, size, size, scale, True, 40)
        workers = worker_count(split, 1, args.workers)
        plan = StreamPlan(split, 0, 1, steps, seed=0)
        stream = TrainStream(plan, decoder, args.batch_size, 1000, "random", 1)
        baseline = DataLoader(PerFileDataset(root, vocab, size), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, collate_fn=decoder.collate, prefetch_factor=4)
        if i2d is not None:
            i2d_stream = TrainStream(StreamPlan(i2d, 0, 1, steps, seed=0), decoder, args.batch_size, 1000, "random", 1)
        shard_runs, file_runs, i2d_runs, oc_runs, dec_runs = [], [], [], [], []
        for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits both
            shard_runs.append(samples_per_s(make_loader(stream, workers, False), args.batches))
            if args.per_file:
                file_runs.append(samples_per_s(baseline, args.batches))
            if i2d is not None:
                i2d_runs.append(samples_per_s(make_loader(i2d_stream, workers, False), args.batches))
            if args.open_clip_python:
                oc_runs.append(open_clip_per_s(args.open_clip_python, {
                    "pattern": pattern, "num_samples": i2d.num_samples, "batch_size": args.batch_size,
                    "workers": args.workers, "size": size, "scale": list(scale), "batches": args.batches}))
                dec_runs.append(decode_only_per_s(jpegs, size, args.workers))
        shard_sps = float(np.median(shard_runs))
        row = {"xmdist_samples_per_s": shard_sps, "xmdist_per_worker": shard_sps / args.workers,
               "xmdist_runs": shard_runs}
        if file_runs:
            file_sps = float(np.median(file_runs))
            row.update(per_file_pil_samples_per_s=file_sps, speedup=shard_sps / file_sps,
                       per_file_per_worker=file_sps / args.workers, per_file_runs=file_runs)
        if i2d_runs:
            i2d_sps = float(np.median(i2d_runs))
            row.update(img2dataset_brace_samples_per_s=i2d_sps, img2dataset_vs_xmdist=i2d_sps / shard_sps,
                       img2dataset_runs=i2d_runs,
                       img2dataset_vs_xmdist_each=[a / b for a, b in zip(i2d_runs, shard_runs)])
        if oc_runs:
            oc_sps, dec_sps = float(np.median(oc_runs)), float(np.median(dec_runs))
            h, w = args.height, args.width
            row.update(open_clip_samples_per_s=oc_sps, open_clip_runs=oc_runs,
                       img2dataset_vs_open_clip=i2d_sps / oc_sps,
                       img2dataset_vs_open_clip_each=[a / b for a, b in zip(i2d_runs, oc_runs)],
                       decode_only_per_s=dec_sps, decode_only_runs=dec_runs, dct_scale=f"1/{_jpeg_scale(h, w, size)}",
                       img2dataset_vs_decode_only=i2d_sps / dec_sps,
                       img2dataset_vs_decode_only_each=[a / b for a, b in zip(i2d_runs, dec_runs)])
        if torch.cuda.is_available():
            gpu = SampleDecoder(vocab, size, size, (0.08, 1.0), True, 40, gpu_decode=True)
            stream = TrainStream(plan, gpu, args.batch_size, 1000, "random", 1)
            device = torch.device("cuda")
            row["xmdist_gpu_decode_samples_per_s"] = samples_per_s(
                make_loader(stream, workers, True), args.batches, lambda b: gpu.decode_on_device(b, device))
        result["sizes"][size] = row
    return result
