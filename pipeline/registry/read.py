"""Reading the registry: aliases, versions, their records, gate decisions and models.

Nothing here writes to MLflow. A version or artifact that should exist and does not is a
:class:`~pipeline.errors.RegistryError` naming it; "never gated" and "no such alias" are
legitimate states and read as None. Only "not found" means absent: any other registry error
(a 5xx, a timeout, a locked SQLite database) is a :class:`~pipeline.errors.RegistryUnavailable`,
never "no champion" — a gate that took it for "no champion" would apply the absolute floors
only and let a worse model replace the champion.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.errors import RegistryError, RegistryUnavailable
from pipeline.registry.contract import (
    EVALUATION_ARTIFACT,
    VersionRecord,
    decision_artifact,
    model_uri,
    run_uri,
)
from pipeline.tracking import configure_mlflow, mlflow_client

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def registry_failure(settings: Settings, what: str, exc: Exception, *,
                     outcome: str = "nothing was concluded from it and no alias was moved",
                     hint: str | None = None) -> RegistryUnavailable:
    """The error for a registry call that failed with anything but "not found"."""
    code = getattr(exc, "error_code", None) or type(exc).__name__
    return RegistryUnavailable(
        f"the model registry at {mask_uri(settings.registry_uri)} failed to {what} ({code}: {str(exc)[:200]}); "
        f"{outcome}",
        hint=hint or "retry when the registry answers again (`xrayops registry show` checks it); a locked SQLite "
                     "database means another process is writing to it")


def get_alias(settings: Settings, alias: str) -> Any | None:
    """The version holding ``alias``, or None when the alias or the registered model does not exist
    (a read: MLflow's process-wide URIs are left alone).

    Raises:
        RegistryUnavailable: the registry answered with another error; absence cannot be concluded.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    name = settings.registered_model
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == NOT_FOUND:  # no such registered model
            return None
        # a missing alias of an existing model is INVALID_PARAMETER_VALUE ("alias ... not found"), which
        # also covers real errors: it counts as absent only when the model's alias list confirms it
        if exc.error_code == "INVALID_PARAMETER_VALUE" and alias not in aliases(settings, client=client):
            return None
        raise registry_failure(settings, f"read alias {alias!r} of {name}", exc) from exc


def get_version(settings: Settings, version: Any) -> Any:
    """The ``ModelVersion`` numbered ``version`` of the registered model.

    Raises:
        RegistryError: there is no such version.
        RegistryUnavailable: the registry answered with another error.
    """
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        return client.get_model_version(settings.registered_model, str(version))
    except MlflowException as exc:
        if exc.error_code not in (NOT_FOUND, "INVALID_PARAMETER_VALUE"):  # a bad version number is the latter
            raise registry_failure(settings, f"read {settings.registered_model} v{version}", exc) from exc
        raise RegistryError(f"{settings.registered_model} has no version {version} ({exc.error_code}); "
                            "see `xrayops registry show`") from exc


def version_record(settings: Settings, version: Any) -> VersionRecord:
    """Everything recorded on a version, typed (see :class:`~pipeline.registry.contract.VersionRecord`)."""
    return VersionRecord.from_version(get_version(settings, version))


def aliases(settings: Settings, *, client: Any = None) -> dict[str, str]:
    """Alias → version of the registered model (empty when it does not exist).

    Raises:
        RegistryUnavailable: the registry answered with an error other than "not found".
    """
    from mlflow.exceptions import MlflowException

    client = client or configure_mlflow(settings)
    try:
        return {k: str(v) for k, v in client.get_registered_model(settings.registered_model).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == NOT_FOUND:
            return {}
        raise registry_failure(settings, f"read the aliases of {settings.registered_model}", exc) from exc


def overview(settings: Settings) -> list[dict[str, Any]]:
    """One row per version (newest first): aliases, metrics, threshold, gate, approval, exports."""
    client = configure_mlflow(settings)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(settings).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{settings.registered_model}'"):
        r = VersionRecord.from_version(mv)
        metric = r.lineage.test_metrics.get("auc") or r.lineage.test_metrics.get("accuracy")
        threshold = r.lineage.operating_threshold
        rows.append({"version": r.version, "aliases": sorted(by_version.get(r.version, [])),
                     "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                     "model": r.lineage.model_arch, "auc": metric.text() if metric else None,
                     "threshold": f"{threshold:.6f}" if threshold is not None else None,
                     "gate": r.gate.verdict if r.gate else "-", "failed": r.gate.failed_text if r.gate else "-",
                     "approval": r.approval.status if r.approval else "-",
                     "gradcam": r.lineage.gradcam_sanity or "-", "onnx": r.export.onnx or "-",
                     "rolled_back": r.rollback.at if r.rollback else ""})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def artifact_exists(settings: Settings, run_id: str, artifact: str) -> bool:
    """Whether the run has the artifact file ``artifact`` (a path relative to its artifact root)."""
    client = configure_mlflow(settings)
    parent = artifact.rpartition("/")[0] or None
    return any(a.path == artifact for a in client.list_artifacts(run_id, parent))


def load_run_json(settings: Settings, run_id: str, artifact: str) -> dict[str, Any]:
    """A JSON artifact of a run.

    Raises:
        RegistryError: the run has no such artifact.
    """
    import mlflow

    if not artifact_exists(settings, run_id, artifact):
        raise RegistryError(f"run {run_id} has no artifact {artifact}")
    return mlflow.artifacts.load_dict(run_uri(run_id, artifact))


def load_evaluation(settings: Settings, version: Any) -> dict[str, Any]:
    """The evaluation (metrics, CIs, operating point, slices, Grad-CAM) logged with the version's run.

    Raises:
        RegistryError: the run has no ``evaluation/metrics.json``.
    """
    return load_run_json(settings, version.run_id, EVALUATION_ARTIFACT)


def load_decision(settings: Settings, version: Any) -> dict[str, Any] | None:
    """The gate decision JSON of a version, or None when it was never gated.

    Raises:
        RegistryError: the version carries a gate verdict but its decision artifact is missing.
    """
    artifact = decision_artifact(version.version)
    if artifact_exists(settings, version.run_id, artifact):
        return load_run_json(settings, version.run_id, artifact)
    if VersionRecord.from_version(version).gate is None:
        return None
    raise RegistryError(f"{settings.registered_model} v{version.version} has a gate verdict but its run "
                        f"{version.run_id} has no {artifact}")


def load_version_model(settings: Settings, version: Any) -> Any:
    """Load the Keras model of a registry version."""
    import mlflow

    from pipeline.training.models.zoo import register_custom_objects

    register_custom_objects()
    configure_mlflow(settings)
    return mlflow.keras.load_model(model_uri(settings.registered_model, version.version))
