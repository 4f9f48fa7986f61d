"""Patient-level split: no patient on two sides, stratified, seeded, certified; leakage is caught."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pipeline.config import Settings, with_overrides
from pipeline.split import LeakageError, near_duplicate_pairs, run_split, split_by_patient, verify_certificate

pytestmark = pytest.mark.data


def test_no_patient_in_two_splits_and_certificate_holds(cohort: Settings) -> None:
    cert = run_split(cohort)
    table = pd.read_parquet(cohort.dataset_dir / "split.parquet")
    assert cert["patient_overlap"] == 0
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert set(table["split"]) == {"train", "val", "test"}
    assert sum(cert["images"].values()) == len(table)
    verify_certificate(cohort.dataset_dir)


def test_split_is_stratified_and_seeded(cohort: Settings) -> None:
    a = run_split(cohort)
    b = run_split(cohort)
    c = run_split(with_overrides(cohort, ["base.seed=7"]))
    assert a["patient_set_sha256"] == b["patient_set_sha256"] != c["patient_set_sha256"]
    for name in ("train", "val", "test"):
        assert 0.1 < a["prevalence"][name] < 0.7


def test_image_level_split_is_detected_as_leakage(cohort: Settings) -> None:
    run_split(cohort)
    path = cohort.dataset_dir / "split.parquet"
    table = pd.read_parquet(path)
    # an image-level split: shuffle the split labels across images
    table["split"] = table["split"].sample(frac=1.0, random_state=0).to_numpy()
    table.to_parquet(path, index=False)
    with pytest.raises(LeakageError, match="more than one split|changed after certification"):
        verify_certificate(cohort.dataset_dir)


def test_tampered_certificate_is_rejected(cohort: Settings) -> None:
    run_split(cohort)
    path = cohort.dataset_dir / "split_certificate.json"
    cert = json.loads(path.read_text())
    cert["patient_overlap"] = 0
    cert["images"]["train"] += 1
    path.write_text(json.dumps(cert))
    with pytest.raises(LeakageError, match="modified"):
        verify_certificate(cohort.dataset_dir)


def test_grouping_keeps_linked_patients_together() -> None:
    manifest = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(40)],
        "patient_id": [f"p{k // 2}" for k in range(40)],
        "label": ["PNEUMONIA" if k % 6 < 2 else "NORMAL" for k in range(40)],
    })
    groups = {f"p{k}": f"p{k - k % 4}" for k in range(20)}  # patients linked in fours
    split = split_by_patient(manifest, (0.6, 0.2, 0.2), 0, "PNEUMONIA", groups)
    by_group = manifest.assign(split=split, g=manifest["patient_id"].map(groups)).groupby("g")["split"].nunique()
    assert by_group.max() == 1


def test_near_duplicates_under_two_patients_stay_on_one_side(cohort: Settings) -> None:
    raw = cohort.raw_dir
    rows = pd.read_csv(raw / "patients.csv")
    # copy 6 images to new patients after a tiny change (re-encoded with one pixel altered)
    import numpy as np
    from PIL import Image

    extra = []
    for k, r in rows.head(6).iterrows():
        img = np.asarray(Image.open(raw / r["file"])).copy()
        img[0, 0] ^= 1
        name = f"{r['label']}/ALIAS{k}_00.png"
        Image.fromarray(img).save(raw / name)
        extra.append({**r.to_dict(), "file": name, "patient_id": f"ALIAS{k}"})
    pd.concat([rows, pd.DataFrame(extra)]).to_csv(raw / "patients.csv", index=False)
    from pipeline.ingest import run_ingest

    run_ingest(cohort, show_progress=False)
    cert = run_split(cohort)
    assert cert["near_duplicate_pairs_found"] >= 6
    assert cert["near_duplicates_across_splits"] == []
    report = run_split(with_overrides(cohort, ["split.near_duplicate_action=report"]))
    assert report["near_duplicate_pairs_found"] == cert["near_duplicate_pairs_found"]
    shutil.rmtree(cohort.dataset_dir / "validation", ignore_errors=True)


def test_near_duplicate_search_matches_brute_force() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(60, 32), dtype=np.uint8)
    noisy = base.copy()
    noisy[:, 0] ^= 1  # one bit off
    hashes = [row.tobytes().hex() for row in np.concatenate([base, noisy])]
    fast = {(a, b) for a, b, _ in near_duplicate_pairs(hashes, 3)}
    arr = np.concatenate([base, noisy])
    brute = {(i, j) for i in range(len(arr)) for j in range(i + 1, len(arr))
             if np.unpackbits(arr[i] ^ arr[j]).sum() <= 3}
    assert fast == brute and len(brute) >= 60
