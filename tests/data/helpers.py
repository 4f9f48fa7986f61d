"""Tiny fixture writers for the data tests: X-ray-like PNG/JPEG images and DICOM files made with pydicom.

Images come from the synthetic cohort renderer, so different "patients" look different
(distinct perceptual hashes) and images of one patient look alike, as in real data.
"""

from __future__ import annotations

import functools
import io
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.data.synthetic import CohortSpec, Patient, render_image

SIDE = 64
SPEC = CohortSpec(n_patients=1, images_per_patient=(1, 1), prevalence=0.5, image_size=SIDE, bit_depth=8,
                  bad_files=0, shift=0.0, seed=11)

# Planted PHI: distinctive tokens so a byte search cannot hit them by chance.
PHI = {
    "PatientName": "Zyxqvist^Henrietta",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCQXJ7731",
    "InstitutionName": "Qwertyvale Infirmary",
    "ReferringPhysicianName": "Plumtrebb^Oswin",
    "OtherPatientIDs": "OTHERIDQQ55",
}


def xray(index: int, k: int = 0, positive: bool = False, side: int = SIDE) -> np.ndarray:
    """Float image in [0, 1] of synthetic patient ``index`` (image ``k`` of that patient)."""
    spec = SPEC if side == SIDE else CohortSpec(**{**SPEC.__dict__, "image_size": side})
    patient = Patient(f"X{index}", "PNEUMONIA" if positive else "NORMAL", "F", 50, "PA", 1, index)
    return render_image(patient, k, spec)


def to_uint8(img01: np.ndarray) -> np.ndarray:
    return np.round(img01 * 255).astype(np.uint8)


def write_png(path: Path, index: int, k: int = 0, positive: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(xray(index, k, positive))).save(path, format="PNG")
    return path


def write_jpeg(path: Path, index: int, k: int = 0, positive: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(xray(index, k, positive))).save(path, format="JPEG", quality=92)
    return path


def dicom_bytes(pixels: np.ndarray | None, *, patient_id: str | None, sop_uid: str | None = None,
                photometric: str = "MONOCHROME2", bits_stored: int = 12, phi: dict[str, str] | None = None,
                window: tuple[float, float] | None = None, view: str | None = "PA", modality: str = "DX") -> bytes:
    """A DICOM Part-10 file (DX, explicit VR little endian) with the given pixels and header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if patient_id is not None:
        ds.PatientID = patient_id
    for key, value in (phi or {}).items():
        setattr(ds, key, value)
    ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    ds.Manufacturer = "ACME Imaging"
    if pixels is not None:
        arr = np.asarray(pixels)
        top = (1 << bits_stored) - 1
        raw = np.round(arr * top).astype(np.uint16) if arr.dtype.kind == "f" else arr.astype(np.uint16)
        ds.Rows, ds.Columns = raw.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = raw.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dicom(path: Path, index: int | None, *, patient_id: str | None, k: int = 0, positive: bool = False,
                **kwargs: object) -> Path:
    """Write a DICOM file of synthetic patient ``index`` (None: no pixel data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = xray(index, k, positive) if index is not None else None
    path.write_bytes(dicom_bytes(pixels, patient_id=patient_id, **kwargs))  # type: ignore[arg-type]
    return path


def produced_text(path: Path) -> bytes:
    """A file's searchable content: Parquet as CSV text, zip archives (e.g. ``.keras``) unpacked."""
    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_csv().encode()
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return data + b"".join(zf.read(n) for n in zf.namelist())
        except zipfile.BadZipFile:
            return data
    return data


def find_tokens(roots: list[Path], tokens: list[str]) -> dict[str, list[str]]:
    """``token -> files`` for every token found in any file below ``roots`` (empty when clean)."""
    hits: dict[str, list[str]] = {}
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            content = produced_text(path)
            low = content.lower()
            for token in tokens:
                if token.lower().encode() in low or token.lower() in path.as_posix().lower():
                    hits.setdefault(token, []).append(str(path))
    return hits


def chest_policy(**changes: object) -> Any:
    """The admission policy of the project's ``params.yaml`` (``data.admission``), with ``changes``."""
    import dataclasses

    from pipeline.config import load_settings
    from pipeline.data.policy import AdmissionPolicy

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    policy = AdmissionPolicy.from_config(load_settings(params).data.admission)
    return dataclasses.replace(policy, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DICOM files of other shapes


def edited(data: bytes, **tags: Any) -> bytes:
    """The file with header elements set (None: removed), written back in its own transfer syntax."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multi_frame(data: bytes, frames: int) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.NumberOfFrames = frames
    ds.PixelData = ds.PixelData * frames
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def colour(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    rgb = np.repeat((ds.pixel_array >> 4).astype(np.uint8)[..., None], 3, axis=2)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def foreign(name: str, **tags: Any) -> bytes:
    """A file pydicom ships (written by another encoder), with header elements changed."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom"
    return edited(Path(path).read_bytes(), **tags)


@functools.lru_cache(maxsize=1)
def _zero_block() -> bytes:
    """Raw deflate of 16 MiB of zeros after a full flush: byte-aligned and history-free, so repeatable."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(bytes(16 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)


def _deflate(parts: list[bytes | int]) -> bytes:
    """Raw deflate of ``parts`` (bytes, or a count of zero bytes) without holding the zeros in memory."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out: list[bytes] = []
    for part in parts:
        if isinstance(part, bytes):
            out.append(deflater.compress(part) + deflater.flush(zlib.Z_FULL_FLUSH))
            continue
        blocks, rest = divmod(part, 16 << 20)
        out += [_zero_block()] * blocks
        if rest:
            out.append(deflater.compress(bytes(rest)) + deflater.flush(zlib.Z_FULL_FLUSH))
    return b"".join(out) + b"\x03\x00"  # an empty final block


def deflated_dicom(rows: int, cols: int, *, pixel_bytes: int | None = None, private_bytes: int = 0,
                   trailing_bytes: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian DX file whose pixels are zeros.

    ``pixel_bytes`` (default: what rows x cols x 16 bit need) of pixel data, optionally a private
    OB element of ``private_bytes`` before it and trailing padding of ``trailing_bytes`` after it.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.PatientID, ds.Modality, ds.ViewPosition = "BOMB-1", "DX", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta)

    def element(tag: bytes, length: int) -> bytes:
        return tag + b"OB\x00\x00" + length.to_bytes(4, "little")

    pixels = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    parts: list[bytes | int] = [body.getvalue()]
    if private_bytes:
        parts += [b"\x09\x00\x10\x00LO\x08\x00XRAYOPS ", element(b"\x09\x00\x00\x10", private_bytes), private_bytes]
    parts += [b"\xe0\x7f\x10\x00OW\x00\x00" + pixels.to_bytes(4, "little"), pixels]
    if trailing_bytes:
        parts += [element(b"\xfc\xff\xfc\xff", trailing_bytes), trailing_bytes]
    return bytes(128) + b"DICM" + head.getvalue() + _deflate(parts)
