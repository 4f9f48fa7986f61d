"""The de-identified image store of a dataset: ``images/<id[:2]>/<image_id>.<ext>``.

Files are named by content hash, never by their original (often identifying) names. Plain
PNG/JPEG files without metadata are hard-linked (copied across file systems); DICOM pixels
and images carrying text/EXIF/comment metadata are re-encoded as PNG, so no header leaves
ingestion. So are grayscale images in colour/palette/alpha files: the stored file then holds
the decoder's grayscale pixels, which is what serving feeds the model (training would
otherwise convert the colour file itself and see other values).
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

from pipeline.data.imaging import DecodedImage, encode_png
from pipeline.data.sources.base import RawRecord

IMAGES_DIR = "images"


def store_image(image: DecodedImage, data: bytes, record: RawRecord, out_dir: Path, image_id: str) -> str:
    """Write the de-identified image; original bytes are linked only when they carry no metadata.

    The name is the content hash, so an existing file already holds these pixels.
    """
    reencode = image.format == "dicom" or image.gray_from_colour or has_metadata(data, image.format)
    rel = f"{IMAGES_DIR}/{image_id[:2]}/{image_id}.{'jpg' if image.format == 'jpeg' and not reencode else 'png'}"
    dest = out_dir / rel
    if not reencode:
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
    if dest.exists():
        return rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")  # unique to this writer
    try:
        if reencode:
            tmp.write_bytes(encode_png(image))
        else:
            shutil.copyfile(record.path, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return rel


PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf"}


def has_metadata(data: bytes, fmt: str) -> bool:
    """True when a PNG has text/EXIF chunks (before or after the pixel data) or a JPEG has
    APPn (n>0) / comment segments."""
    if fmt == "png":
        pos = 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind in PNG_TEXT_CHUNKS:
                return True
            if kind == b"IEND":
                return False
            pos += 12 + length
        return False
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: header is over
            return False
        if 0xE1 <= marker <= 0xEF or marker == 0xFE:
            return True
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return False
