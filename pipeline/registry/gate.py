"""The promotion gate: may a challenger replace the champion?

Both models are scored on the *same* test images (the champion is re-scored, stored numbers
are not trusted). Criteria: (a) sensitivity at the locked threshold has its CI lower bound ≥
``promote.sensitivity_ci_floor`` and AUC ≥ ``promote.min_auc`` (multi-class: accuracy ≥
``promote.min_accuracy``); (b) ΔAUC (challenger − champion) from a paired patient-level
bootstrap has its lower bound > −``auc_margin`` (non-inferiority) and, with
``require_superiority``, > 0; (c) ECE ≤ ``max_ece``; (d) the split certificate verifies, shows
zero patient overlap and is the split the challenger was trained on; (e) data validation
passed. With no champion only the absolute floors apply — never a rubber stamp.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.evaluation.evaluate import EvalResult, Scored, predict_proba
from pipeline.training.inputs import InputSpec, check_files, load_images
from pipeline.evaluation.metrics import binary_metrics, paired_delta_auc, patient_weights
from pipeline.registry.versions import CHAMPION, get_alias, load_version_model
from pipeline.data.split import LeakageError, verify_certificate
from pipeline.data.validate import read_validation

logger = logging.getLogger(__name__)


@dataclass
class Criterion:
    name: str
    value: float | int | bool | None
    threshold: str
    passed: bool


@dataclass
class GateDecision:
    """The promotion decision, as stored on the version and logged as JSON."""

    model: str
    challenger_version: str
    champion_version: str | None
    criteria: list[Criterion]
    promote: bool
    reason: str
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.criteria if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {c.name} | {c.value} | {c.threshold} | {'✅' if c.passed else '❌'} |"
                         for c in self.criteria)
        verdict = "**PROMOTE**" if self.promote else "**KEEP CHAMPION**"
        return (f"### Promotion gate: {self.model} v{self.challenger_version} → {verdict}\n\n"
                f"Champion compared: {self.champion_version or 'none (absolute floors only)'}\n\n"
                f"| criterion | value | threshold | pass |\n|---|---|---|---|\n{rows}\n\n{self.reason}\n")



def rescore(settings: Settings, version: Any, test: Scored, dataset_dir: Path) -> np.ndarray:
    """Score another registry version on the same test images."""
    ispec = InputSpec(int(version.tags["input_size"]), int(version.tags["input_channels"]),
                      len(json.loads(version.tags["classes"])))
    images = load_images(check_files(dataset_dir, test.frame["path"].tolist()), ispec)
    return predict_proba(load_version_model(settings, version), images)


# --------------------------------------------------------------------------- gate


def gate(settings: Settings, challenger: Any, evaluation: EvalResult, dataset_dir: Path | None = None) -> GateDecision:
    """Decide whether ``challenger`` may become champion (see the module docstring)."""
    dataset_dir = dataset_dir or settings.dataset_dir
    cfg, ev = settings.promote, settings.evaluate
    champion = get_alias(settings, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        champion = None
    test = evaluation.test
    assert test is not None, "gate needs the evaluation's test scores"
    criteria: list[Criterion] = []
    inputs: dict[str, Any] = {"test_images": int(len(test.y)),
                              "test_patients": int(test.frame["patient_id"].nunique()),
                              "bootstrap_resamples": ev.bootstrap_resamples, "ci_level": ev.ci_level}
    m, ci = evaluation.metrics, evaluation.ci
    if evaluation.task == "binary":
        criteria.append(Criterion("auc_floor", m["auc"], f">= {cfg.min_auc}", _ge(m["auc"], cfg.min_auc)))
        sens_lo = ci["sensitivity"][0]
        criteria.append(Criterion("sensitivity_ci_low", sens_lo, f">= {cfg.sensitivity_ci_floor}",
                                  _ge(sens_lo, cfg.sensitivity_ci_floor)))
        criteria.append(Criterion("ece", m["ece"], f"<= {cfg.max_ece}",
                                  m["ece"] is not None and m["ece"] <= cfg.max_ece))
    else:
        criteria.append(Criterion("accuracy_floor", m["accuracy"], f">= {cfg.min_accuracy}",
                                  _ge(m["accuracy"], cfg.min_accuracy)))
    if champion is not None:
        criteria += _versus_champion(settings, champion, evaluation, dataset_dir, inputs)
    criteria += _data_criteria(dataset_dir, challenger.tags.get("split_certificate"))
    promote = all(c.passed for c in criteria)
    failed = [c.name for c in criteria if not c.passed]
    reason = ("all criteria passed" if promote else f"failed: {', '.join(failed)}") + (
        "" if champion is not None else " (no champion: absolute floors only)")
    return GateDecision(settings.registered_model, str(challenger.version),
                        str(champion.version) if champion is not None else None, criteria, promote, reason,
                        inputs=inputs)


def _ge(value: Any, floor: float) -> bool:
    return value is not None and value == value and value >= floor


def _versus_champion(settings: Settings, champion: Any, evaluation: EvalResult, dataset_dir: Path,
                     inputs: dict[str, Any]) -> list[Criterion]:
    cfg, ev = settings.promote, settings.evaluate
    test = evaluation.test
    assert test is not None
    p_champ = rescore(settings, champion, test, dataset_dir)
    patients = test.frame["patient_id"].to_numpy()
    if evaluation.task == "binary":
        thr = float(champion.tags.get("operating_threshold", 0.5))
        inputs["champion_rescored"] = {k: round(v, 4) for k, v in binary_metrics(test.y, p_champ, thr).items()
                                       if v == v}
        delta = paired_delta_auc(test.y, test.proba, p_champ, patients, n_resamples=ev.bootstrap_resamples,
                                 seed=settings.base.seed, level=ev.ci_level)
        name = "delta_auc_ci_low"
    else:
        delta = _paired_delta_accuracy(test.y, test.proba, p_champ, patients, settings)
        name = "delta_accuracy_ci_low"
    inputs["paired_bootstrap"] = delta
    low = delta["ci"][0]
    out = [Criterion(f"{name} (non-inferiority)", round(low, 4), f"> -{cfg.auc_margin}", low > -cfg.auc_margin)]
    if cfg.require_superiority:
        out.append(Criterion(f"{name} (superiority)", round(low, 4), "> 0", low > 0))
    return out


def _paired_delta_accuracy(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, patients: np.ndarray,
                           settings: Settings) -> dict[str, Any]:
    ev = settings.evaluate
    hit_new = (p_new.argmax(1) == y).astype(float)
    hit_old = (p_old.argmax(1) == y).astype(float)
    w = patient_weights(patients, ev.bootstrap_resamples, settings.base.seed)
    deltas = (w @ (hit_new - hit_old)) / w.sum(axis=1)
    alpha = (1 - ev.ci_level) / 2
    return {"delta_accuracy": float(hit_new.mean() - hit_old.mean()),
            "ci": [float(np.quantile(deltas, alpha)), float(np.quantile(deltas, 1 - alpha))],
            "resamples": int(len(deltas))}


def _data_criteria(dataset_dir: Path, trained_on: str | None) -> list[Criterion]:
    """(d) the split certificate verifies, shows zero patient overlap and is the one the model was trained on;
    (e) data validation passed."""
    try:
        cert = verify_certificate(dataset_dir)
        overlap, cert_ok, sha = cert["patient_overlap"], True, cert["certificate_sha256"]
    except (LeakageError, FileNotFoundError):
        overlap, cert_ok, sha = None, False, None
    same = trained_on is None or trained_on == sha
    validation = read_validation(dataset_dir) or {}
    valid = bool(validation) and not validation.get("critical_failures")
    return [
        Criterion("split_patient_overlap", overlap, "== 0 (certificate verified)", cert_ok and overlap == 0),
        Criterion("split_certificate_match", same, "training split == evaluated split", cert_ok and same),
        Criterion("data_validation", valid, "passed", valid),
    ]
