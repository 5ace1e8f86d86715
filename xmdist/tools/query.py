"""Encode queries with a loaded run (:func:`xmdist.tools.runs.load_run`): texts and images.

Images go through the run's evaluation transform (resize to ``data.eval_resize``, centre crop
``data.crop_size``, JPEG draft decoding as in evaluation), texts through the method's own text
input (a caption vocabulary, ...), so a query is encoded exactly as evaluation encodes a split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from xmdist.data.decode import decode_with_pil, hwc_to_tensor
from xmdist.tools.runs import Loaded, RunError


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


@torch.no_grad()
def encode_images(loaded: Loaded, images: Iterable, batch_size: int = 64) -> torch.Tensor:
    """Image paths, PIL images or uint8 tensors (3, H, W) -> (B, d) float32 on the CPU."""
    items = [im if isinstance(im, torch.Tensor) else image_tensor(loaded, im) for im in images]
    out = []
    for s in range(0, len(items), batch_size):
        batch = torch.stack(items[s:s + batch_size]).to(loaded.device)
        with loaded.autocast():
            out.append(loaded.method.encode_images(loaded.model, batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_captions(loaded: Loaded, captions: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Text queries -> (B, d) float32 on the CPU."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    out = []
    for s in range(0, len(captions), batch_size):
        with loaded.autocast():
            emb = loaded.method.encode_texts(loaded.model, loaded.decoder, captions[s:s + batch_size])
        out.append(emb.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def unknown_words(loaded: Loaded, text: str) -> list[str]:
    """Words of ``text`` the run's method cannot represent (e.g. outside its vocabulary)."""
    return loaded.method.unknown_words(text)
