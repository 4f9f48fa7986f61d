"""Stage ``register`` + ``promote``: MLflow registry versions, the promotion gate, alias moves.

Every evaluated model becomes a new version with lineage tags and alias ``challenger``.
The gate re-scores the current ``champion`` on the *same* test images (stored numbers
are not trusted) and promotes only when every criterion passes; with no champion only
the absolute floors apply. Alias moves are ordered so an interruption leaves them
consistent: ``previous-champion`` is set to the old champion *before* ``champion`` moves.
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
from pipeline.evaluate import EvalResult, Scored, predict_proba
from pipeline.inputs import InputSpec, check_files, load_images
from pipeline.metrics import binary_metrics, paired_delta_auc, patient_weights
from pipeline.split import LeakageError, verify_certificate
from pipeline.tracking import code_version, configure_mlflow
from pipeline.train import TrainResult
from pipeline.validate import read_validation

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


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


# --------------------------------------------------------------------------- registration


def register_version(settings: Settings, trained: TrainResult, evaluation: EvalResult) -> Any:
    """Create a registry version of the trained model with lineage tags and alias ``challenger``."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    name = settings.registered_model
    try:
        client.create_registered_model(name, description=f"xrayops models for dataset {settings.dataset_name}")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = version_tags(settings, trained, evaluation)
    mv = client.create_model_version(name, source=trained.model_uri, run_id=trained.run_id, tags=tags,
                                     description=describe(trained, evaluation))
    _wait_ready(client, name, mv.version)
    for key, value in export_tags(settings, trained, evaluation).items():
        client.set_model_version_tag(name, mv.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    logger.info("registered %s version %s (alias %s)", name, mv.version, CHALLENGER)
    return client.get_model_version(name, mv.version)


def _wait_ready(client: Any, name: str, version: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model version {name}/{version} still pending after {timeout:.0f}s")
        time.sleep(0.2)


def export_tags(settings: Settings, trained: TrainResult, evaluation: EvalResult, n_sample: int = 8) -> dict[str, str]:
    """Log SavedModel + ONNX exports to the training run; the parity result as version tags."""
    from pipeline.export import log_exports

    test = evaluation.test
    if trained.model is None or test is None or test.frame.empty:
        logger.warning("no in-memory model or test images: skipping export")
        return {"export_saved_model": "skipped"}
    paths = test.frame["path"].tolist()[:n_sample]
    sample = load_images(check_files(settings.dataset_dir, paths), InputSpec(**trained.input))
    return log_exports(trained.model, trained.run_id, sample, onnx=settings.promote.export_onnx)


def version_tags(settings: Settings, trained: TrainResult, evaluation: EvalResult) -> dict[str, str]:
    """Lineage and headline tags of a registry version (all strings, no patient data)."""
    tags = {
        **code_version(settings.root),
        "seed": str(settings.base.seed),
        "dataset": str(trained.dataset.get("name")),
        "dvc_md5": str(trained.dataset.get("dvc_md5")),
        "dvc_rev": str(trained.dataset.get("dvc_rev")),
        "split_certificate": str(trained.dataset.get("split_certificate")),
        "model_arch": trained.model_name,
        "input_size": str(trained.input["image_size"]),
        "input_channels": str(trained.input["channels"]),
        "classes": json.dumps(trained.classes),
        "positive_class": str(trained.positive_class),
        "task": evaluation.task,
    }
    if evaluation.operating_point:
        tags["operating_threshold"] = f"{evaluation.operating_point['threshold']:.6f}"
        tags["threshold_policy"] = evaluation.operating_point["policy"]
    for key in ("auc", "sensitivity", "specificity", "accuracy", "macro_f1", "ece"):
        if evaluation.metrics.get(key) is not None:
            lo, hi = evaluation.ci.get(key, [None, None])
            tags[f"test_{key}"] = f"{evaluation.metrics[key]:.4f} [{lo}, {hi}]"
    return tags


def describe(trained: TrainResult, evaluation: EvalResult) -> str:
    m, ci = evaluation.metrics, evaluation.ci
    parts = [f"{trained.model_name} on {trained.dataset.get('name')} (DVC {str(trained.dataset.get('dvc_md5'))[:12]})"]
    for key in ("auc", "sensitivity", "specificity", "accuracy"):
        if m.get(key) is not None and key in ci:
            parts.append(f"{key} {m[key]:.3f} (95% CI {ci[key][0]:.3f}-{ci[key][1]:.3f})")
    if evaluation.operating_point:
        parts.append(f"threshold {evaluation.operating_point['threshold']:.4f} ({evaluation.operating_point['policy']})")
    return "; ".join(parts)


# --------------------------------------------------------------------------- champion access


def get_alias(settings: Settings, alias: str) -> Any | None:
    """The version holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        return client.get_model_version_by_alias(settings.registered_model, alias)
    except MlflowException:
        return None


def load_version_model(settings: Settings, version: Any) -> Any:
    """Load the Keras model of a registry version."""
    import mlflow

    from pipeline.models.registry import register_custom_objects

    register_custom_objects()
    configure_mlflow(settings)
    return mlflow.keras.load_model(f"models:/{settings.registered_model}/{version.version}")


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
    criteria += _data_criteria(dataset_dir)
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


def _data_criteria(dataset_dir: Path) -> list[Criterion]:
    try:
        cert = verify_certificate(dataset_dir)
        overlap, cert_ok = cert["patient_overlap"], True
    except (LeakageError, FileNotFoundError):
        overlap, cert_ok = None, False
    validation = read_validation(dataset_dir) or {}
    valid = bool(validation) and not validation.get("critical_failures")
    return [
        Criterion("split_patient_overlap", overlap, "== 0 (certificate verified)", cert_ok and overlap == 0),
        Criterion("data_validation", valid, "passed", valid),
    ]


# --------------------------------------------------------------------------- promotion


def record_decision(settings: Settings, version: Any, decision: GateDecision, run_id: str) -> None:
    """Store the decision on the version (tags) and in its run (JSON artifact)."""
    import mlflow

    client = configure_mlflow(settings)
    name = settings.registered_model
    client.set_model_version_tag(name, version.version, "gate_verdict", "pass" if decision.promote else "fail")
    client.set_model_version_tag(name, version.version, "gate_failed", ",".join(decision.failed) or "none")
    client.set_model_version_tag(name, version.version, "gate_decided_at", decision.decided_at)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(decision.to_dict(), f"gate/decision-v{version.version}.json")


def move_champion(settings: Settings, version: str, *, reason: str) -> dict[str, str | None]:
    """Point ``champion`` at ``version``; the old champion becomes ``previous-champion``."""
    client = configure_mlflow(settings)
    name = settings.registered_model
    old = get_alias(settings, CHAMPION)
    if old is not None and old.version != version:
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion_since", datetime.now(UTC).isoformat(timespec="seconds"))
    client.set_model_version_tag(name, version, "champion_reason", reason[:250])
    logger.info("%s: champion → v%s (previous: %s)", name, version, old.version if old else None)
    return {"champion": version, PREVIOUS: old.version if old is not None and old.version != version else None}


def aliases(settings: Settings) -> dict[str, str]:
    """Alias → version of the registered model (empty when it does not exist)."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        return {k: str(v) for k, v in client.get_registered_model(settings.registered_model).aliases.items()}
    except MlflowException:
        return {}
