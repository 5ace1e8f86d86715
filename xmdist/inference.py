"""Load a trained run for inference and encode single images and captions.

    loaded = load_run("runs/demo", checkpoint="best")       # or "latest", "step_00001200"
    q = encode_captions(loaded, ["a red circle"])          # (1, d), unit-norm
    v = encode_images(loaded, ["photo.jpg"])               # (1, d)

A run directory is what ``launch/train.py --out`` writes: ``config.yaml``, ``vocab.json`` and
``checkpoints/{step_*/shared.pt, latest, best}``. Images go through the run's evaluation
transform (resize to ``data.eval_resize``, centre crop ``data.crop_size``, JPEG draft decoding
as in evaluation), captions through its vocabulary, so a query is encoded exactly as the
evaluation encodes the split. Problems with the run raise :class:`RunError` (the launchers
print it and exit 2).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from xmdist.checkpoint import load_file
from xmdist.config import Config, load_config
from xmdist.data.decode import SampleDecoder, decode_meta, decode_with_pil, hwc_to_tensor
from xmdist.data.info import Split
from xmdist.data.vocab import Vocab, pad_captions, tokenize
from xmdist.dist import DistEnv
from xmdist.methods import get_method

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunError(ValueError):
    """A run directory or checkpoint is missing, incomplete or does not fit its config."""


@dataclass
class Loaded:
    run_dir: Path
    config: Config
    vocab: Vocab | None  # None for methods without captions (hashing on tags)
    model: nn.Module  # the retrieval model, eval mode, on ``device``
    checkpoint: str  # resolved name, e.g. "step_00000040"
    step: int
    device: torch.device
    data_decoder: object = None  # the method's own decoder (feature methods); None: captions

    @cached_property
    def decoder(self) -> SampleDecoder:
        if self.data_decoder is not None:
            return self.data_decoder
        d = self.config.data
        return SampleDecoder(self.vocab, d.crop_size, d.eval_resize, tuple(d.crop_scale), False,
                             d.max_caption_words, d.jpeg_draft)

    def autocast(self):
        """The precision the run evaluated in (DDP: autocast; DeepSpeed: low-precision weights, see load_run)."""
        dtype = DTYPES[self.config.train.precision]
        if dtype is None or self.config.train.backend == "deepspeed":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def resolve_checkpoint(run_dir: Path, checkpoint: str = "best") -> str:
    """``best`` / ``latest`` / ``step_X`` (``step_40`` and ``40`` work too) -> an existing directory name."""
    ckdir = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckdir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not steps:
        raise RunError(f"no checkpoint in {ckdir}: training has not written one yet")
    if checkpoint in ("best", "latest"):
        pointer = ckdir / checkpoint
        if checkpoint == "best" and not pointer.is_file():
            log.warning("%s has no 'best' pointer (never validated): using 'latest'", ckdir)
            pointer = ckdir / "latest"
        name = pointer.read_text().strip() if pointer.is_file() else steps[-1]
        if name not in steps:
            raise RunError(f"{pointer} names {name}, which is not in {ckdir} (has: {', '.join(steps)})")
        return name
    m = re.fullmatch(r"(?:step_)?(\d+)", checkpoint)
    name = f"step_{int(m.group(1)):08d}" if m else checkpoint
    if name not in steps:
        raise RunError(f"checkpoint {checkpoint!r} not in {ckdir} (has: best, latest, {', '.join(steps)})")
    return name


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu",
             method: str | None = None, shards: str | Path | None = None) -> Loaded:
    """Config, vocabulary and the retrieval model of ``checkpoint``, in eval mode on ``device``.

    ``method``: refuse a run of another method (e.g. a tool that needs hash codes). ``shards``:
    the data the run will read (default its ``data.shards``); feature methods size their model
    from it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir / 'config.yaml'} is missing: not a run directory written by launch/train.py")
    cfg = load_config(run_dir / "config.yaml")
    if method and cfg.method != method:
        raise RunError(f"{run_dir} is a {cfg.method} run; this needs method {method}")
    build_cfg = copy.deepcopy(cfg)
    if hasattr(build_cfg.model, "weights"):
        build_cfg.model.weights = None  # the checkpoint has the weights: never download pretrained ones
    impl = get_method(cfg.method)(build_cfg, DistEnv())
    vocab, data_decoder = None, None
    if impl.uses_vocab:
        if not (run_dir / "vocab.json").is_file():
            raise RunError(f"{run_dir / 'vocab.json'} is missing: not a run directory written by launch/train.py")
        vocab = Vocab.load(run_dir / "vocab.json")
    else:
        from xmdist.data.info import ShardSet

        data_decoder = impl.make_decoder(ShardSet.open(shards or cfg.data.shards))
    name = resolve_checkpoint(run_dir, checkpoint)
    path = run_dir / "checkpoints" / name / "shared.pt"
    try:
        shared = load_file(path)
        trainer = shared["trainer"]
        state = shared["nets"]["model"]["model"]
    except Exception as e:  # missing, truncated or not an xmdist checkpoint
        raise RunError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from None
    if trainer["method"] != cfg.method:
        raise RunError(f"checkpoint {path} was trained with method {trainer['method']}, but "
                       f"{run_dir / 'config.yaml'} says {cfg.method}")
    model = impl.build(len(vocab) if vocab else None)["model"].module
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(f"checkpoint {path} does not fit the model of {run_dir / 'config.yaml'}: {e}") from None
    dtype = DTYPES[cfg.train.precision]
    if dtype is not None and cfg.train.backend == "deepspeed":
        model.to(dtype)  # as the engine held it: low-precision parameters and buffers
    device = torch.device(device)
    model.to(device).eval()
    return Loaded(run_dir, cfg, vocab, model, name, int(trainer["step"]), device, data_decoder)


# ---------------------------------------------------------------- single inputs


def image_tensor(loaded: Loaded, image: str | Path | Image.Image) -> torch.Tensor:
    """An image file (or PIL image) -> uint8 (3, crop, crop) with the run's evaluation transform."""
    dec = loaded.decoder
    if isinstance(image, Image.Image):
        return dec.eval_image(hwc_to_tensor(np.asarray(image.convert("RGB"))))
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    data = path.read_bytes()
    try:
        if data.startswith(b"\xff\xd8"):  # a JPEG: decoded as evaluation decodes (reduced scale)
            return dec.eval_view({"__key__": str(path), "jpg": data})
        return dec.eval_image(hwc_to_tensor(decode_with_pil(data)))  # a query may be any format PIL reads
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read image {path}: {e}") from None


def caption_tokens(loaded: Loaded, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> padded token ids (B, L) and lengths (B,), as evaluation encodes them."""
    max_words = loaded.config.data.max_caption_words
    return pad_captions([loaded.vocab.encode(c, max_words) for c in captions])


def unknown_words(vocab: Vocab, caption: str) -> list[str]:
    """Words of ``caption`` that the vocabulary maps to ``<unk>``."""
    return [w for w in tokenize(caption) if w not in vocab.index]


@torch.no_grad()
def encode_images(loaded: Loaded, images: Iterable, batch_size: int = 64) -> torch.Tensor:
    """Image paths, PIL images or uint8 tensors (3, H, W) -> (B, d) float32 on the CPU."""
    items = [im if isinstance(im, torch.Tensor) else image_tensor(loaded, im) for im in images]
    out = []
    for s in range(0, len(items), batch_size):
        batch = torch.stack(items[s:s + batch_size]).to(loaded.device)
        with loaded.autocast():
            out.append(loaded.model.encode_image(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, loaded.config.model.embed_dim)


@torch.no_grad()
def encode_captions(loaded: Loaded, captions: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Caption strings -> (B, d) float32 on the CPU."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    out = []
    for s in range(0, len(captions), batch_size):
        tokens, lengths = caption_tokens(loaded, captions[s:s + batch_size])
        with loaded.autocast():
            out.append(loaded.model.encode_text(tokens.to(loaded.device), lengths.to(loaded.device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, loaded.config.model.embed_dim)


# ---------------------------------------------------------------- split contents


def read_split_meta(split: Split) -> tuple[list[int], list[list[str]]]:
    """Sample ids and captions of a split, ordered by id (the order of ``encode_split``)."""
    from xmdist.data.loader import iter_raw_samples

    rows = []
    for sample in iter_raw_samples(list(split.paths)):
        meta = decode_meta(sample)
        rows.append((int(meta["id"]), [str(c) for c in meta["captions"]]))
    rows.sort(key=lambda r: r[0])
    return [r[0] for r in rows], [r[1] for r in rows]


def read_split_images(split: Split, ids: Iterable[int], loaded: Loaded) -> dict[int, torch.Tensor]:
    """The evaluation-transformed uint8 images of the samples ``ids`` (for display)."""
    from xmdist.data.loader import iter_raw_samples

    want, dec, out = set(ids), loaded.decoder, {}
    for sample in iter_raw_samples(list(split.paths)):
        sid = int(decode_meta(sample)["id"])
        if sid in want:
            out[sid] = dec.eval_view(sample)
            if len(out) == len(want):
                break
    return out
