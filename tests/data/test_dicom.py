"""DICOM decoding: VOI LUT / windowing, MONOCHROME1 inversion, 8 vs 16 bit, header fields in the manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.data.imaging import decode_bytes
from pipeline.data.ingest import run_ingest
from tests.data.helpers import dicom_bytes, write_dicom, xray

MAX = 100_000_000


def test_monochrome1_is_inverted() -> None:
    img = xray(1)
    m2 = decode_bytes(dicom_bytes(img, patient_id="P"), max_pixels=MAX).pixels.astype(int)
    m1 = decode_bytes(dicom_bytes(img, patient_id="P", photometric="MONOCHROME1"), max_pixels=MAX).pixels.astype(int)
    assert np.abs(m1 - (255 - m2)).max() <= 1
    assert np.corrcoef(m2.ravel(), img.ravel())[0, 1] > 0.99


def test_window_from_the_header_is_applied() -> None:
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))  # 12-bit stored values 0..4095
    full = decode_bytes(dicom_bytes(ramp, patient_id="P"), max_pixels=MAX).pixels
    narrow = decode_bytes(dicom_bytes(ramp, patient_id="P", window=(2048, 1024)), max_pixels=MAX).pixels
    assert full[0, 0] == 0 and full[0, -1] == 255
    # outside the window [1536, 2560] everything saturates; inside, contrast is stretched
    assert (narrow[:, :20] == 0).all() and (narrow[:, -20:] == 255).all()
    assert np.diff(narrow[0, 26:38].astype(int)).mean() > np.diff(full[0, 26:38].astype(int)).mean() * 2


def test_sixteen_bit_kept_or_normalised_to_eight() -> None:
    data = dicom_bytes(xray(2), patient_id="P")
    eight = decode_bytes(data, max_pixels=MAX, dicom_bit_depth=8)
    sixteen = decode_bytes(data, max_pixels=MAX, dicom_bit_depth=16)
    assert (eight.pixels.dtype, eight.bit_depth) == (np.uint8, 8)
    assert (sixteen.pixels.dtype, sixteen.bit_depth) == (np.uint16, 16) and sixteen.pixels.max() > 255
    assert np.abs(sixteen.gray01() - eight.gray01()).max() < 0.01


def test_header_fields_reach_the_manifest_and_identifiers_do_not(make_settings: Callable[..., Settings],
                                                                 tmp_path: Path) -> None:
    root = tmp_path / "pacs"
    lines = ["file,label"]
    for i in range(4):
        write_dicom(root / f"img{i}.dcm", i, patient_id=f"MRN-{i:04d}", positive=i % 2 == 1,
                    photometric="MONOCHROME1" if i == 0 else "MONOCHROME2", view="AP" if i == 1 else "PA")
        lines.append(f"img{i}.dcm,{'PNEUMONIA' if i % 2 else 'NORMAL'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    settings = make_settings("data.source=dicom", f"data.input={root}", "data.version_with_dvc=false",
                             "data.ingest.dicom_bit_depth=16")
    summary = run_ingest(settings, show_progress=False)
    df = pd.read_parquet(settings.dataset_dir / "manifest.parquet")
    assert summary["ingested"] == 4 and set(df["bit_depth"]) == {16}
    assert set(df["modality"]) == {"DX"} and set(df["manufacturer"]) == {"ACME Imaging"}
    assert sorted(df["view_position"]) == ["AP", "PA", "PA", "PA"]
    assert sorted(df["photometric"]) == ["MONOCHROME1", "MONOCHROME2", "MONOCHROME2", "MONOCHROME2"]
    assert df["path"].str.endswith(".png").all()  # pixels re-encoded: no DICOM header leaves ingestion
    assert not df["patient_id"].str.contains("MRN").any()


def _bare_dataset(pixels: np.ndarray, signed: bool = False) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientID, ds.SOPInstanceUID, ds.Modality = "RAW-1", "1.2.3.4.5", "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
    if signed:
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_dicom_without_preamble_is_read(implicit: bool) -> None:
    """``Dataset.save_as`` without file meta writes no preamble/"DICM": still a DICOM, not 'not_an_image'."""
    import io

    img = xray(3)
    buf = io.BytesIO()
    _bare_dataset(np.round(img * 4000 - 1000), signed=True).save_as(buf, implicit_vr=implicit, little_endian=True)
    decoded = decode_bytes(buf.getvalue(), max_pixels=MAX)
    assert decoded.format == "dicom" and decoded.identifiers["patient_id"] == "RAW-1"
    assert np.corrcoef(decoded.pixels.ravel(), img.ravel())[0, 1] > 0.99
