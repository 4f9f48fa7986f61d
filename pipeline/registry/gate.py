"""The promotion gate: may a challenger replace the champion?

Both models are scored on the *same* test images (the champion is re-scored, stored numbers
are not trusted). Criteria: (a) sensitivity at the locked threshold has its CI lower bound ≥
``promote.sensitivity_ci_floor`` and AUC ≥ ``promote.min_auc`` (multi-class: accuracy ≥
``promote.min_accuracy``); (b) ΔAUC (challenger − champion) from a paired patient-level
bootstrap has its lower bound > −``auc_margin`` (non-inferiority) and, with
``require_superiority``, > 0; (c) ECE ≤ ``max_ece``; (d) the split certificate verifies, shows
zero patient overlap and is the split the challenger was trained on; (e) data validation
passed. With no champion only the absolute floors apply — never a rubber stamp.

:func:`gate` = :func:`gather_evidence` (the I/O: champion lookup, re-scoring, certificate,
validation) + :func:`decide` (the pure decision on that evidence and ``settings.promote``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.data.split import verify_certificate
from pipeline.data.validate import read_validation
from pipeline.errors import LeakageError
from pipeline.evaluation.evaluate import EvalResult, Scored, predict_proba
from pipeline.evaluation.metrics import binary_metrics, paired_delta_accuracy, paired_delta_auc
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
    return Evidence(evaluation.task, evaluation.metrics, evaluation.ci, data_checks(dataset_dir, trained_on),
                    str(champion.version) if champion is not None else None, delta, inputs)


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
        delta = paired_delta_auc(test.y, test.proba, p_champ, patients, **boot)
    else:
        delta = paired_delta_accuracy(test.y, test.proba, p_champ, patients, **boot)
    inputs["paired_bootstrap"] = delta
    return delta


def data_checks(dataset_dir: Path, trained_on: str | None) -> DataChecks:
    """(d) the split certificate verifies, shows zero patient overlap and is the one the model was trained on;
    (e) data validation passed. A version that does not record its training split fails the match
    (fail closed: an unknown split cannot be shown to be the evaluated one)."""
    try:
        cert = verify_certificate(dataset_dir)
        overlap, cert_ok, sha = cert["patient_overlap"], True, cert["certificate_sha256"]
    except (LeakageError, FileNotFoundError):
        overlap, cert_ok, sha = None, False, None
    validation = read_validation(dataset_dir) or {}
    return DataChecks(certificate_ok=cert_ok, patient_overlap=overlap,
                      split_matches=trained_on is not None and trained_on == sha,
                      validation_ok=bool(validation) and not validation.get("critical_failures"))
