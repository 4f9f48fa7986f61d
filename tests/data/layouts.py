"""Tiny datasets in each source's real layout, with the traps real data has.

Each builder writes under ``root`` and returns a :class:`Layout`: the CLI arguments, the
raw patient ids expected to stay together, the quarantine reasons expected, and the
strings (file names, header PHI) that must never appear in any output.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tests.data.helpers import PHI, to_uint8, write_dicom, write_jpeg, write_png, xray


@dataclass
class Layout:
    source: str
    input: Path
    labels: Path | None = None
    together: list[list[str]] = field(default_factory=list)  # raw patient ids that must share a split
    reasons: dict[str, int] = field(default_factory=dict)  # quarantine reason -> count expected
    secrets: list[str] = field(default_factory=list)  # must appear in no output
    excluded: int = 0
    files_without_row: int = 0  # files the labels CSV does not name (a trap: tolerated via --set)

    def cli_args(self, out: Path) -> list[str]:
        args = ["ingest", "--source", self.source, "--input", str(self.input), "--out", str(out)]
        if self.files_without_row:
            args += ["--set", f"data.ingest.max_label_mismatches={self.files_without_row}"]
        return args + (["--labels", str(self.labels)] if self.labels else [])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def kaggle(root: Path) -> Layout:
    """``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}`` with patients across train and test."""
    base = root / "chest_xray"
    pos = [(f"person{i}", i) for i in range(1, 8)]
    for name, idx in pos:
        split = ("train", "test", "val")[idx % 3]
        write_jpeg(base / split / "PNEUMONIA" / f"{name}_bacteria_{idx}.jpeg", idx, positive=True)
    # person1 also has a virus image shipped in *test* (first one in *test* too via idx%3 == 1)
    write_jpeg(base / "train" / "PNEUMONIA" / "person1_virus_6.jpeg", 1, k=1, positive=True)
    write_jpeg(base / "train" / "PNEUMONIA" / "person2_virus_9.jpeg", 2, k=1, positive=True)
    for i in range(8):
        split = ("train", "test", "val", "train")[i % 4]
        write_jpeg(base / split / "NORMAL" / f"IM-01{i:02d}-0001.jpeg", 20 + i)
    write_jpeg(base / "test" / "NORMAL" / "NORMAL2-IM-0588-0001.jpeg", 30)
    # duplicates under two patients: identical bytes; IM-0301 also has an image of its own
    dup = write_jpeg(base / "train" / "NORMAL" / "IM-0300-0001.jpeg", 31)
    (base / "test" / "NORMAL" / "IM-0301-0001.jpeg").write_bytes(dup.read_bytes())
    write_jpeg(base / "test" / "NORMAL" / "IM-0301-0002.jpeg", 32)
    # the same picture re-encoded under another patient (near-duplicate, different bytes)
    px = to_uint8(xray(33))
    Image.fromarray(px).save(base / "train" / "NORMAL" / "IM-0400-0001.jpeg", quality=95)
    Image.fromarray(px).save(base / "val" / "NORMAL" / "IM-0401-0001.jpeg", quality=80)
    # corrupt files
    _truncate(write_jpeg(base / "train" / "NORMAL" / "IM-0500-0001.jpeg", 34))
    (base / "test" / "PNEUMONIA" / "person50_bacteria_1.jpeg").write_bytes(b"")
    (base / "train" / "NORMAL" / "notes.txt").write_text("reviewed by Dr Plumtrebb\n")
    write_jpeg(base / "train" / "NORMAL" / "scan_0001.jpeg", 35)  # no patient id in the name
    return Layout(
        "kaggle-pneumonia", root,
        together=[["person1"], ["person2"], ["IM-0300", "IM-0301"], ["IM-0400", "IM-0401"]],
        reasons={"truncated": 1, "empty_file": 1, "not_an_image": 1, "duplicate_image": 1, "missing_patient": 1},
        secrets=["person1_bacteria", "person1_virus", "IM-0300-0001", "NORMAL2-IM-0588", "Plumtrebb"],
    )


def nih(root: Path) -> Layout:
    """``images_00x/images/*.png`` + ``Data_Entry_2017.csv`` with excluded findings and shipped splits."""
    rows: list[tuple[str, str, str]] = []
    idx = 0
    for pid in range(1, 13):
        for k in range(2 if pid in (1, 2) else 1):
            name = f"{pid:08d}_{k:03d}.png"
            finding = "Pneumonia" if pid % 3 == 0 else ("Pneumonia|Effusion" if pid == 1 else "No Finding")
            write_png(root / f"images_00{1 + idx % 2}" / "images" / name, pid, k, positive="Pneumonia" in finding)
            rows.append((name, finding, str(pid)))
            idx += 1
    for pid, finding in ((13, "Effusion"), (14, "Cardiomegaly|Edema")):
        name = f"{pid:08d}_000.png"
        write_png(root / "images_002" / "images" / name, pid)
        rows.append((name, finding, str(pid)))
    # duplicates under two patient ids (20 and 21); 21 has another image
    dup = write_png(root / "images_001" / "images" / "00000020_000.png", 40)
    (root / "images_002" / "images" / "00000021_000.png").write_bytes(dup.read_bytes())
    write_png(root / "images_002" / "images" / "00000021_001.png", 41)
    rows += [("00000020_000.png", "No Finding", "20"), ("00000021_000.png", "No Finding", "21"),
             ("00000021_001.png", "No Finding", "21")]
    _truncate(write_png(root / "images_001" / "images" / "00000030_000.png", 42))
    rows.append(("00000030_000.png", "No Finding", "30"))
    write_png(root / "images_001" / "images" / "00000031_000.png", 43)  # no CSV row
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        for name, finding, pid in rows:
            w.writerow([name, finding, 0, pid, 40 + int(pid), "F" if int(pid) % 2 else "M", "PA", 64, 64, 0.14, 0.14])
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png\n")
    (root / "test_list.txt").write_text("00000001_001.png\n00000002_001.png\n")
    return Layout(
        "nih-cxr14", root,
        together=[["1"], ["2"], ["20", "21"]],
        reasons={"truncated": 1, "duplicate_image": 1, "missing_label": 1},
        excluded=2, files_without_row=1,
    )


def rsna(root: Path) -> Layout:
    """``stage_2_train_images/<patientId>.dcm`` + ``stage_2_train_labels.csv`` with PHI in the headers."""
    lines = ["patientId,x,y,width,height,Target"]
    for i in range(14):
        pid = f"0a{i:02d}e1c2-9b1f-4c2e-8d3a-{i:012d}"
        positive = i % 3 == 0
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", 50 + i, patient_id=pid, positive=positive,
                    phi={**PHI, "PatientName": f"{PHI['PatientName']}{i}"})
        lines += [f"{pid},10,20,30,40,1", f"{pid},50,20,30,40,1"] if positive else [f"{pid},,,,,0"]
    dup_a, dup_b = "dddd0001-0000-0000-0000-000000000001", "dddd0002-0000-0000-0000-000000000002"
    path = write_dicom(root / "stage_2_train_images" / f"{dup_a}.dcm", 70, patient_id="SHAREDMRN-0009", phi=PHI)
    (root / "stage_2_train_images" / f"{dup_b}.dcm").write_bytes(path.read_bytes())
    lines += [f"{dup_a},,,,,0", f"{dup_b},,,,,0"]
    write_dicom(root / "stage_2_train_images" / "eeee0001.dcm", None, patient_id="eeee0001", phi=PHI)
    _truncate(write_dicom(root / "stage_2_train_images" / "eeee0002.dcm", 71, patient_id="eeee0002", phi=PHI))
    lines += ["eeee0001,,,,,0", "eeee0002,,,,,1"]
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    return Layout(
        "rsna-pneumonia", root,
        together=[[dup_a, dup_b]],
        reasons={"dicom_no_pixels": 1, "truncated": 1, "duplicate_image": 1},
        secrets=[*PHI.values(), "SHAREDMRN-0009"],
    )


def dicom(root: Path) -> Layout:
    """A PACS-like export: DICOM files (some without suffix, PHI in names and headers) + labels by UID or file."""
    images = root / "export"
    lines = ["SOPInstanceUID,file,label"]
    n = 0
    for p in range(12):
        mrn = f"MRNQ{p:05d}"
        for k in range(2 if p < 3 else 1):
            uid = f"1.2.826.0.1.3680043.10.{p}.{k}"
            positive = p % 3 == 0
            name = f"ZyxqvistHenrietta_{mrn}_{k}.dcm" if p == 0 else f"IMG{n:04d}"
            write_dicom(images / f"study{p}" / name, 80 + p, k=k, patient_id=mrn, sop_uid=uid, positive=positive,
                        phi=PHI, photometric="MONOCHROME1" if p == 5 else "MONOCHROME2")
            label = "PNEUMONIA" if positive else "NORMAL"
            lines.append(f"{uid},,{label}" if k == 0 else f",study{p}/{name},{label}")
            n += 1
    # the same pixels exported twice under two MRNs (different headers: different bytes)
    for mrn, uid in (("MRNDUPA", "1.2.3.9.1"), ("MRNDUPB", "1.2.3.9.2")):
        write_dicom(images / mrn.lower() / "IMG", 95, patient_id=mrn, sop_uid=uid, phi=PHI)
        lines.append(f"{uid},,NORMAL")
    write_dicom(images / "nopid" / "IMG", 96, patient_id=None, sop_uid="1.2.3.9.3", phi=PHI)
    lines.append("1.2.3.9.3,,NORMAL")
    write_dicom(images / "nolabel" / "IMG", 97, patient_id="MRNQ99999", sop_uid="1.2.3.9.4", phi=PHI)
    (images / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 8)
    (images / "README.txt").write_text(f"export for {PHI['PatientName']}\n")
    labels = root / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return Layout(
        "dicom", images, labels,
        together=[["MRNQ00000"], ["MRNDUPA", "MRNDUPB"]],
        reasons={"missing_patient": 1, "missing_label": 1, "not_an_image": 1, "dicom_no_pixels": 1},
        secrets=[*PHI.values(), "MRNQ00000", "ZyxqvistHenrietta", "MRNDUPA"],
    )


def folder(root: Path) -> Layout:
    """The seed's ``dataset/train/<label>/*`` layout, with a mapping CSV grouping images by patient."""
    lines = ["file,patient_id"]
    for i in range(12):
        label = "PNEUMONIA" if i % 3 == 0 else "NORMAL"
        for k in range(2 if i < 2 else 1):
            name = f"{label}/img_{i}_{k}.png"
            write_png(root / name, 100 + i, k, positive=label == "PNEUMONIA")
            lines.append(f"{name},PAT-{i:03d}")
    (root / "NORMAL" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (root / "patients.csv").write_text("\n".join(lines) + "\n")
    return Layout("folder", root, root / "patients.csv", together=[["PAT-000"], ["PAT-001"]],
                  reasons={"not_an_image": 1}, secrets=["PAT-000"], files_without_row=1)  # broken.png: no row


BUILDERS = {"kaggle-pneumonia": kaggle, "nih-cxr14": nih, "rsna-pneumonia": rsna, "dicom": dicom, "folder": folder}
