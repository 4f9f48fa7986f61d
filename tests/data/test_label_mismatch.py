"""A labels CSV that does not match the files: counted in the summary, and ingestion stops (before writing
anything) with a diagnosis that names no file and no patient — never one invented patient per image."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Settings
from pipeline.data.ingest import run_ingest
from pipeline.data.sources.base import LabelRows
from pipeline.errors import LabelMismatch
from tests.data.helpers import write_dicom, write_png

# Identifying-looking names: none of them may reach an error, a log line or the console.
NAMES = ["Qzmith_John_0", "Qzmith_John_1", "Vbrown_Ann_0", "Vbrown_Ann_1", "Wlee_Max_0"]
PATIENTS = ["MRNQ1001", "MRNQ1001", "MRNQ2002", "MRNQ2002", "MRNQ3003"]
SECRETS = [*NAMES, "Qzmith", "Vbrown", "Wlee", "MRNQ1001", "MRNQ2002", "MRNQ3003"]


def _folder(root: Path, suffix: str = ".png") -> list[str]:
    """Five images of three patients under ROOT/<label>/; returns their paths relative to ROOT."""
    refs = []
    for i, name in enumerate(NAMES):
        label = "PNEUMONIA" if i % 2 else "NORMAL"
        write_png(root / label / f"{name}{suffix}", 60 + i // 2, k=i % 2, positive=label == "PNEUMONIA")
        refs.append(f"{label}/{name}{suffix}")
    return refs


def _csv(path: Path, files: list[str], patients: list[str] = PATIENTS) -> Path:
    path.write_text("file,patient_id\n" + "".join(f"{f},{p}\n" for f, p in zip(files, patients, strict=False)))
    return path


def _ingest(settings: Settings, raw: Path, labels: Path, out: Path, *sets: str) -> tuple[int, str]:
    args = ["ingest", "--source", "folder", "--input", str(raw), "--labels", str(labels), "--out", str(out),
            "--params", str(settings.root / "params.yaml")]
    result = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    return result.exit_code, result.output


def _no_secrets(text: str) -> None:
    assert not [s for s in SECRETS if s.lower() in text.lower()], "a file name or patient id was printed"


def test_mismatched_csv_stops_ingest_before_writing_with_a_diagnosis(
        tmp_path: Path, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings()
    raw = tmp_path / "raw"
    refs = _folder(raw, ".jpg")
    labels = _csv(tmp_path / "patients.csv", [
        f"/mnt/export/site1/{refs[0]}",          # line 2: absolute path
        refs[1].replace(".jpg", ".png"),         # line 3: another extension
        refs[2].upper(),                         # line 4: letter case
        refs[3],                                 # line 5: matches
        "NORMAL/Somebody_Else.jpg",              # line 6: no such file
    ])                                           # refs[4]: no row
    out = tmp_path / "datasets" / "mismatch"
    with caplog.at_level(logging.INFO):
        code, console = _ingest(settings, raw, labels, out)
    assert code == 2, console
    flat = " ".join(console.split())
    assert "4 of 5 file(s) have no usable row" in flat and "max_label_mismatches allows 0" in flat
    assert "4 of 5 row(s) name no file" in flat
    assert "the CSV holds absolute paths" in flat
    assert "the CSV names .png files, the folder holds .jpg files" in flat
    assert "letter case differs" in flat and "no row names the file (1 file)" in flat
    assert "CSV line 2 ↔ file #" in flat and "CSV line 6: no such file" in flat
    assert "hint:" in console and "max_label_mismatches=N" in flat
    _no_secrets(console)
    _no_secrets(caplog.text)
    assert not out.exists(), "nothing may be written when the labels do not match"


def test_tolerated_mismatches_are_counted_in_the_summary(tmp_path: Path,
                                                         make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    raw = tmp_path / "raw"
    refs = _folder(raw)
    labels = _csv(tmp_path / "patients.csv", [refs[0], refs[1], refs[2], "NORMAL/Gone.png"])
    out = tmp_path / "ds"
    code, console = _ingest(settings, raw, labels, out, "data.ingest.max_label_mismatches=2")
    assert code == 0, console
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["labels_csv"] | {"diagnosis": None} == {
        "rows": 4, "rows_without_file": 1, "files": 5, "files_without_row": 2, "threshold_applies": True,
        "mismatches": {"no_row": 2, "no_file": 1}, "diagnosis": None}
    assert summary["label_rows_without_file"] == 1
    assert summary["patients"] == 4  # MRNQ1001 ×2, MRNQ2002, and one patient per image for the two without a row
    _no_secrets(json.dumps(summary))


def test_a_matching_csv_ingests_with_the_patients_it_names(tmp_path: Path,
                                                           make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    raw = tmp_path / "raw"
    refs = _folder(raw)
    # Windows separators, a leading ./ and a bare file name all name the same files
    labels = _csv(tmp_path / "patients.csv", [refs[0].replace("/", "\\"), f"./{refs[1]}", refs[2].split("/")[1],
                                              refs[3], refs[4]])
    out = tmp_path / "ds"
    code, console = _ingest(settings, raw, labels, out)
    assert code == 0, console
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["ingested"] == 5 and summary["patients"] == 3
    assert summary["labels_csv"]["files_without_row"] == summary["labels_csv"]["rows_without_file"] == 0
    assert summary["labels_csv"]["mismatches"] == {}


def test_an_empty_patient_id_counts_as_a_file_without_a_row(tmp_path: Path,
                                                            make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    raw = tmp_path / "raw"
    refs = _folder(raw)
    labels = _csv(tmp_path / "patients.csv", refs, [*PATIENTS[:4], " "])
    code, console = _ingest(settings, raw, labels, tmp_path / "ds")
    assert code == 2 and "1 of 5 file(s) have no usable row" in " ".join(console.split())
    assert "empty patient_id cell" in console
    _no_secrets(console)


def test_nih_and_rsna_count_and_stop(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    raw = tmp_path / "nih"
    write_png(raw / "images_001" / "images" / "00000001_000.png", 1)
    write_png(raw / "images_001" / "images" / "00000002_000.png", 2)  # its row says .jpg
    (raw / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n00000001_000.png,No Finding,1\n00000002_000.jpg,Pneumonia,2\n"
        "00000003_000.png,No Finding,3\n")
    settings = make_settings("data.source=nih-cxr14", f"data.input={raw}", f"data.dataset_dir={tmp_path / 'nds'}")
    with pytest.raises(LabelMismatch, match=r"1 of 2 file\(s\) have no usable row") as err:
        run_ingest(settings, show_progress=False)
    assert "the CSV names .png files, the folder holds .png" not in str(err.value)
    assert "the CSV names .jpg files, the folder holds .png files" in str(err.value)
    assert not (tmp_path / "nds").exists()

    raw = tmp_path / "rsna"
    for pid in ("aaa1", "bbb2"):
        write_dicom(raw / "stage_2_train_images" / f"{pid}.dcm", 3, patient_id=pid)
    (raw / "stage_2_train_labels.csv").write_text("patientId,Target\naaa1,0\nbbb2,1\nccc3,0\nccc3,1\n")
    settings = make_settings("data.source=rsna-pneumonia", f"data.input={raw}",
                             f"data.dataset_dir={tmp_path / 'rds'}")
    summary = run_ingest(settings, show_progress=False)  # rows without a file are counted only
    assert summary["labels_csv"]["rows_without_file"] == 2 and summary["labels_csv"]["files_without_row"] == 0
    write_dicom(raw / "stage_2_train_images" / "ddd4.dcm", 4, patient_id="ddd4")
    with pytest.raises(LabelMismatch, match=r"file #3: no row names it"):
        run_ingest(settings, show_progress=False)


def test_dicom_counts_what_it_can_before_reading(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    raw = tmp_path / "export"
    write_dicom(raw / "a" / "IMG1", 1, patient_id="MRNQ1001", sop_uid="1.2.3.1")
    write_dicom(raw / "b" / "IMG2", 2, patient_id="MRNQ2002", sop_uid="1.2.3.2")
    write_dicom(raw / "c" / "IMG3", 3, patient_id="MRNQ3003", sop_uid="1.2.3.3")
    labels = tmp_path / "labels.csv"
    labels.write_text("SOPInstanceUID,file,label\n1.2.3.1,,NORMAL\n,b/IMG2,PNEUMONIA\n,z/IMG9,NORMAL\n")
    settings = make_settings("data.source=dicom", f"data.input={raw}", f"data.labels={labels}",
                             f"data.dataset_dir={tmp_path / 'ds'}")
    summary = run_ingest(settings, show_progress=False)
    assert summary["labels_csv"] | {"diagnosis": None, "note": None} == {
        "rows": 3, "rows_by_uid": 1, "rows_without_file": 1, "files": 3, "files_without_row": None,
        "files_not_named_by_file": 2, "mismatches": {"no_file": 1}, "threshold_applies": False,
        "diagnosis": None, "note": None}
    assert summary["quarantine_reasons"] == {"missing_label": 1}  # IMG3: neither a file nor a UID row
    # keyed by file only: every count is known; the patient comes from the header, so nothing stops
    labels.write_text("file,label\na/IMG1,NORMAL\nb/IMG2,PNEUMONIA\n")
    summary = run_ingest(settings, show_progress=False)
    assert summary["labels_csv"]["files_without_row"] == 1 and summary["labels_csv"]["mismatches"] == {"no_row": 1}


def test_pairing_diagnoses_other_folders_and_key_forms() -> None:
    rows = LabelRows("Image Index", "Patient ID")
    rows.add(2, "data/images_001/x1.png")
    rows.add(3, "images_001/x2.png")
    assert rows.find("images_001/x1.png", "x1.png") is None
    assert rows.find("images_001/x2.png", "x2.png") is None
    report = rows.report(consequence="", expected="")
    assert report.mismatches == {"folders_differ": 1, "key_form": 1}
    assert report.files_without_row == report.rows_without_file == 2
