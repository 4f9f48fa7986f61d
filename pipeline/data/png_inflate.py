"""Faster PNG decoding: inflate the pixel stream with ISA-L, let Pillow do the rest.

About two thirds of Pillow's time on a typical radiograph PNG goes to zlib's inflate
(512x512 8-bit files: ~1.45 ms per file, ~0.5 ms for the same files with stored blocks).
Intel's ISA-L (the ``isal`` package) inflates the same streams 2-3x faster than zlib.
:func:`with_stored_pixels` inflates the ``IDAT`` stream once with ISA-L and returns the same
PNG with that stream re-written as *stored* (uncompressed) deflate blocks; Pillow then only
copies those bytes and does everything else as before (un-filtering, modes, palettes,
16-bit). The pixels are identical by construction: the filtered scanlines are the same
bytes, the inflate checks the stream's Adler-32 and its exact length, every other chunk is
copied unchanged, and the new ``IDAT`` gets a correct CRC.

Anything unusual returns ``None`` and the caller decodes the original bytes with Pillow
alone, so errors (truncated files, bad checksums, bombs) are reported exactly as before:
interlaced images, ``IDAT`` chunks that are not consecutive, a stream that is short,
long, corrupt or followed by extra bytes, more pixels than ``max_pixels`` (checked on
the header before inflating), more than :data:`MAX_INFLATED_BYTES` of scanlines, or no
``isal`` module at all.
"""

from __future__ import annotations

import struct

try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; without it Pillow decodes alone
    isal_zlib = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_STORED_MAX = 65535  # largest stored deflate block
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no preset dictionary (header checksum valid)
# Larger images go through Pillow alone: its inflate streams, while this path holds the
# inflated scanlines twice (``raw`` and the rewritten file) next to Pillow's image.
MAX_INFLATED_BYTES = 64 << 20


def with_stored_pixels(data: bytes, *, max_pixels: int) -> bytes | None:
    """The PNG ``data`` with its ``IDAT`` stream replaced by stored deflate blocks, or ``None``
    when the fast path does not apply (see the module docstring)."""
    if isal_zlib is None or len(data) < 45 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour, compression, method, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if interlace or compression or method or colour not in _CHANNELS or depth not in (1, 2, 4, 8, 16):
        return None  # only deflate + the standard filters (method 0), non-interlaced
    if not 0 < width * height <= max_pixels:
        return None  # empty, or a bomb: Pillow reports either from the header
    expected = height * (1 + (width * _CHANNELS[colour] * depth + 7) // 8)  # filter byte + packed row
    if expected > MAX_INFLATED_BYTES:
        return None
    found = _idat_span(data)
    if found is None:
        return None
    first, end, parts = found
    stream = b"".join(parts)
    inflater = isal_zlib.decompressobj()
    try:
        raw = inflater.decompress(stream, expected + 1)
    except isal_zlib.error:
        return None
    if len(raw) != expected or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        return None
    return _rewrite(memoryview(data), first, end, raw, adler=stream[-4:])


def _idat_span(data: bytes) -> tuple[int, int, list[memoryview]] | None:
    """Offset of the first ``IDAT`` chunk, the end of the last, and their payloads."""
    view, size = memoryview(data), len(data)
    pos, first, end, parts = 8, -1, -1, []
    while pos + 12 <= size:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        nxt = pos + 12 + length
        if nxt > size:
            return None  # truncated chunk
        if kind == b"IDAT":
            if first < 0:
                first = pos
            elif end != pos:
                return None  # IDAT chunks must be consecutive
            parts.append(view[pos + 8:pos + 8 + length])
            end = nxt
        elif kind == b"IEND":
            break
        pos = nxt
    return (first, end, parts) if first >= 0 else None


def _rewrite(view: memoryview, first: int, end: int, raw: bytes, adler: bytes) -> bytes:
    """Chunks before the pixels, one ``IDAT`` of stored blocks holding ``raw``, chunks after
    (assembled in one join: the scanlines are copied once)."""
    pixels = memoryview(raw)
    blocks = max(1, -(-len(raw) // _STORED_MAX))
    idat: list[bytes | memoryview] = [_ZLIB_HEADER]
    for i in range(blocks):
        block = pixels[i * _STORED_MAX:(i + 1) * _STORED_MAX]
        idat += (struct.pack("<BHH", i == blocks - 1, len(block), len(block) ^ 0xFFFF), block)
    idat.append(adler)  # Adler-32 of the uncompressed bytes: unchanged, verified by the inflate
    crc = isal_zlib.crc32(b"IDAT")
    for part in idat:
        crc = isal_zlib.crc32(part, crc)
    size = sum(len(part) for part in idat)
    return b"".join([view[:first], size.to_bytes(4, "big"), b"IDAT", *idat,
                     (crc & 0xFFFFFFFF).to_bytes(4, "big"), view[end:]])
