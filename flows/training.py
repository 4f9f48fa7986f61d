"""The training flow: data → validate → split → train → evaluate → register → promote (→ monitor).

Tasks are thin: each calls one library stage function and logs. Parameters are a
pydantic model so the Prefect UI renders them as a form; anything else can be set
with ``overrides`` (``section.field=value``, validated like ``--set``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.json_schema import SkipJsonSchema

from flows.caching import (
    ingest_cache_key,
    ingest_intact,
    ingest_key,
    validate_cache_key,
    validate_intact,
    validate_key,
    write_stamp,
)
from flows.options import io_options
from flows.registry_lock import registry_write_lock
from pipeline.config import Settings, load_settings, with_overrides, with_values
from pipeline.data.sources import SOURCES
from pipeline.training.models import list_models

# The form's drop-downs: the valid names, generated from the source registry and the model zoo. Literal
# types give the JSON schema a plain ``enum`` of strings (values stay str: nothing to import or unpickle).
SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)
MODEL_NAMES: tuple[str, ...] = tuple(sorted(spec.name for spec in list_models()))
SourceName = Literal[SOURCE_NAMES]  # type: ignore[valid-type]
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
SIMULATED_DRIFT_ARTIFACT = "simulated-drift-report"
Unset = SkipJsonSchema[None]  # accepted from code and the CLI (= params.yaml), left out of the form's schema

# Form fields whose default, in a deployment's form, is the value of this setting at `xrayops deploy`.
FORM_SETTINGS: dict[str, str] = {"source": "data.source", "input": "data.input", "rev": "data.rev",
                                 "model": "train.model", "epochs": "train.epochs",
                                 "require_approval": "promote.require_approval"}


def _no_null_defaults(schema: dict[str, Any]) -> None:
    """Drop ``"default": null`` from the fields' schema: unset is not a value of the field's type."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class TrainingParameters(BaseModel):
    """What a person can change when starting a training run. Blank fields take their value from params.yaml."""

    # A field left unset (None) is read from params.yaml when the run starts. The JSON schema shows each field
    # with its own type only (no "or null" switch in the UI); a deployment's form shows the params.yaml values
    # as defaults (deployment_form).
    model_config = ConfigDict(json_schema_extra=_no_null_defaults)

    source: SourceName | Unset = Field(None, title="Dataset source",
                                       description="Where the images come from (data.source).")
    input: str | Unset = Field(None, title="Dataset folder",
                               description="Raw dataset folder (data.input). Empty = params.yaml.")
    rev: str | Unset = Field(None, title="Dataset version (git rev/tag)",
                             description="Read the dataset at this DVC/git revision. Empty = the workspace.")
    model: ModelName | Unset = Field(None, title="Model",
                                     description="Zoo model to train (train.model; `xrayops model list`).")
    epochs: Annotated[int, Field(ge=1)] | Unset = Field(None, title="Epochs", description="Training epochs.")
    require_approval: bool | Unset = Field(None, title="Require human approval",
                                           description="Pause for a reviewer before moving the champion alias.")
    simulate_production: bool = Field(False, title="Simulate production traffic and drift report",
                                      description="Score a shifted batch against the champion and write an "
                                                  "Evidently drift report (a demo; off for scheduled runs).")
    overrides: list[str] = Field(default_factory=list, title="Other settings",
                                 description="section.field=value strings, e.g. train.batch_size=16.")
    params_path: str | Unset = Field(None, title="params.yaml path",
                                     description="Empty = the worker's $XRAYOPS_PARAMS or the project's params.yaml.")

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset fields are left out (not null) wherever the parameters are written as JSON: the schema's
        default, a run's stored parameters. A null would not validate against the field's schema."""
        return {k: v for k, v in handler(self).items() if v is not None}

    def settings(self) -> Settings:
        """params.yaml, then the form fields as the typed values they are (a folder ``/data/cxr #2`` or rev
        ``1.10`` stays that string), then ``overrides`` (``section.field=value``, read as YAML like ``--set``).
        An empty text field counts as unset (a form's blank input)."""
        typed = {setting: getattr(self, name) for name, setting in FORM_SETTINGS.items()}
        typed = with_values(load_settings(self.params_path or None),
                            {k: v for k, v in typed.items() if v is not None and v != ""})
        return with_overrides(typed, self.overrides)


def form_defaults(settings: Settings) -> dict[str, Any]:
    """The form fields' values in ``settings`` (None where the setting is unset), for a deployment's form."""
    values: dict[str, Any] = {}
    for name, setting in FORM_SETTINGS.items():
        section, field = setting.split(".")
        values[name] = getattr(getattr(settings, section), field)
    return values


# --------------------------------------------------------------------------- tasks


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(settings: Settings) -> str:
    from pipeline.data.ingest import prepare_raw

    return str(prepare_raw(settings))


@task(name="version-data", cache_policy=NO_CACHE)  # retries/timeout from orchestrate.* (io_options)
def version_data(settings: Settings) -> Any:
    from pipeline.data.ingest import version_raw

    version = version_raw(settings)
    if version:
        get_run_logger().info("dataset version: md5=%s rev=%s", version.dvc_md5, version.rev)
    return version


@task(name="ingest", cache_key_fn=ingest_cache_key, persist_result=True, result_serializer="json")
def ingest(settings: Settings, version: Any) -> dict[str, Any]:
    """Cached on (DVC hash, data settings, code); see flows/caching.py."""
    from flows.scaleout import ingest_mapper
    from pipeline.data.ingest import run_ingest

    with ingest_mapper(settings) as mapper:
        kwargs = {"mapper": mapper} if mapper else {}
        summary = run_ingest(settings, version, show_progress=False, **kwargs)
    write_stamp(settings, "ingest", ingest_key(settings, version))
    get_run_logger().info("ingested %s of %s files (%s quarantined: %s; excluded by data.admission: %s)",
                          summary["ingested"], summary["files_seen"], summary["quarantined"],
                          summary["quarantine_reasons"], summary.get("excluded_by_policy", {}))
    return summary


@task(name="validate", cache_key_fn=validate_cache_key, persist_result=True, result_serializer="json")
def validate(settings: Settings, ingest_summary: dict[str, Any]) -> dict[str, Any]:
    """Cached on (manifest sha256, validate settings, code); see flows/caching.py."""
    from pipeline.data.validate import run_validation

    result = run_validation(settings)
    write_stamp(settings, "validate", validate_key(settings, ingest_summary))
    return result


@task(name="split", cache_policy=NO_CACHE)
def split(settings: Settings) -> dict[str, Any]:
    from pipeline.data.split import run_split

    return run_split(settings)


@task(name="train", cache_policy=NO_CACHE)
def train(settings: Settings, version: Any) -> Any:
    from pipeline.training.train import run_train

    return run_train(settings, version=version)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(settings: Settings, trained: Any) -> Any:
    from pipeline.evaluation.evaluate import run_evaluate
    from pipeline.job import log_reference_profile

    result = run_evaluate(settings, trained)
    log_reference_profile(settings, trained, result)
    return result


@task(name="register", cache_policy=NO_CACHE)  # retries/timeout from orchestrate.* (io_options)
def register(settings: Settings, trained: Any, evaluation: Any) -> Any:
    """Registry version + SavedModel/ONNX export (parity-checked) + model card."""
    from pipeline.registry.contract import card_path
    from pipeline.registry.write import register_version

    mv = register_version(settings, trained, evaluation)
    card = card_path(settings, str(mv.version))
    if card.is_file():
        create_markdown_artifact(card.read_text(), key="model-card", description=f"Model card v{mv.version}")
    return mv


@task(name="gate-and-promote", cache_policy=NO_CACHE)
def gate_and_promote(settings: Settings, version: Any, evaluation: Any, trained: Any) -> Any:
    """Gate the registered version, record the decision and move ``champion`` when the gate passed (after
    a reviewer's approval in the UI when required), under the registry lock (+ ``promote.registry_write_limit``):
    :func:`pipeline.registry.promote.promote_challenger`, the one promotion path. Each decision (a re-gate
    too, when the champion changed meanwhile) is published as the ``promotion-gate`` artifact."""
    from flows.approval import request_approval
    from pipeline.registry.promote import promote_challenger

    def publish(decision: Any) -> None:
        create_markdown_artifact(decision.to_markdown(), key="promotion-gate", description="Promotion gate decision")

    result = promote_challenger(settings, trained, evaluation, registered=version, approval=request_approval,
                                lock=registry_write_lock(settings), on_decision=publish)
    if not result.decision.promote:
        get_run_logger().warning("challenger v%s not promoted: %s", version.version, result.decision.reason)
    return result


@task(name="simulate-and-monitor", cache_policy=NO_CACHE)
def simulate_and_monitor(settings: Settings) -> dict[str, Any]:
    """Simulated traffic + drift report, published as the ``simulated-drift-report`` artifact (its own key:
    the monitoring flow's ``drift-report`` history stays real traffic only)."""
    from pipeline.job import simulate_and_report
    from pipeline.monitoring.drift import summary_markdown as drift_markdown

    drift = simulate_and_report(settings)
    if drift.get("status") not in (None, "no_champion", "no_model"):
        create_markdown_artifact(drift_markdown(drift) + "\n_Simulated traffic (a demo), not production._\n",
                                 key=SIMULATED_DRIFT_ARTIFACT,
                                 description=f"Drift on simulated traffic, {drift.get('model_name')} "
                                             f"v{drift.get('model_version')}")
    return drift


def data_stages(settings: Settings) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """prepare → version (DVC) → ingest → validate; ingest/validate reuse cached results when the
    dataset and settings are unchanged and their outputs are still on disk."""
    prepare_data(settings)
    version = version_data.with_options(**io_options(settings))(settings)
    summary = ingest.with_options(refresh_cache=not ingest_intact(settings, version))(settings, version)
    summary = {**summary, "dvc": version.to_dict() if version else None}  # this run's git rev, even on a hit
    validation = validate.with_options(refresh_cache=not validate_intact(settings, summary))(settings, summary)
    return version, summary, validation


# --------------------------------------------------------------------------- flow


@flow(name="xrayops-training", log_prints=True)
def training_flow(params: TrainingParameters = TrainingParameters()) -> dict[str, Any]:  # noqa: B008
    """Train, evaluate, register and (through the gate) promote a model; optionally report drift."""
    from pipeline.job import run_summary

    params = params or TrainingParameters()
    started = datetime.now(UTC)
    settings = params.settings()
    registry_write_lock(settings)  # a shared registry without promote.registry_write_limit: refused before training
    logger = get_run_logger()
    logger.info("dataset %s (source %s), model %s", settings.dataset_name, settings.data.source,
                settings.train.model)
    version, ingest_summary, validation = data_stages(settings)
    certificate = split(settings)
    trained = train(settings, version)
    evaluation = evaluate(settings, trained)
    mv = register.with_options(**io_options(settings))(settings, trained, evaluation)  # retried: MLflow I/O
    promoted = gate_and_promote(settings, mv, evaluation, trained)
    decision, promotion = promoted.decision, promoted.promotion
    drift = simulate_and_monitor(settings) if (params.simulate_production and settings.monitor.simulate_rows) else None
    summary = run_summary(settings, started=started, ingest=ingest_summary, validation=validation,
                          certificate=certificate, trained=trained, evaluation=evaluation, version=mv,
                          decision=decision, promotion=promotion, drift=drift)
    create_markdown_artifact(summary_markdown(summary), key="training-summary", description="Training run summary")
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    reg, m = summary["registry"], summary["metrics"]
    lines = [f"## xrayops training run — {summary['data']['dataset']}",
             f"- data version: DVC `{summary['data']['dvc_md5']}` (rev `{summary['data']['dvc_rev']}`)",
             f"- model: `{summary['train']['model']}`, MLflow run `{summary['train']['run_id']}`",
             f"- registry: `{reg['model_name']}` v{reg['version']} aliases {reg['aliases']}",
             f"- gate: {'pass' if reg['gate']['promote'] else 'fail'} — {reg['gate']['reason']}",
             "- metrics: " + ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, float)),
             f"- drift report: {summary['reports'].get('drift_html')}"]
    from flows.links import summary_links

    links = summary_links(summary)
    return "\n".join(lines + (["", "### Links", *links] if links else [])) + "\n"


def run(params: TrainingParameters, summary_path: Path | None = None) -> dict[str, Any]:
    """Run the flow in this process (temporary Prefect server unless PREFECT_API_URL is set)."""
    import json

    summary = training_flow(params)
    if summary_path:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


def deployment_form(settings: Settings, schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training deployment's parameters and its form (called by ``xrayops deploy``).

    Scheduled runs get ``simulate_production: false`` and nothing else: the other fields stay unset, so each
    run reads them from params.yaml when it starts. The form ("Custom run" in the UI) shows the params.yaml
    values of ``settings`` as its defaults; a person sees what will run and may change it.

    Returns:
        (deployment parameters, parameter schema with the form defaults)
    """
    import copy

    parameters = {"params": {"simulate_production": False}}
    schema = copy.deepcopy(schema)
    defaults = {k: v for k, v in form_defaults(settings).items() if v is not None}
    fields = schema["definitions"]["TrainingParameters"]["properties"]
    for name in FORM_SETTINGS:
        fields[name].pop("default", None)
        if name in defaults:
            fields[name]["default"] = defaults[name]
    fields["params_path"].pop("default", None)
    schema["properties"]["params"]["default"] = {**defaults, "simulate_production": False, "overrides": []}
    return parameters, schema
