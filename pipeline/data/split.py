"""Stage ``split``: patient-level, stratified, seeded split with a checkable certificate.

Never by image: all images of a patient land in one split. Patients linked by
near-duplicate images (perceptual hash within ``split.near_duplicate_hamming`` bits —
often the same person under two ids) are kept together when
``near_duplicate_action=merge`` (default), dropped with ``drop``, or only listed with
``report``. Near-duplicate pairs are confirmed by intensity statistics, and a component
too large to be one person (more patients than the smallest held-out split) is reported,
not merged. Patients whose images are byte-identical (``patient_links.csv`` from ingest)
are always kept together. The certificate records counts, prevalence, a hash of each
split's patient set, and the overlaps (patients, identical bytes, near-duplicates) across
splits; :func:`verify_certificate` re-derives it before training and before promotion.

The certificate is bound to the manifest it split: ``manifest_sha256`` is the sha256 of the
``manifest.parquet`` file that was read (the value ingest records in ``ingest_summary.json``).
A re-ingest that changes the manifest (merged patients, new images, relabelled rows) makes
the old split stale, and verification fails until ``xrayops split`` runs again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.data.features import hamming_distance, hashes_to_bytes
from pipeline.data.manifest import MANIFEST_FILE, dataset_lock, read_links, read_manifest, read_summary
from pipeline.errors import LeakageError, SplitError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.parquet"
CERTIFICATE_FILE = "split_certificate.json"


# --------------------------------------------------------------------------- near-duplicates


def near_duplicate_pairs(phashes: list[str], max_distance: int) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, distance)`` of images whose pHashes differ in ≤ ``max_distance`` bits.

    Multi-index hashing: the hash bytes are cut into ``max_distance + 1`` bands; by the
    pigeonhole principle two hashes within the distance agree on at least one band, so
    only hashes sharing a band are compared (near-linear instead of quadratic).
    """
    values = hashes_to_bytes(list(phashes))
    n_bytes = values.shape[1]
    n_bands = min(max_distance + 1, n_bytes)
    edges = np.linspace(0, n_bytes, n_bands + 1).astype(int)
    found: dict[tuple[int, int], int] = {}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, row in enumerate(values[:, lo:hi]):
            buckets[row.tobytes()].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            idx = np.array(members)
            dist = hamming_distance(values[idx][:, None, :], values[idx][None, :, :])
            for i, j in zip(*np.nonzero(np.triu(dist <= max_distance, k=1)), strict=True):
                found[(int(idx[i]), int(idx[j]))] = int(dist[i, j])
    return sorted((a, b, d) for (a, b), d in found.items())


class _UnionFind:
    def __init__(self, items: list[str]) -> None:
        self.parent = {x: x for x in items}

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# --------------------------------------------------------------------------- split


def split_by_patient(manifest: pd.DataFrame, fractions: tuple[float, float, float], seed: int,
                     positive: str | None, groups: dict[str, str] | None = None) -> pd.Series:
    """Assign each image to train/val/test so that no patient (or group) spans two splits.

    Stratified on the group's label (binary: any positive image; multi-class: its most
    common label) with scikit-learn's ``train_test_split`` applied to groups.

    Returns:
        split name per manifest row (same index).
    """
    from sklearn.model_selection import train_test_split

    group_of = manifest["patient_id"].map(groups) if groups else manifest["patient_id"]
    glabels = _group_labels(manifest.assign(_group=group_of), positive)
    ids = np.array(sorted(glabels.index))
    if len(ids) < len(SPLITS):
        raise SplitError(f"cannot split {len(ids)} patient group(s) into train/val/test: each split needs at least "
                         "one patient. Ingest more patients (patients linked by identical or near-duplicate "
                         "images count as one group).")
    strata = glabels.loc[ids].to_numpy()
    f_train, f_val, f_test = fractions

    def cut(items: np.ndarray, strat: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
        n_holdout = max(1, round(len(items) * size))
        use_strata = _can_stratify(strat, n_holdout, len(items))
        if not use_strata:
            logger.warning("too few patients per class to stratify %d/%d; splitting unstratified",
                           n_holdout, len(items))
        return train_test_split(items, test_size=n_holdout, random_state=seed,
                                stratify=strat if use_strata else None)

    rest, test = cut(ids, strata, f_test)
    rest_strata = glabels.loc[rest].to_numpy()
    train, val = cut(rest, rest_strata, f_val / (f_train + f_val))
    assignment = {g: "train" for g in train} | {g: "val" for g in val} | {g: "test" for g in test}
    return group_of.map(assignment)


def _can_stratify(strata: np.ndarray, n_holdout: int, n: int) -> bool:
    _, counts = np.unique(strata, return_counts=True)
    return bool(counts.min() >= 2 and n_holdout >= len(counts) and n - n_holdout >= len(counts))


def _group_labels(df: pd.DataFrame, positive: str | None) -> pd.Series:
    if positive is not None:
        return df.groupby("_group")["label"].agg(lambda s: positive if (s == positive).any() else "other")
    return df.groupby("_group")["label"].agg(lambda s: s.value_counts().index[0])


# --------------------------------------------------------------------------- stage


def run_split(settings: Settings, dataset_dir: Path | None = None) -> dict[str, Any]:
    """Split the manifest by patient; writes ``split.parquet`` and ``split_certificate.json``.

    Raises:
        SplitError: fewer than three patient groups (one per split) after grouping.
    """
    dataset_dir = dataset_dir or settings.dataset_dir
    with dataset_lock(settings, dataset_dir):  # overlapping runs take turns (pipeline.locking)
        return _split_locked(settings, dataset_dir)


def _split_locked(settings: Settings, dataset_dir: Path) -> dict[str, Any]:
    manifest, manifest_sha = read_bound_manifest(dataset_dir)
    manifest = manifest.reset_index(drop=True)
    summary = read_summary(dataset_dir)
    positive = summary.get("positive_class")
    cfg = settings.split
    cross_patient = confirmed_near_duplicates(manifest, cfg.near_duplicate_hamming)
    grouping = group_patients(manifest, read_links(dataset_dir),
                              cross_patient if cfg.near_duplicate_action == "merge" else [],
                              max_group=_max_near_duplicate_group(manifest, cfg.fractions))
    split = split_by_patient(manifest, cfg.fractions, settings.base.seed, positive, grouping.groups or None)
    table = pd.DataFrame({"image_id": manifest["image_id"], "patient_id": manifest["patient_id"], "split": split})
    dropped: list[str] = []
    if cfg.near_duplicate_action == "drop":
        dropped = _drop_cross_split(table, cross_patient)
        table = table[~table["image_id"].isin(dropped)]
    table = table.sort_values(["split", "image_id"]).reset_index(drop=True)
    table.to_parquet(dataset_dir / SPLIT_FILE, index=False)
    cert = build_certificate(manifest, table, positive, settings, cross_patient, grouping, dropped, manifest_sha)
    (dataset_dir / CERTIFICATE_FILE).write_text(json.dumps(cert, indent=2, sort_keys=True))
    logger.info("split %s patients: %s; patient overlap %d; near-duplicates across splits %d",
                cert["patients_total"], cert["patients"], cert["patient_overlap"],
                len(cert["near_duplicates_across_splits"]))
    return cert


# Near-duplicate pairs must also agree on mean and std of intensity (0-1 scale) within this,
# and near-uniform images (std below BLANK_STD) take no part: their pHash carries no signal.
NEAR_DUPLICATE_STAT_TOLERANCE = 0.05
BLANK_STD = 0.01


def confirmed_near_duplicates(manifest: pd.DataFrame, max_distance: int) -> list[tuple[int, int, int]]:
    """Near-duplicate pairs ``(i, j, distance)`` across two patients, confirmed by intensity statistics.

    A pHash keeps only low frequencies, so unrelated images that share a layout (e.g. one
    gradient at two exposures) can collide; a pair counts only when mean and std agree too.
    """
    pairs = near_duplicate_pairs(manifest["phash"].tolist(), max_distance)
    patient = manifest["patient_id"].to_numpy()
    mean = manifest["mean"].to_numpy(dtype=float) if "mean" in manifest else None
    std = manifest["std"].to_numpy(dtype=float) if "std" in manifest else None
    out = []
    for a, b, d in pairs:
        if patient[a] == patient[b]:
            continue
        if mean is not None and std is not None and (
                min(std[a], std[b]) < BLANK_STD or abs(mean[a] - mean[b]) > NEAR_DUPLICATE_STAT_TOLERANCE
                or abs(std[a] - std[b]) > NEAR_DUPLICATE_STAT_TOLERANCE):
            continue
        out.append((a, b, d))
    return out


@dataclass
class Grouping:
    """Patients kept together: ``groups`` maps patient → group representative."""

    groups: dict[str, str] = field(default_factory=dict)
    linked_pairs: int = 0
    merged_groups: int = 0
    too_large: list[int] = field(default_factory=list)  # patient counts of components left unmerged


def group_patients(manifest: pd.DataFrame, links: list[tuple[str, str]], pairs: list[tuple[int, int, int]],
                   max_group: int) -> Grouping:
    """Union patients that share identical bytes (always) and near-duplicates (components ≤ ``max_group``).

    A near-duplicate component spanning more patients than ``max_group`` is not one person
    (the hash does not discriminate these images): it is left unmerged and reported.
    """
    patients = sorted(manifest["patient_id"].unique())
    known = set(patients)
    uf = _UnionFind(patients)
    used_links = [(a, b) for a, b in links if a in known and b in known]
    for a, b in used_links:
        uf.union(a, b)
    near = _UnionFind(patients)
    pid = manifest["patient_id"].to_numpy()
    for a, b, _ in pairs:
        near.union(uf.find(pid[a]), uf.find(pid[b]))
    members: dict[str, set[str]] = defaultdict(set)
    for p in patients:
        members[near.find(uf.find(p))].add(p)
    too_large = []
    for component in members.values():
        if len(component) > max_group:
            too_large.append(len(component))
            continue
        first = min(component)
        for p in component:
            uf.union(first, p)
    groups = {p: uf.find(p) for p in patients}
    sizes = pd.Series(list(groups.values())).value_counts()
    if too_large:
        logger.warning("%d near-duplicate component(s) spanning %s patients left unmerged (limit %d)",
                       len(too_large), sorted(too_large), max_group)
    return Grouping(groups if len(sizes) < len(patients) else {}, len(used_links), int((sizes > 1).sum()),
                    sorted(too_large))


def _max_near_duplicate_group(manifest: pd.DataFrame, fractions: tuple[float, float, float]) -> int:
    """Largest near-duplicate component merged: the smallest held-out split's share of patients,
    but at least 4 (one image under a handful of ids is a plausible data error in any dataset)."""
    return max(4, int(min(fractions[1], fractions[2]) * manifest["patient_id"].nunique()))


def _drop_cross_split(table: pd.DataFrame, pairs: list[tuple[int, int, int]]) -> list[str]:
    """Drop the held-out member of every near-duplicate pair that crosses splits."""
    rank = {"train": 0, "val": 1, "test": 2}
    dropped = set()
    for a, b, _ in pairs:
        sa, sb = table.at[a, "split"], table.at[b, "split"]
        if sa != sb:
            dropped.add(table.at[a if rank[sa] > rank[sb] else b, "image_id"])
    return sorted(dropped)


def build_certificate(manifest: pd.DataFrame, table: pd.DataFrame, positive: str | None, settings: Settings,
                      pairs: list[tuple[int, int, int]], grouping: Grouping,
                      dropped: list[str], manifest_sha256: str) -> dict[str, Any]:
    """Counts, prevalence, patient-set hashes and cross-split overlaps of a split table, bound to the
    manifest file (``manifest_sha256``: the sha256 of the ``manifest.parquet`` that was split)."""
    labels = manifest.set_index("image_id")["label"]
    sha = manifest.set_index("image_id")["sha256"]
    split_of = table.set_index("image_id")["split"]
    patients = {s: set(table.loc[table["split"] == s, "patient_id"]) for s in SPLITS}
    overlap = sum(len(patients[a] & patients[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:])
    by_sha: dict[str, set[str]] = defaultdict(set)
    for image_id, split_name in split_of.items():
        by_sha[sha[image_id]].add(split_name)
    exact = sorted(h for h, s in by_sha.items() if len(s) > 1)
    near = []
    for a, b, d in pairs:
        ia, ib = manifest.at[a, "image_id"], manifest.at[b, "image_id"]
        if ia in split_of.index and ib in split_of.index and split_of[ia] != split_of[ib]:
            near.append({"image_a": ia, "image_b": ib, "distance": d, "splits": [split_of[ia], split_of[ib]]})
    cert: dict[str, Any] = {
        "method": "patient-grouped stratified (sklearn train_test_split on patient groups)",
        "seed": settings.base.seed,
        "fractions": list(settings.split.fractions),
        "images": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "patients": {s: len(patients[s]) for s in SPLITS},
        "patients_total": int(table["patient_id"].nunique()),
        "prevalence": _prevalence(table, labels, positive),
        "patient_set_sha256": {s: _set_hash(patients[s]) for s in SPLITS},
        "patient_overlap": int(overlap),
        "exact_duplicates_across_splits": exact,
        "near_duplicate_hamming": settings.split.near_duplicate_hamming,
        "near_duplicate_action": settings.split.near_duplicate_action,
        "near_duplicate_pairs_found": len(pairs),
        "near_duplicate_groups_merged": grouping.merged_groups,
        "near_duplicate_components_not_merged": grouping.too_large,
        "duplicate_patient_links": grouping.linked_pairs,
        "near_duplicates_across_splits": near,
        "dropped_near_duplicates": dropped,
        "manifest_sha256": manifest_sha256,
        "manifest_content_sha256": _manifest_hash(manifest),
        "split_table_sha256": _frame_hash(table),
    }
    cert["certificate_sha256"] = _dict_hash(cert)
    return cert


def _manifest_hash(manifest: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(manifest[["image_id", "patient_id", "label"]],
                                                     index=False).values.tobytes()).hexdigest()


def _prevalence(table: pd.DataFrame, labels: pd.Series, positive: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in SPLITS:
        lab = labels.loc[table.loc[table["split"] == s, "image_id"]]
        if positive is not None:
            out[s] = round(float((lab == positive).mean()), 4) if len(lab) else None
        else:
            out[s] = {k: int(v) for k, v in lab.value_counts().sort_index().items()}
    return out


def _set_hash(items: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()


def _frame_hash(df: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()


def _dict_hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- verification


def read_bound_manifest(dataset_dir: Path) -> tuple[pd.DataFrame, str]:
    """The manifest and the sha256 of the very bytes it was read from (one read: a concurrent
    re-ingest cannot slip between hashing and parsing)."""
    path = dataset_dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return read_manifest(dataset_dir), ""  # raises the error that names the fix
    return pd.read_parquet(io.BytesIO(data)), hashlib.sha256(data).hexdigest()


def manifest_mismatch(recorded: str | None, current: str | None, what: str) -> str | None:
    """Why ``what`` (recorded for the manifest ``recorded``) does not describe the manifest ``current``."""
    if current is None:
        return "there is no manifest.parquet (run `xrayops ingest`)"
    if not recorded:
        return f"the {what} does not record which manifest it describes (written before manifest binding)"
    if recorded != current:
        return (f"the manifest changed after the {what} was written (manifest.parquet sha256 {current[:12]}…, "
                f"{what} {recorded[:12]}…; re-ingested?)")
    return None


def read_split(dataset_dir: Path) -> pd.DataFrame:
    path = dataset_dir / SPLIT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `xrayops split {dataset_dir}` first")
    return pd.read_parquet(path)


def read_certificate(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / CERTIFICATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `xrayops split {dataset_dir}` first")
    return json.loads(path.read_text())


def verify_certificate(dataset_dir: Path, *, check_manifest: bool = True) -> dict[str, Any]:
    """Re-derive the split's guarantees from the files on disk.

    Args:
        check_manifest: also require that the certificate describes the current ``manifest.parquet``
            (the promotion gate checks that as a criterion of its own and passes False).

    Raises:
        LeakageError: patients in two splits, a split table that changed after certification,
            a certificate edited by hand, or a manifest that no longer matches the split.
    """
    cert = read_certificate(dataset_dir)
    table = read_split(dataset_dir)
    manifest, current_sha = read_bound_manifest(dataset_dir)
    body = {k: v for k, v in cert.items() if k != "certificate_sha256"}
    problems = []
    if _dict_hash(body) != cert.get("certificate_sha256"):
        problems.append("the certificate was modified after it was written")
    if _frame_hash(table) != cert["split_table_sha256"]:
        problems.append("split.parquet changed after certification")
    per_split = table.groupby("split")["patient_id"].apply(set).to_dict()
    overlap = sum(len(per_split.get(a, set()) & per_split.get(b, set()))
                  for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:])
    if overlap or cert["patient_overlap"]:
        problems.append(f"{overlap} patient(s) appear in more than one split")
    if not set(table["image_id"]).issubset(set(manifest["image_id"])):
        problems.append("the split lists images that are not in the manifest (re-run `xrayops split`)")
    stale = manifest_mismatch(cert.get("manifest_sha256"), current_sha, "split certificate") if check_manifest else None
    if stale:
        problems.append(f"{stale}: re-run `xrayops split`")
    if problems:
        raise LeakageError(f"split certificate of {dataset_dir} does not hold: " + "; ".join(problems))
    return cert
