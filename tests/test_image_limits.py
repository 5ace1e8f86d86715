"""Decompression bombs and oversized images: refused from the header, before decoding, and
counted as skipped samples like any other damaged one."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from xmdist.data.decode import DECODE_ERRORS, ImageTooLarge, decode_pixels


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of side x side pixels, all black: a few hundred KB that
    decode to hundreds of MB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp, parts = zlib.compressobj(9), []
    for _ in range(side // 1000):
        parts.append(comp.compress(row * 1000))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 header declaring another size (the data stays small)."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def test_bomb_png_is_refused_from_its_header():
    data = bomb_png()
    assert len(data) < 2_000_000
    t0 = time.time()
    with pytest.raises(ImageTooLarge, match="20000 x 20000 = 400,000,000 pixels is above data.max_pixels"):
        decode_pixels({"png": data})
    assert time.time() - t0 < 5  # nothing was decoded
    assert issubclass(ImageTooLarge, DECODE_ERRORS)


def test_limit_is_configurable_for_jpeg_and_png():
    small = _jpeg(64, 48)
    assert decode_pixels({"jpg": small}, max_pixels=64 * 48).shape == (48, 64, 3)
    with pytest.raises(ImageTooLarge, match="64 x 48"):
        decode_pixels({"jpg": small}, max_pixels=64 * 48 - 1)
    huge = _claim_size(small, 30000, 30000)  # a header claiming 900 M pixels
    with pytest.raises(ImageTooLarge, match="30000 x 30000"):
        decode_pixels({"jpg": huge})
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(buf, "PNG")
    with pytest.raises(ImageTooLarge):
        decode_pixels({"png": buf.getvalue()}, max_pixels=100)
    assert decode_pixels({"png": buf.getvalue()}, max_pixels=0).shape == (10, 20, 3)  # 0: no limit


def test_past_pils_own_limit_is_the_same_refusal():
    # PIL raises DecompressionBombError itself above 2 x Image.MAX_IMAGE_PIXELS; with no limit of
    # ours that still becomes ImageTooLarge, a skipped sample
    with pytest.raises(ImageTooLarge):
        decode_pixels({"png": bomb_png(20000)}, max_pixels=0)
