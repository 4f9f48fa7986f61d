"""The synthetic cohort: deterministic, patient-structured, imbalanced, with bad files on request."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.synthetic import BAD_KINDS, CohortSpec, generate_cohort, plan_patients, render_image


def spec(**kw: object) -> CohortSpec:
    base = dict(n_patients=20, images_per_patient=(1, 3), prevalence=0.3, image_size=64, bit_depth=8,
                bad_files=0, shift=0.0, seed=7)
    return CohortSpec(**{**base, **kw})  # type: ignore[arg-type]


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_cohort(a, spec())
    generate_cohort(b, spec())
    generate_cohort(c, spec(seed=8))
    assert digest(a) == digest(b) != digest(c)


def test_counts_prevalence_and_layout(tmp_path: Path) -> None:
    counts = generate_cohort(tmp_path, spec(n_patients=40, prevalence=0.25))
    rows = list(csv.DictReader(open(tmp_path / "patients.csv")))
    patients = {r["patient_id"]: r["label"] for r in rows}
    assert counts["patients"] == len(patients) == 40
    assert sum(label == "PNEUMONIA" for label in patients.values()) == 10
    assert counts["images"] == len(rows) > 40  # several images per patient
    for r in rows:
        assert (tmp_path / r["file"]).is_file() and r["file"].startswith(r["label"] + "/")
    img = np.asarray(Image.open(tmp_path / rows[0]["file"]))
    assert img.shape == (64, 64) and img.dtype == np.uint8


def test_sixteen_bit_output(tmp_path: Path) -> None:
    generate_cohort(tmp_path, spec(bit_depth=16, n_patients=4))
    first = next(tmp_path.rglob("*.png"))
    assert np.asarray(Image.open(first)).max() > 255


def test_images_of_one_patient_are_more_alike_than_across_patients() -> None:
    s = spec(image_size=64, images_per_patient=(2, 2), n_patients=6)
    ps = plan_patients(s)
    same = [np.abs(render_image(p, 0, s) - render_image(p, 1, s)).mean() for p in ps]
    other = [np.abs(render_image(a, 0, s) - render_image(b, 0, s)).mean() for a, b in zip(ps, ps[1:], strict=False)]
    assert np.mean(same) < np.mean(other)


def test_pneumonia_adds_opacity_inside_lungs() -> None:
    s = spec(n_patients=30, prevalence=0.5)
    ps = plan_patients(s)
    pos = np.mean([render_image(p, 0, s).mean() for p in ps if p.label == "PNEUMONIA"])
    neg = np.mean([render_image(p, 0, s).mean() for p in ps if p.label == "NORMAL"])
    assert pos > neg


def test_bad_files_cover_every_kind_and_are_listed(tmp_path: Path) -> None:
    counts = generate_cohort(tmp_path, spec(bad_files=len(BAD_KINDS)))
    assert counts["bad_files"] == len(BAD_KINDS)
    listed = {r["file"] for r in csv.DictReader(open(tmp_path / "patients.csv"))}
    bad = sorted(tmp_path.rglob("BAD*"))
    assert len(bad) == len(BAD_KINDS) and all(p.relative_to(tmp_path).as_posix() in listed for p in bad)


def test_regeneration_is_skipped_when_spec_unchanged(tmp_path: Path) -> None:
    generate_cohort(tmp_path, spec())
    first = next(tmp_path.rglob("*.png"))
    mtime = first.stat().st_mtime_ns
    generate_cohort(tmp_path, spec())
    assert first.stat().st_mtime_ns == mtime
