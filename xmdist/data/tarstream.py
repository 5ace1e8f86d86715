"""A lean sequential reader of uncompressed tar streams: (member name, bytes) of regular files.

Python's ``tarfile`` parses every header in Python, with a full PAX pass for each extended
header; webdataset's ``TarWriter`` (which img2dataset uses) writes one (a float ``mtime``) before
every member, so reading such shards cost three times the header work of the sample itself.
This reader checks each header's checksum, reads the size and name (ustar prefix, GNU long
names, PAX ``path`` and ``size``) and nothing else. Damage raises ``tarfile.ReadError``; a
stream that is not a plain tar (gzip, ...) is left to ``tarfile`` (:func:`is_plain_tar`).
"""
from __future__ import annotations

import tarfile
from typing import IO, Iterator

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")


def is_plain_tar(head: bytes) -> bool:
    """True when ``head`` (the first 512 bytes) is an uncompressed ustar/GNU header."""
    return len(head) == BLOCK and head[257:262] == b"ustar" and _checksum_ok(head)


def _checksum_ok(header: bytes) -> bool:
    field = header[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field or b"0", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 256 + sum(header[156:])


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return -n if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _pax(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _read(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise tarfile.ReadError(f"unexpected end of data: {len(data)} of {n} bytes")
    return data


def iter_members(stream: IO[bytes], first: bytes = b"") -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a plain tar stream, in order; ``first``: the first
    header block when the caller already read it."""
    pax: dict[bytes, bytes] = {}
    longname = b""
    header = first
    while True:
        if not header:
            header = stream.read(BLOCK)
        if not header or header == b"\0" * BLOCK:
            return  # end of archive (or of the stream: what was complete is kept)
        if len(header) < BLOCK or not _checksum_ok(header):
            raise tarfile.ReadError("damaged tar header")
        kind, size = header[156:157], _number(header[124:136])
        if b"size" in pax:
            size = int(pax[b"size"])
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L"):
            data = _read(stream, padded)[:size]
            if kind == b"x":
                pax = _pax(data)
            elif kind == b"L":
                longname = data.rstrip(b"\0")
            header = b""
            continue
        name = pax.get(b"path") or longname
        if not name:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix + b"/" + name
        data = _read(stream, padded)
        pax, longname, header = {}, b"", b""
        if kind in REGULAR:
            yield name.decode("utf-8", "surrogateescape"), data[:size]
