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


# --------------------------------------------------------------------------- the realistic preset


def test_realistic_cohort_has_sites_with_their_own_prevalence_views_and_scanners() -> None:
    from collections import Counter

    from pipeline.data.synthetic import SITES

    patients = plan_patients(spec(n_patients=900, preset="realistic"))
    by_site = Counter(p.site for p in patients)
    assert set(by_site) == {s.name for s in SITES} and all(n > 100 for n in by_site.values())
    prevalence = {s.name: np.mean([p.label == "PNEUMONIA" for p in patients if p.site == s.name]) for s in SITES}
    ap_share = {s.name: np.mean([p.view_position == "AP" for p in patients if p.site == s.name]) for s in SITES}
    assert prevalence["site-B"] > prevalence["site-C"] > prevalence["site-A"], prevalence  # differs by site
    assert ap_share["site-B"] > 0.5 > ap_share["site-A"], ap_share  # portable views where patients are sicker
    assert {p.manufacturer for p in patients} == {s.manufacturer for s in SITES}
    age = {label: np.mean([p.age for p in patients if p.label == label]) for label in ("NORMAL", "PNEUMONIA")}
    assert age["PNEUMONIA"] > age["NORMAL"] + 5


def test_the_spurious_portable_marker_follows_the_label_at_one_site_only() -> None:
    from pipeline.data.synthetic import has_portable_marker

    s = spec(n_patients=900, preset="realistic")
    patients = plan_patients(s)

    def rate(site: str, label: str) -> float:
        return float(np.mean([has_portable_marker(p, 0, s) for p in patients if p.site == site and p.label == label]))

    assert rate("site-B", "PNEUMONIA") > 0.7 and rate("site-B", "NORMAL") < 0.3
    assert rate("site-A", "PNEUMONIA") == rate("site-A", "NORMAL") == 0.0
    sick_b = next(p for p in patients if p.site == "site-B" and p.label == "PNEUMONIA" and has_portable_marker(p, 0, s))
    image = render_image(sick_b, 0, s)
    side = s.image_size
    assert image[side // 20, side // 2] > 0.85  # the bar is drawn where has_portable_marker says


def test_realistic_lesions_range_from_faint_to_obvious_some_occult_and_well_patients_with_mimics() -> None:
    """The opacity signal (image − the same anatomy rendered with the other label) spreads from faint to
    obvious; a few sick patients show nothing (occult) and some well ones show the same opacity (mimics)."""
    import dataclasses

    from pipeline.data.synthetic import MIMIC_SHARE, OCCULT_SHARE

    s = spec(n_patients=600, preset="realistic", image_size=64)
    patients = plan_patients(s)

    def signal(p: object, other: str) -> float:
        twin = dataclasses.replace(p, label=other)
        diff = render_image(p, 0, s) - render_image(twin, 0, s)
        return float(np.percentile(diff[s.image_size // 8:], 99))  # below the portable bar

    sick = [signal(p, "NORMAL") for p in patients if p.label == "PNEUMONIA"][:150]
    visible = [v for v in sick if v > 0.02]
    assert min(visible) < 0.15 and max(visible) > 0.35, sorted(visible)  # faint to obvious
    occult = 1 - len(visible) / len(sick)
    assert 0.5 * OCCULT_SHARE < occult < 2 * OCCULT_SHARE, occult
    well = [p for p in patients if p.label == "NORMAL"][:200]
    strong = np.mean([_finding(p, s) > 0.1 for p in well])  # an opacity as strong as a visible lesion
    assert 0.5 * MIMIC_SHARE < strong < 2 * MIMIC_SHARE, strong


def _finding(p: object, s: object) -> float:
    """How far a well patient's image rises above the same image with no finding at all (neither a mimic
    nor a benign look-alike: both branches switched off through the shares the renderer reads)."""
    from pipeline.data import synthetic

    real = synthetic.render_image(p, 0, s)
    saved = synthetic.MIMIC_SHARE
    synthetic.MIMIC_SHARE = -1.0  # every branch of the well patient's finding draw now falls through
    try:
        plain = synthetic.render_image(p, 0, s)
    finally:
        synthetic.MIMIC_SHARE = saved
    return float(np.percentile((real - plain)[s.image_size // 8:], 99))


def test_realistic_cohort_reaches_the_manifest_with_site_and_manufacturer(tmp_path: Path) -> None:
    rows = generate_cohort(tmp_path / "raw", spec(preset="realistic"))
    assert rows["patients"] == 20
    listed = list(csv.DictReader(open(tmp_path / "raw" / "patients.csv")))
    assert {r["site"] for r in listed} <= {"site-A", "site-B", "site-C"} and all(r["manufacturer"] for r in listed)
    assert digest(tmp_path / "raw") != digest(_easy(tmp_path / "easy"))


def _easy(root: Path) -> Path:
    generate_cohort(root, spec())
    return root
