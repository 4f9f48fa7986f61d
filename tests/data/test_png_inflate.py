"""The ISA-L inflate path for PNGs: same pixels as Pillow alone, a valid PNG, and a clean
fallback (``None``) on anything unusual, so errors are reported exactly as before."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline.data import imaging, png_inflate
from pipeline.data.imaging import decode_bytes
from pipeline.data.png_inflate import with_stored_pixels
from pipeline.errors import BadImage

MAX = 10**8


def _chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        out.append((kind, body, int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")))
        pos += 12 + length
    return out


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)
    return png_inflate.PNG_SIGNATURE + body


def _save(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    gray = rng.integers(0, 256, (67, 91), dtype=np.uint8)
    ramp = (np.arange(300 * 420).reshape(300, 420) * 7 % 65536).astype(np.uint16)
    rgb = rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (21, 37, 4), dtype=np.uint8)
    pal = Image.fromarray(rng.integers(0, 16, (50, 61), dtype=np.uint8), mode="L").convert("P")
    pal.info["transparency"] = 3
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "kept as is")
    big = np.clip(rng.normal(128, 40, (700, 700)), 0, 255).astype(np.uint8)  # > 64 KiB: several IDAT chunks
    return {
        "gray8": _save(Image.fromarray(gray)),
        "gray16": _save(Image.fromarray(ramp)),
        "rgb": _save(Image.fromarray(rgb)),
        "rgba": _save(Image.fromarray(rgba)),
        "la": _save(Image.fromarray(rgba[..., :2].copy(), mode="LA")),
        "palette_trns": _save(pal),
        "palette_4bit": _save(pal, bits=4),
        "bilevel": _save(Image.fromarray(gray > 128)),
        "text_chunk": _save(Image.fromarray(gray), pnginfo=info),
        "several_idat": _save(Image.fromarray(big), compress_level=9),
        "one_row": _save(Image.fromarray(gray[:1])),
    }


def _pillow_only(data: bytes) -> tuple[np.ndarray, int]:
    im = Image.open(io.BytesIO(data))
    im.load()
    return np.asarray(im), im.mode


@pytest.mark.parametrize("name", list(_images()))
def test_same_pixels_and_a_valid_png(name: str) -> None:
    data = _images()[name]
    stored = with_stored_pixels(data, max_pixels=MAX)
    assert stored is not None, "the fast path should apply to this PNG"
    original, rewritten = _chunks(data), _chunks(stored)
    for kind, body, crc in rewritten:
        assert zlib.crc32(kind + body) == crc, kind
    idat = [body for kind, body, _ in rewritten if kind == b"IDAT"]
    assert len(idat) == 1
    assert zlib.decompress(idat[0]) == zlib.decompress(b"".join(b for k, b, _ in original if k == b"IDAT"))
    assert [(k, b) for k, b, _ in original if k != b"IDAT"] == [(k, b) for k, b, _ in rewritten if k != b"IDAT"]
    pixels, mode = _pillow_only(data)
    fast_pixels, fast_mode = _pillow_only(stored)
    assert fast_mode == mode
    assert np.array_equal(fast_pixels, pixels) and fast_pixels.dtype == pixels.dtype


def test_several_idat_chunks_fixture_really_has_several() -> None:
    assert sum(k == b"IDAT" for k, _, _ in _chunks(_images()["several_idat"])) > 1


def _verdict(data: bytes) -> tuple:
    """What ``decode_bytes`` makes of ``data``: the quarantine reason, or the image."""
    try:
        image = decode_bytes(data, max_pixels=MAX)
    except BadImage as exc:
        return ("rejected", exc.reason)
    return ("decoded", image.bit_depth, image.format, image.pixels.dtype.str, image.pixels.shape,
            image.pixels.tobytes())


@pytest.mark.parametrize("name", list(_images()))
def test_decode_bytes_is_the_same_with_and_without_the_fast_path(name: str, monkeypatch) -> None:
    data = _images()[name]
    fast = _verdict(data)
    monkeypatch.setattr(imaging, "with_stored_pixels", lambda *_a, **_k: None)
    assert _verdict(data) == fast
    assert fast[0] == ("rejected" if name == "bilevel" else "decoded")  # 1-bit is not a radiograph mode


def _with_idat(data: bytes, transform) -> bytes:
    chunks = [(k, b) for k, b, _ in _chunks(data)]
    return _png(transform(chunks))


def _gray() -> bytes:
    return _images()["gray8"]


def _corrupt_stream(chunks):  # flip a byte of the Adler-32 at the end of the zlib stream
    out = []
    for kind, body in chunks:
        if kind == b"IDAT":
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        out.append((kind, body))
    return out


def _interlaced(chunks):
    kind, ihdr = chunks[0]
    return [(kind, ihdr[:12] + b"\x01"), *chunks[1:]]


def _trailing_bytes(chunks):
    return [(k, b + b"\x00\x00" if k == b"IDAT" else b) for k, b in chunks]


def _split_idat(chunks):  # a text chunk between two IDAT chunks
    out = []
    for kind, body in chunks:
        if kind == b"IDAT":
            out += [(kind, body[:10]), (b"tEXt", b"a\x00b"), (kind, body[10:])]
        else:
            out.append((kind, body))
    return out


@pytest.mark.parametrize("case, make", [
    ("truncated", lambda: _gray()[: len(_gray()) // 2]),
    ("bad_adler", lambda: _with_idat(_gray(), _corrupt_stream)),
    ("interlaced_flag", lambda: _with_idat(_gray(), _interlaced)),
    ("bytes_after_stream", lambda: _with_idat(_gray(), _trailing_bytes)),
    ("idat_not_consecutive", lambda: _with_idat(_gray(), _split_idat)),
    ("not_png", lambda: b"\xff\xd8\xff" + b"\x00" * 100),
    ("no_idat", lambda: _png([(k, b) for k, b, _ in _chunks(_gray()) if k != b"IDAT"])),
])
def test_unusual_files_fall_back_to_pillow(case: str, make, monkeypatch) -> None:
    data = make()
    assert with_stored_pixels(data, max_pixels=MAX) is None
    fast = _verdict(data)  # the decoder's verdict is the one Pillow alone gives
    monkeypatch.setattr(imaging, "with_stored_pixels", lambda *_a, **_k: None)
    assert _verdict(data) == fast


def test_pixel_limit_is_checked_on_the_header_before_inflating() -> None:
    data = _images()["gray8"]  # 91 x 67
    assert with_stored_pixels(data, max_pixels=91 * 67) is not None
    assert with_stored_pixels(data, max_pixels=91 * 67 - 1) is None
    with pytest.raises(BadImage) as err:
        decode_bytes(data, max_pixels=91 * 67 - 1)
    assert err.value.reason == "decompression_bomb"


def test_large_scanline_totals_go_to_pillow_alone(monkeypatch) -> None:
    data = _images()["gray16"]  # 300 rows x (1 + 840) bytes
    monkeypatch.setattr(png_inflate, "MAX_INFLATED_BYTES", 300 * 841 - 1)
    assert with_stored_pixels(data, max_pixels=MAX) is None
    monkeypatch.setattr(png_inflate, "MAX_INFLATED_BYTES", 300 * 841)
    assert with_stored_pixels(data, max_pixels=MAX) is not None


def test_png_inflate_option(monkeypatch) -> None:
    data = _images()["gray8"]
    calls = []
    monkeypatch.setattr(imaging, "with_stored_pixels", lambda *a, **k: calls.append(1))
    decode_bytes(data, max_pixels=MAX, png_inflate="pillow")
    assert calls == []  # "pillow" leaves the inflate to Pillow
    decode_bytes(data, max_pixels=MAX)
    assert calls == [1]  # the default uses ISA-L
    with pytest.raises(ValueError, match="png_inflate"):
        decode_bytes(data, max_pixels=MAX, png_inflate="zlib")
    from pipeline.data.reader import IngestOptions
    from pipeline.data.sources.base import XRAY_PROFILE

    with pytest.raises(ValueError, match="png_inflate"):  # not a quarantine of every PNG later
        IngestOptions(source="t", classes=("A",), profile=XRAY_PROFILE, salt=b"s", min_size=1, max_pixels=MAX,
                      max_bytes=MAX, dicom_bit_depth=8, workers=1, png_inflate="zlib")
