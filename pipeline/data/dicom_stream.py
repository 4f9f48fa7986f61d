"""Byte-level DICOM structure, read without pydicom: element headers, encapsulated items, codestream
sizes, RLE segments, and a deflate stream inflated only as far as asked.

:mod:`pipeline.data.dicom` uses these to judge a file's pixel data before any decoder sees it.
"""

from __future__ import annotations

import itertools
import zlib

from pipeline.errors import BadImage

ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}  # + JPEG-LS


class Inflater:
    """A raw deflate stream inflated only as far as asked."""

    def __init__(self, compressed: bytes) -> None:
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._input: bytes | None = compressed
        self._exhausted = False
        self.out = bytearray()

    @property
    def finished(self) -> bool:
        """The stream ended, or its input did (a cut-short file)."""
        return self._inflate.eof or self._exhausted

    def grow(self, size: int) -> None:
        """Inflate until :attr:`out` holds ``size`` bytes or the stream (or its input) ends."""
        try:
            while len(self.out) < size and not self._inflate.eof:
                src = self._input if self._input is not None else self._inflate.unconsumed_tail
                self._input = None
                chunk = self._inflate.decompress(src, size - len(self.out))
                if not chunk and not src:
                    self._exhausted = True  # input ended before the end of the stream
                    return
                self.out += chunk
        except zlib.error as exc:
            raise BadImage("corrupt_pixel_data", f"the deflated data set does not inflate ({exc})") from None


def tag_at(buf: bytes | bytearray, at: int, little: bool) -> int | None:
    if len(buf) < at + 4:
        return None
    order = "little" if little else "big"
    return int.from_bytes(buf[at:at + 2], order) << 16 | int.from_bytes(buf[at + 2:at + 4], order)


def element_header(buf: bytes | bytearray, at: int, *, implicit: bool, little: bool) -> tuple[str | None, int, int]:
    """(VR or None for implicit VR, value offset, value length) of the element whose tag is at ``at``."""
    order = "little" if little else "big"
    if len(buf) < at + 12:
        raise BadImage("truncated", "the file ends inside the pixel data element's header")
    if implicit:
        return None, at + 8, int.from_bytes(buf[at + 4:at + 8], order)
    vr = bytes(buf[at + 4:at + 6])
    if vr in LONG_VRS:
        return vr.decode(), at + 12, int.from_bytes(buf[at + 8:at + 12], order)
    return vr.decode("latin-1"), at + 8, int.from_bytes(buf[at + 6:at + 8], order)


def encapsulated_end(buf: bytes | bytearray, start: int, little: bool) -> int:
    """Offset of the sequence delimiter that closes encapsulated pixel data starting at ``start``."""
    order, at, items = "little" if little else "big", start, 0
    while len(buf) >= at + 8:
        tag = tag_at(buf, at, little)
        length = int.from_bytes(buf[at + 4:at + 8], order)
        if tag == SEQUENCE_END:
            if items == 0:
                raise BadImage("corrupt_pixel_data", "encapsulated pixel data without a basic offset table item")
            return at
        if tag != ITEM:
            raise BadImage("corrupt_pixel_data", f"unexpected tag {tag or 0:08X} in encapsulated pixel data")
        if len(buf) < at + 8 + length:
            raise BadImage("truncated", f"encapsulated fragment {items} ends after {len(buf) - at - 8} of "
                                        f"{length} bytes")
        at += 8 + length
        items += 1
    raise BadImage("truncated", f"encapsulated pixel data ends after {items} item(s) without its sequence delimiter")


def codestream_size(stream: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 SIZ or JPEG / JPEG-LS SOF segment; None when unknown."""
    if stream.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 file format: the codestream is in the jp2c box
        box = stream.find(b"jp2c")
        stream = stream[box + 4:] if box >= 0 else b""
    if stream[:4] == b"\xff\x4f\xff\x51" and len(stream) >= 24:  # SOC + SIZ
        xsiz, ysiz, x0, y0 = (int.from_bytes(stream[i:i + 4], "big") for i in (8, 12, 16, 20))
        return xsiz - x0, ysiz - y0
    at = 2
    while stream[:2] == b"\xff\xd8" and at + 9 <= len(stream) and stream[at] == 0xFF:
        marker, length = stream[at + 1], int.from_bytes(stream[at + 2:at + 4], "big")
        if marker in _SOF_MARKERS:
            height, width = int.from_bytes(stream[at + 5:at + 7], "big"), int.from_bytes(stream[at + 7:at + 9], "big")
            return (width, height) if height else None  # height 0: given later by a DNL marker
        at += 2 + length
    return None


def check_rle_frame(frame: bytes, size: int, index: int) -> None:
    """Each RLE segment must inflate to ``size`` (Rows x Columns) bytes, +1 pad byte (PS3.5 G.3).

    pylibjpeg-rle panics (and Rust prints the panic on stderr) when a segment inflates to more;
    inflating a segment alone is safe.
    """
    try:
        from rle.rle import decode_segment
    except ImportError:  # pragma: no cover - pydicom's own RLE decoder raises ordinary exceptions
        return
    count = int.from_bytes(frame[:4], "little") if len(frame) >= 64 else 0
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(min(count, 15))] + [len(frame)]
    if not 1 <= count <= 15 or offsets[0] != 64 or offsets != sorted(set(offsets)):
        raise BadImage("corrupt_pixel_data", f"RLE frame {index}: header lists {count} segment(s) at {offsets[:-1]}")
    for start, end in itertools.pairwise(offsets):
        try:
            decoded = len(decode_segment(bytes(frame[start:end])))
        except (MemoryError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a Rust plugin may panic (pyo3 PanicException)
            raise BadImage("corrupt_pixel_data", f"RLE frame {index}: {type(exc).__name__}: {exc}"[:240]) from None
        if decoded not in (size, size + 1):
            raise BadImage("corrupt_pixel_data", f"RLE frame {index}: a segment decodes to {decoded} bytes, "
                                                 f"Rows x Columns is {size}")
