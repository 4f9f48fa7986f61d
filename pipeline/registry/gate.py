"""The promotion gate: may a challenger replace the champion?

Both models are scored on the *same* test images (the champion is re-scored, stored numbers
are not trusted). Criteria: (a) sensitivity at the locked threshold has its CI lower bound ≥
``promote.sensitivity_ci_floor`` and AUC ≥ ``promote.min_auc`` (multi-class: accuracy ≥
``promote.min_accuracy``); (b) ΔAUC (challenger − champion) from a paired patient-level
bootstrap has its lower bound > −``auc_margin`` (non-inferiority) and, with
``require_superiority``, > 0; (c) ECE ≤ ``max_ece``; (d) the split certificate verifies, shows
zero patient overlap, is the split the challenger was trained on and was written for the
current manifest; (e) data validation passed, on the current manifest; (f) optional, off by default:
subgroup floors and worst-subgroup non-inferiority (:func:`~pipeline.registry.decision.subgroup_criteria`;
the champion's per-group AUC comes from the same re-scoring). With no champion only
the absolute floors apply — never a rubber stamp; and "no champion" means the registry said
so: a registry that fails to answer stops the gate (:class:`~pipeline.errors.RegistryUnavailable`).

:func:`gate` = :func:`gather_evidence` (the I/O: champion lookup, re-scoring, certificate,
validation) + :func:`decide` (the pure decision on that evidence and ``settings.promote``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.data.manifest import manifest_sha256
from pipeline.data.split import manifest_mismatch, verify_certificate
from pipeline.data.validate import read_validation
from pipeline.errors import LeakageError
from pipeline.evaluation.evaluate import EvalResult, Scored, predict_proba
from pipeline.evaluation.metrics import binary_metrics, paired_delta_accuracy, paired_delta_auc
from pipeline.evaluation.subgroups import rows_of, subgroup_auc
from pipeline.registry.contract import CHAMPION, VersionTags
from pipeline.registry.decision import Criterion, DataChecks, Evidence, GateDecision, decide  # noqa: F401 (re-exported)
from pipeline.registry.read import get_alias, load_version_model
from pipeline.training.inputs import InputSpec, check_files, load_images

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- gathering (I/O)


def rescore(settings: Settings, version: Any, test: Scored, dataset_dir: Path) -> np.ndarray:
    """Score another registry version on the same test images."""
    size, channels, classes = VersionTags.from_version(version).input_shape(
        f"{settings.registered_model} v{version.version}")
    images = load_images(check_files(dataset_dir, test.frame["path"].tolist()), InputSpec(size, channels, len(classes)))
    return predict_proba(load_version_model(settings, version), images)


def gather_evidence(settings: Settings, challenger: Any, evaluation: EvalResult,
                    dataset_dir: Path | None = None) -> Evidence:
    """Look up the champion (if any, and not the challenger itself), re-score it on the challenger's test
    images, bootstrap the paired difference, and read the split certificate and data validation."""
    dataset_dir = dataset_dir or settings.dataset_dir
    ev = settings.evaluate
    champion = get_alias(settings, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        champion = None
    test = evaluation.test
    assert test is not None, "gate needs the evaluation's test scores"
    inputs: dict[str, Any] = {"test_images": int(len(test.y)),
                              "test_patients": int(test.frame["patient_id"].nunique()),
                              "bootstrap_resamples": ev.bootstrap_resamples, "ci_level": ev.ci_level}
    delta = None
    if champion is not None:
        delta = _versus_champion(settings, champion, evaluation, dataset_dir, inputs)
    trained_on = VersionTags.from_version(challenger).split_certificate
    data = data_checks(dataset_dir, trained_on)
    if data.problems:
        inputs["data_problems"] = list(data.problems)
    subgroups = rows_of(evaluation.subgroups, settings.promote.subgroup_by) if evaluation.subgroups else None
    return Evidence(evaluation.task, evaluation.metrics, evaluation.ci, data,
                    str(champion.version) if champion is not None else None, delta, inputs,
                    subgroups=subgroups, champion_subgroup_auc=inputs.get("champion_subgroup_auc"))


def gate(settings: Settings, challenger: Any, evaluation: EvalResult, dataset_dir: Path | None = None) -> GateDecision:
    """Decide whether ``challenger`` may become champion (see the module docstring)."""
    evidence = gather_evidence(settings, challenger, evaluation, dataset_dir)
    return decide(evidence, settings.promote, model=settings.registered_model,
                  challenger_version=str(challenger.version))


def _versus_champion(settings: Settings, champion: Any, evaluation: EvalResult, dataset_dir: Path,
                     inputs: dict[str, Any]) -> dict[str, Any]:
    """The paired bootstrap of the challenger against the re-scored champion (recorded in ``inputs``)."""
    ev = settings.evaluate
    test = evaluation.test
    assert test is not None
    p_champ = rescore(settings, champion, test, dataset_dir)
    patients = test.frame["patient_id"].to_numpy()
    boot = {"n_resamples": ev.bootstrap_resamples, "seed": settings.base.seed, "level": ev.ci_level}
    if evaluation.task == "binary":
        thr = VersionTags.from_version(champion).operating_threshold
        thr = 0.5 if thr is None else thr
        inputs["champion_rescored"] = {k: round(v, 4) for k, v in binary_metrics(test.y, p_champ, thr).items()
                                       if v == v}
        inputs["champion_subgroup_auc"] = subgroup_auc(test.frame, test.y, p_champ, settings.promote.subgroup_by,
                                                       ev.subgroup_min_patients)
        delta = paired_delta_auc(test.y, test.proba, p_champ, patients, **boot)
    else:
        delta = paired_delta_accuracy(test.y, test.proba, p_champ, patients, **boot)
    inputs["paired_bootstrap"] = delta
    return delta


def data_checks(dataset_dir: Path, trained_on: str | None) -> DataChecks:
    """(d) the split certificate verifies, shows zero patient overlap, is the one the model was trained on
    and describes the current ``manifest.parquet``; (e) data validation passed on the current manifest.
    A version that does not record its training split fails the match, and a certificate or validation
    result that does not record its manifest fails the manifest match (fail closed: what cannot be
    shown to describe the evaluated data does not pass)."""
    current = manifest_sha256(dataset_dir)
    try:
        cert = verify_certificate(dataset_dir, check_manifest=False)
        overlap, cert_ok, sha = cert["patient_overlap"], True, cert["certificate_sha256"]
        split_stale = manifest_mismatch(cert.get("manifest_sha256"), current, "split certificate")
    except (LeakageError, FileNotFoundError) as exc:
        overlap, cert_ok, sha, split_stale = None, False, None, str(exc)
    validation = read_validation(dataset_dir) or {}
    validation_stale = manifest_mismatch(validation.get("manifest_sha256"), current, "validation result")
    problems = tuple(p for p in (split_stale, validation_stale) if p)
    for problem in problems:
        logger.warning("gate data check: %s", problem)
    return DataChecks(certificate_ok=cert_ok, patient_overlap=overlap,
                      split_matches=trained_on is not None and trained_on == sha,
                      validation_ok=bool(validation) and not validation.get("critical_failures"),
                      split_manifest_ok=cert_ok and split_stale is None,
                      validation_manifest_ok=bool(validation) and validation_stale is None, problems=problems)
