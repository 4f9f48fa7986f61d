"""A deterministic synthetic chest X-ray cohort, so the whole pipeline runs offline.

Each patient has a body habitus (torso width, lung shape, heart size, exposure) shared
by all of their images, so images of one patient look alike — which is exactly why a
split must be by patient. Pneumonia images carry localised, patchy opacities inside a
lung field. Each image adds acquisition variation (exposure, noise, small rotation and
shift); ``shift`` > 0 simulates a different scanner/protocol for drift monitoring.

Two presets (``data.synthetic.preset``):

- ``realistic`` (the default): three sites (:data:`SITES`) with their own scanner
  (manufacturer, noise, blur, exposure, collimation, laterality marker), share of AP
  (portable) views and disease prevalence; patient sex and age (older when sick); patchy
  opacities from faint to obvious; AP views with a magnified heart and more scatter. Two
  limits on what any model can see keep the AUC near 0.9 rather than 1: pneumonia occult on
  the radiograph in :data:`OCCULT_SHARE` of sick patients, and in :data:`MIMIC_SHARE` of well
  patients an opacity of another cause drawn exactly like pneumonia (others get benign
  look-alikes: a nodule, a plate-like streak). Site B stamps a "portable" bar on most of its
  sick patients' images and few of the others': a spurious cue correlated with the label
  that a shortcut learner can use (:func:`has_portable_marker` tells which images carry it,
  for shortcut tests). With ``params.yaml``'s defaults the small CNN reaches test AUC
  0.88–0.92 (``benchmarks/bench_default_cohort.py`` runs it seed after seed).
- ``easy``: the first cohort (one site, high-contrast lesions); a small CNN separates it
  perfectly (test AUC 1.0), which makes a gate's ΔAUC degenerate. Tests use it: they assert
  behaviour, not a cohort's difficulty.

Layout written under ``root``::

    root/patients.csv                      file,patient_id,label,view_position,sex,age,site,manufacturer
    root/<LABEL>/<patient_id>_<k>.png

The patient ids look like real MRNs on purpose: ingestion must pseudonymise them.
Bad files (``bad_files`` > 0) are listed in ``patients.csv`` like real ones.
"""

from __future__ import annotations

import csv
import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
BAD_KINDS = (
    "empty_file",
    "truncated",
    "not_an_image",
    "too_small",
    "decompression_bomb",
    "colour_image",
    "duplicate_image",
    "conflicting_labels",
    "missing_label",
)


@dataclass(frozen=True)
class CohortSpec:
    """What to generate; mirrors ``data.synthetic`` in params.yaml."""

    n_patients: int
    images_per_patient: tuple[int, int]
    prevalence: float
    image_size: int
    bit_depth: int
    bad_files: int
    shift: float
    seed: int
    preset: str = "easy"  # data.synthetic.preset: realistic | easy


@dataclass(frozen=True)
class Site:
    """One hospital of the realistic cohort: its scanner and its patients."""

    name: str
    manufacturer: str
    share: float  # of patients
    prevalence_factor: float  # × data.synthetic.prevalence
    pa_share: float  # the rest are AP (portable) views
    noise: float
    gain: float
    gamma: float
    blur: float  # 0 = sharp; 1 = half resolution
    collimation: float  # dark border, share of the side
    marker_corner: int  # 0..3: where the laterality marker is stamped
    portable_cue: tuple[float, float]  # P(portable bar | sick), P(portable bar | well)


SITES = (
    Site("site-A", "Acme DR-3000", 0.45, 0.70, 0.88, 0.018, 1.00, 1.00, 0.35, 0.02, 0, (0.0, 0.0)),
    Site("site-B", "Borealis CR-P", 0.35, 1.45, 0.30, 0.034, 0.90, 1.10, 0.55, 0.06, 1, (0.85, 0.15)),
    Site("site-C", "Cobalt DX-9", 0.20, 0.90, 0.65, 0.024, 1.08, 0.94, 0.45, 0.035, 2, (0.0, 0.0)),
)
PRESETS = ("realistic", "easy")
# The realistic preset's two limits on what any model can see, which put the AUC near 0.89 rather than 1:
OCCULT_SHARE = 0.07  # sick patients whose pneumonia is occult on the radiograph (seen on CT only)
MIMIC_SHARE = 0.18  # well patients with an opacity of another cause that looks exactly like pneumonia


@dataclass(frozen=True)
class Patient:
    patient_id: str
    label: str
    sex: str
    age: int
    view_position: str
    n_images: int
    index: int
    site: str = ""
    manufacturer: str = ""


def plan_patients(spec: CohortSpec) -> list[Patient]:
    """Decide patients, labels and image counts (deterministic in the seed)."""
    if spec.preset not in PRESETS:
        raise ValueError(f"data.synthetic.preset must be one of {PRESETS}, not {spec.preset!r}")
    if spec.preset == "realistic":
        return _plan_realistic(spec)
    rng = np.random.default_rng([spec.seed, 0])
    n_pos = max(1, round(spec.n_patients * spec.prevalence))
    labels = np.array([CLASSES[1]] * n_pos + [CLASSES[0]] * (spec.n_patients - n_pos))
    rng.shuffle(labels)
    lo, hi = spec.images_per_patient
    patients = []
    for i, label in enumerate(labels):
        patients.append(
            Patient(
                patient_id=f"MRN{int(rng.integers(10**6, 10**7)):07d}{i:04d}",
                label=str(label),
                sex=str(rng.choice(["F", "M"])),
                age=int(np.clip(rng.normal(55, 18), 1, 99)),
                view_position=str(rng.choice(["PA", "AP"], p=[0.7, 0.3])),
                n_images=int(rng.integers(lo, hi + 1)),
                index=i,
            )
        )
    return patients


def _plan_realistic(spec: CohortSpec) -> list[Patient]:
    """Sites first, then each patient's label from the site's prevalence, then sex, age and view."""
    rng = np.random.default_rng([spec.seed, 0, 1])
    shares = np.array([site.share for site in SITES])
    lo, hi = spec.images_per_patient
    patients = []
    for i in range(spec.n_patients):
        site = SITES[int(rng.choice(len(SITES), p=shares / shares.sum()))]
        sick = rng.random() < min(0.95, spec.prevalence * site.prevalence_factor)
        label = CLASSES[int(sick)]
        patients.append(Patient(
            patient_id=f"MRN{int(rng.integers(10**6, 10**7)):07d}{i:04d}",
            label=label,
            sex=str(rng.choice(["F", "M"])),
            age=int(np.clip(rng.normal(62 if sick else 50, 17), 1, 99)),
            view_position="PA" if rng.random() < site.pa_share else "AP",
            n_images=int(rng.integers(lo, hi + 1)),
            index=i,
            site=site.name,
            manufacturer=site.manufacturer,
        ))
    if len({p.label for p in patients}) < 2:  # tiny cohorts: both classes, always
        first = patients[0]
        patients[0] = Patient(**{**first.__dict__, "label": CLASSES[1 - CLASSES.index(first.label)]})
    return patients


def site_of(patient: Patient) -> Site | None:
    return next((site for site in SITES if site.name == patient.site), None)


def has_portable_marker(patient: Patient, k: int, spec: CohortSpec) -> bool:
    """Whether image ``k`` carries site B's "portable" bar (the spurious cue)."""
    site = site_of(patient)
    if spec.preset != "realistic" or site is None:
        return False
    p_sick, p_well = site.portable_cue
    rng = np.random.default_rng([spec.seed, 4, patient.index, k])
    return bool(rng.random() < (p_sick if patient.label == CLASSES[1] else p_well))


def render_image(patient: Patient, k: int, spec: CohortSpec) -> np.ndarray:
    """Render image ``k`` of ``patient`` as float32 in [0, 1]."""
    if spec.preset == "realistic":
        return _render_realistic(patient, k, spec)
    s = spec.image_size
    prng = np.random.default_rng([spec.seed, 1, patient.index])  # habitus: shared by the patient
    irng = np.random.default_rng([spec.seed, 2, patient.index, k, int(spec.shift * 1000)])
    xr, yr = _pose(irng, s, angle_sd=2.5, shift_sd=0.015)

    torso_w = prng.uniform(0.36, 0.46)
    img = np.full((s, s), 0.06, np.float32)
    torso = ((xr - 0.5) / torso_w) ** 2 + ((yr - 0.62) / 0.62) ** 2 < 1
    img[torso] = 0.52
    lung_w, lung_h = prng.uniform(0.13, 0.17), prng.uniform(0.25, 0.31)
    lung_y = prng.uniform(0.46, 0.52)
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * prng.uniform(0.16, 0.2)
        lung = ((xr - cx) / lung_w) ** 2 + ((yr - lung_y) / lung_h) ** 2 < 1
        lungs.append((lung, cx))
        img[lung] = 0.2
    _mediastinum_and_ribs(img, xr, yr, torso, lungs, prng.uniform(0.1, 0.14), prng)

    if patient.label == CLASSES[1]:
        img = _add_opacities(img, xr, yr, lungs, lung_w, lung_h, lung_y, prng, irng, s)

    img = _acquire(img, irng, spec.shift)
    return img


def _mediastinum_and_ribs(img: np.ndarray, xr: np.ndarray, yr: np.ndarray, torso: np.ndarray,
                          lungs: list[tuple[np.ndarray, float]], heart_w: float, prng: np.random.Generator) -> None:
    """Heart (``heart_w`` wide), spine and rib shadows over the lung fields, drawn into ``img``."""
    heart = ((xr - 0.53) / heart_w) ** 2 + ((yr - 0.62) / 0.12) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.6)
    spine = np.abs(xr - 0.5) < 0.028
    img[spine & torso] = 0.72
    ribs = 0.5 + 0.5 * np.sin((yr + 0.08 * np.abs(xr - 0.5)) * np.pi * 18 + prng.uniform(0, 6.28))
    lung_mask = lungs[0][0] | lungs[1][0]
    img[lung_mask] += 0.07 * ribs[lung_mask] ** 4


def _pose(irng: np.random.Generator, s: int, *, angle_sd: float, shift_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (0..1) of an image rotated and shifted by one acquisition's random pose."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    angle = np.deg2rad(irng.normal(0, angle_sd))
    dx, dy = irng.normal(0, shift_sd, size=2)
    xc, yc = xx - 0.5 - dx, yy - 0.5 - dy
    return xc * np.cos(angle) - yc * np.sin(angle) + 0.5, xc * np.sin(angle) + yc * np.cos(angle) + 0.5


def _render_realistic(patient: Patient, k: int, spec: CohortSpec) -> np.ndarray:
    """The realistic preset: the anatomy of the easy one, then site, view and lesion variation."""
    s = spec.image_size
    site = site_of(patient) or SITES[0]
    prng = np.random.default_rng([spec.seed, 1, patient.index, 7])
    irng = np.random.default_rng([spec.seed, 2, patient.index, k, int(spec.shift * 1000), 7])
    xr, yr = _pose(irng, s, angle_sd=3.0, shift_sd=0.02)
    ap = patient.view_position == "AP"

    torso_w = prng.uniform(0.34, 0.48)
    img = np.full((s, s), 0.06, np.float32)
    torso = ((xr - 0.5) / torso_w) ** 2 + ((yr - 0.62) / 0.62) ** 2 < 1
    img[torso] = prng.uniform(0.46, 0.56)
    lung_w, lung_h = prng.uniform(0.12, 0.18), prng.uniform(0.23, 0.32)
    lung_y = prng.uniform(0.45, 0.53)
    lung_level = prng.uniform(0.17, 0.25) + (0.04 if ap else 0.0)  # AP: scatter, less air contrast
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * prng.uniform(0.15, 0.2)
        lung = ((xr - cx) / lung_w) ** 2 + ((yr - lung_y) / lung_h) ** 2 < 1
        lungs.append((lung, cx))
        img[lung] = lung_level
    heart_w = prng.uniform(0.1, 0.15) * (1.18 if ap else 1.0)  # AP magnifies the heart
    _mediastinum_and_ribs(img, xr, yr, torso, lungs, heart_w, prng)
    texture = _smooth_noise(irng, s, scale=max(2, s // 24))

    mimic = prng.random()
    if patient.label == CLASSES[1]:  # lesions from faint to obvious; a few occult on the radiograph
        if mimic >= OCCULT_SHARE:
            img = _consolidation(img, xr, yr, lungs, lung_w, lung_h, lung_y, prng, irng, texture)
    elif mimic < MIMIC_SHARE:  # the same opacity with another cause (atelectasis, oedema, a scar)
        img = _consolidation(img, xr, yr, lungs, lung_w, lung_h, lung_y, prng, irng, texture)
    elif mimic < MIMIC_SHARE + 0.25:  # benign look-alikes: a small nodule or a plate-like streak
        lung, cx = lungs[int(prng.integers(0, 2))]
        bx, by = cx + prng.uniform(-0.4, 0.4) * lung_w, lung_y + prng.uniform(-0.3, 0.5) * lung_h
        if prng.random() < 0.5:
            r = prng.uniform(0.015, 0.03)
            img = img + lung * np.exp(-(((xr - bx) ** 2 + (yr - by) ** 2) / (2 * r**2))) * prng.uniform(0.08, 0.18)
        else:
            streak = np.exp(-((yr - by - 0.3 * (xr - bx)) ** 2) / (2 * 0.006**2)) * (np.abs(xr - bx) < 0.08)
            img = img + lung * streak * prng.uniform(0.06, 0.14)

    img = _acquire_at(img, irng, spec.shift, site)
    _stamp(img, site.marker_corner, s, value=0.95)  # laterality marker
    if has_portable_marker(patient, k, spec):
        h, w = max(2, s // 40), max(6, s // 6)
        img[s // 20:s // 20 + h, s // 2 - w // 2:s // 2 + w // 2] = 0.9
    return img


def _consolidation(img: np.ndarray, xr: np.ndarray, yr: np.ndarray, lungs: list[tuple[np.ndarray, float]],
                   lung_w: float, lung_h: float, lung_y: float, prng: np.random.Generator, irng: np.random.Generator,
                   texture: np.ndarray) -> np.ndarray:
    """One to three patchy opacities in the lung fields, from faint to obvious (the realistic preset)."""
    strength = 0.15 + 0.3 * prng.beta(1.5, 1.5)
    for _ in range(int(prng.integers(1, 4))):
        lung, cx = lungs[int(prng.integers(0, 2))]
        bx = cx + prng.uniform(-0.5, 0.5) * lung_w + irng.normal(0, 0.01)
        by = lung_y + prng.uniform(-0.2, 0.6) * lung_h + irng.normal(0, 0.01)
        r = prng.uniform(0.03, 0.09)
        blob = np.exp(-(((xr - bx) ** 2 + (yr - by) ** 2) / (2 * r**2)))
        img = img + lung * blob * strength * (0.6 + 0.8 * texture)
    return img


def _acquire_at(img: np.ndarray, rng: np.random.Generator, shift: float, site: Site) -> np.ndarray:
    """A site's acquisition: blur, exposure, gamma, noise, collimation; ``shift`` as in :func:`_acquire`."""
    s = img.shape[0]
    low = max(8, int(s * (1 - 0.5 * site.blur)))
    blurred = np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize((low, low), Image.Resampling.BILINEAR)
        .resize((s, s), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    gain = rng.normal(site.gain, 0.06) * (1 + 0.35 * shift)
    gamma = rng.normal(site.gamma, 0.07) * (1 - 0.25 * min(shift, 2))
    offset = rng.normal(0, 0.025) + 0.08 * shift
    out = np.clip(blurred * gain + offset, 0, 1) ** max(gamma, 0.2)
    out = out + rng.normal(0, site.noise + 0.02 * shift, size=out.shape).astype(np.float32)
    border = int(round(s * site.collimation * rng.uniform(0.6, 1.4)))
    if border:
        out[:border, :] *= 0.15
        out[-border:, :] *= 0.15
        out[:, :border] *= 0.15
        out[:, -border:] *= 0.15
    return np.clip(out, 0, 1).astype(np.float32)


def _stamp(img: np.ndarray, corner: int, s: int, value: float) -> None:
    size, pad = max(3, s // 18), max(2, s // 16)
    y = pad if corner in (0, 1) else s - pad - size
    x = pad if corner in (0, 2) else s - pad - size
    img[y:y + size, x:x + size // 3 + 1] = value  # an "L"-like glyph
    img[y + size - max(1, size // 4):y + size, x:x + size] = value


def _add_opacities(img, xr, yr, lungs, lung_w, lung_h, lung_y, prng, irng, s) -> np.ndarray:
    n_blobs = int(prng.integers(1, 4))
    texture = _smooth_noise(irng, s, scale=max(2, s // 24))
    for _ in range(n_blobs):
        lung, cx = lungs[int(prng.integers(0, 2))]
        bx = cx + prng.uniform(-0.5, 0.5) * lung_w + irng.normal(0, 0.01)
        by = lung_y + prng.uniform(-0.2, 0.6) * lung_h + irng.normal(0, 0.01)
        r = prng.uniform(0.05, 0.09)
        blob = np.exp(-(((xr - bx) ** 2 + (yr - by) ** 2) / (2 * r**2)))
        img = img + lung * blob * (0.22 + 0.2 * texture) * prng.uniform(0.7, 1.2)
    return img


def _smooth_noise(rng: np.random.Generator, s: int, scale: int) -> np.ndarray:
    coarse = rng.random((s // scale + 2, s // scale + 2)).astype(np.float32)
    im = Image.fromarray(coarse, mode="F").resize((s, s), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(im, dtype=np.float32), 0, 1)


def _acquire(img: np.ndarray, rng: np.random.Generator, shift: float) -> np.ndarray:
    """Blur, exposure, gamma and noise of one acquisition; ``shift`` moves them off-distribution."""
    s = img.shape[0]
    blurred = np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize((s // 2, s // 2), Image.Resampling.BILINEAR)
        .resize((s, s), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    gain = rng.normal(1.0, 0.05) * (1 + 0.35 * shift)
    gamma = rng.normal(1.0, 0.06) * (1 - 0.25 * min(shift, 2))
    offset = rng.normal(0, 0.02) + 0.08 * shift
    out = np.clip(blurred * gain + offset, 0, 1) ** max(gamma, 0.2)
    out = out + rng.normal(0, 0.012 + 0.02 * shift, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def to_pixels(img01: np.ndarray, bit_depth: int) -> np.ndarray:
    top = (1 << bit_depth) - 1
    return np.round(img01 * top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def generate_cohort(root: Path, spec: CohortSpec) -> dict[str, int]:
    """Write the cohort under ``root`` (replacing what was there); returns counts.

    Writing is deterministic in ``spec``: the same spec gives byte-identical files.
    """
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "cohort.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == _spec_json(spec):
        logger.info("synthetic cohort under %s is up to date", root)
        return dict(json.loads(marker.read_text())["counts"])
    for old in root.glob("*/*.png"):
        old.unlink()
    rows: list[dict[str, object]] = []
    patients = plan_patients(spec)
    for p in patients:
        for k in range(p.n_images):
            rel = f"{p.label}/{p.patient_id}_{k:02d}.png"
            save_png(to_pixels(render_image(p, k, spec), spec.bit_depth), root / rel)
            rows.append({"file": rel, "patient_id": p.patient_id, "label": p.label,
                         "view_position": p.view_position, "sex": p.sex, "age": p.age,
                         "site": p.site, "manufacturer": p.manufacturer})
    bad = _write_bad_files(root, spec, rows) if spec.bad_files else []
    with open(root / "patients.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "patient_id", "label", "view_position", "sex", "age",
                                                "site", "manufacturer"])
        writer.writeheader()
        writer.writerows(r for r in rows if r.get("file"))
    counts = {"patients": len(patients), "images": len(rows) - len(bad), "bad_files": len(bad)}
    marker.write_text(json.dumps({"spec": _spec_json(spec), "counts": counts, "bad_kinds": bad}, indent=2))
    logger.info("synthetic cohort: %d patients, %d images, %d bad files", *counts.values())
    return counts


GENERATOR_VERSION = 3  # bump whenever rendering changes, so cached cohorts are regenerated


def _spec_json(spec: CohortSpec) -> dict[str, object]:
    return {**json.loads(json.dumps(spec.__dict__)), "generator_version": GENERATOR_VERSION}


def _write_bad_files(root: Path, spec: CohortSpec, rows: list[dict[str, object]]) -> list[str]:
    """Add ``spec.bad_files`` deliberately bad inputs, cycling through :data:`BAD_KINDS`."""
    kinds = [BAD_KINDS[i % len(BAD_KINDS)] for i in range(spec.bad_files)]
    rng = np.random.default_rng([spec.seed, 3])
    for i, kind in enumerate(kinds):
        donor = rows[i % len(rows)]
        label = str(donor["label"])
        rel = f"{label}/BAD{i:03d}_{kind}.png"
        path = root / rel
        row = {**donor, "file": rel, "patient_id": f"MRNBAD{i:04d}"}
        if kind == "empty_file":
            path.write_bytes(b"")
        elif kind == "truncated":
            data = (root / str(donor["file"])).read_bytes()
            path.write_bytes(data[: len(data) // 3])
        elif kind == "not_an_image":
            path.write_text("this is a radiology report, not an image\n")
        elif kind == "too_small":
            save_png(np.full((12, 12), 128, np.uint8), path)
        elif kind == "decompression_bomb":
            path.write_bytes(_png_bomb(40000, 40000))
        elif kind == "colour_image":
            px = (rng.random((spec.image_size, spec.image_size, 3)) * 255).astype(np.uint8)
            Image.fromarray(px, mode="RGB").save(path, format="PNG")
        elif kind == "duplicate_image":
            path.write_bytes((root / str(donor["file"])).read_bytes())
        elif kind == "conflicting_labels":
            path.write_bytes((root / str(donor["file"])).read_bytes())
            row["label"] = CLASSES[0] if label == CLASSES[1] else CLASSES[1]
        elif kind == "missing_label":
            save_png(to_pixels(np.full((spec.image_size,) * 2, 0.4, np.float32), 8), path)
            row["label"] = ""
        rows.append(row)
    return kinds


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
