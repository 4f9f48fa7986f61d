"""The de-identified image store of a dataset: ``images/<id[:2]>/<image_id>.<ext>``.

Files are named by content hash, never by their original (often identifying) names, and hold
nothing but what the pixels need: PHI hides in text/EXIF chunks, private chunks, timestamps,
comment and APPn segments, and bytes after the end of the image.

* PNG: only the chunks :data:`PNG_KEEP` (IHDR, PLTE, tRNS, gAMA, sBIT, IDAT, IEND) ever reach
  the store, and nothing after IEND. A file of exactly those chunks is hard-linked (copied
  across file systems); otherwise those chunks are copied byte for byte into a new file (same
  pixels, CRCs still valid). A file whose chunks cannot be walked (a length past the end, a
  type that is not four letters, no IEND) or that holds a chunk whose loss could change the
  decoded image (APNG frames, an unknown critical chunk) is re-encoded from its decoded pixels.
* JPEG: linked only when it is SOI, a bare JFIF APP0 (no thumbnail), tables, one frame and
  its scans, and EOI as its last two bytes (:func:`jpeg_is_plain`); anything else (EXIF and
  other APPn, comments, junk between segments, a trailer) is re-encoded as PNG.
* DICOM pixels are always re-encoded as PNG: no header leaves ingestion.

So are grayscale images in colour/palette/alpha files: the stored file then holds the
decoder's grayscale pixels, which is what serving feeds the model (training would otherwise
convert the colour file itself and see other values). Re-encoded files go through the same
PNG chunk whitelist.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from pipeline.data.imaging import DecodedImage, encode_png
from pipeline.data.png_inflate import PNG_SIGNATURE
from pipeline.data.sources.base import RawRecord

IMAGES_DIR = "images"
PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"tRNS", b"gAMA", b"sBIT", b"IDAT", b"IEND"})
# Dropping these could show another image than the decoder read: re-encode from the pixels instead.
_PNG_FRAMES = frozenset({b"acTL", b"fcTL", b"fdAT"})
_PNG_MAX_CHUNK = (1 << 31) - 1  # the PNG limit on a chunk's length


def store_image(image: DecodedImage, data: bytes, record: RawRecord, out_dir: Path, image_id: str) -> str:
    """Write the de-identified image; the original file is linked only when it holds nothing but the image.

    The name is the content hash of the original. A linked original is clean, so an existing file
    of its name is too; a file written instead of a link is reused only when it holds exactly the
    bytes to store (a dataset ingested by an older version may hold a link to an unclean original).
    """
    clean = clean_bytes(image, data)
    linked = clean is None
    rel = f"{IMAGES_DIR}/{image_id[:2]}/{image_id}.{'jpg' if image.format == 'jpeg' and linked else 'png'}"
    dest = out_dir / rel
    if linked:
        for _ in range(2):
            try:
                os.link(record.path, dest)  # one system call in the common case
                return rel
            except FileExistsError:
                return rel
            except FileNotFoundError:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # another file system, or links not allowed: copy instead
                break
        clean = data  # the bytes judged clean (the file may have changed since it was read)
    if _holds(dest, clean):  # an earlier ingest wrote it; anything else there (a link an older
        return rel           # version made of a PNG with private chunks) is replaced below
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")  # unique to this writer
    try:
        tmp.write_bytes(clean)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return rel


def _holds(dest: Path, content: bytes) -> bool:
    try:
        return dest.stat().st_size == len(content) and dest.read_bytes() == content
    except FileNotFoundError:
        return False


def clean_bytes(image: DecodedImage, data: bytes) -> bytes | None:
    """``None`` when ``data`` may be stored as it is; else the bytes to store instead: the
    whitelisted chunks of a PNG, or the decoded pixels as PNG (see the module docstring)."""
    if not image.gray_from_colour:
        if image.format == "png":
            chunks = png_chunks(data)
            if chunks is not None and not any(kind in _PNG_FRAMES or (kind[:1].isupper() and kind not in PNG_KEEP)
                                              for kind, _, _ in chunks):  # an uppercase first letter: critical
                kept = _keep_whitelisted(data, chunks)
                return None if kept is data else kept
        elif image.format == "jpeg" and jpeg_is_plain(data):
            return None
    encoded = encode_png(image)
    chunks = png_chunks(encoded)
    if chunks is None:  # pragma: no cover - Pillow writes well-formed PNG
        raise ValueError("the re-encoded PNG has a broken chunk structure")
    return _keep_whitelisted(encoded, chunks)


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """``(type, start, end)`` of each chunk from IHDR to IEND, or ``None`` when the walk fails:
    no signature, IHDR not first, a length past the end of the file (or over 2**31-1), a type
    that is not four ASCII letters, no IEND. Bytes after IEND are not read."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    chunks: list[tuple[bytes, int, int]] = []
    pos, size = len(PNG_SIGNATURE), len(data)
    while pos + 12 <= size:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if length > _PNG_MAX_CHUNK or end > size or not kind.isalpha() or (not chunks and kind != b"IHDR"):
            return None
        chunks.append((kind, pos, end))
        if kind == b"IEND":
            return chunks
        pos = end
    return None


def _keep_whitelisted(data: bytes, chunks: list[tuple[bytes, int, int]]) -> bytes:
    """``data`` itself when it is exactly the whitelisted chunks up to IEND; else a copy of only those."""
    if chunks[-1][2] == len(data) and all(kind in PNG_KEEP for kind, _, _ in chunks):
        return data
    view = memoryview(data)
    return b"".join([PNG_SIGNATURE, *(view[start:end] for kind, start, end in chunks if kind in PNG_KEEP)])


_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 (not DHT, JPG, DAC)
_JPEG_TABLES = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xDC})  # DHT, DAC, DQT, DRI, DNL
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the next marker after entropy-coded data


def jpeg_is_plain(data: bytes) -> bool:
    """True when a JPEG holds only what its pixels need: SOI; then a bare JFIF APP0 (no
    thumbnail), tables (DQT, DHT, DAC, DRI, DNL), one frame header and its scans, fill bytes;
    and EOI as its last two bytes. Any other segment (APP1..APP15: EXIF, XMP, ICC, Adobe;
    COM), junk between segments, or bytes after EOI make it False."""
    if not data.startswith(b"\xff\xd8"):
        return False
    pos, size, frame, scanned = 2, len(data), False, False
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return scanned and pos + 2 == size
        if pos + 4 > size:
            return False
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end < pos + 4 or end > size:
            return False
        if marker == 0xE0:
            body = data[pos + 4:end]  # JFIF\0, version, units, densities, thumbnail width and height
            if len(body) != 14 or not body.startswith(b"JFIF\x00") or body[12] or body[13]:
                return False
        elif marker in _JPEG_FRAMES:
            if frame:
                return False
            frame = True
        elif marker == 0xDA:  # SOS: entropy-coded data up to the next marker
            found = _JPEG_MARKER.search(data, end) if frame else None
            if found is None:
                return False
            pos, scanned = found.start(), True
            continue
        elif marker not in _JPEG_TABLES:
            return False
        pos = end
    return False
