"""Deployments of the xrayops flows on a Prefect server: a work pool, cron schedules, UI triggers.

``xrayops deploy`` calls :func:`deploy_all`:

- creates the work pool ``orchestrate.work_pool`` (type ``process``) when it is missing;
- applies one deployment per flow found in the project (``xrayops-training/training``,
  ``xrayops-monitoring/monitoring``, ``xrayops-feedback/feedback``; see :mod:`flows`), with the
  flow code taken from the project folder
  (``flow.from_source(<project dir>, "flows/<module>.py:<flow>")``: a process worker runs
  it from that folder, no image is built);
- schedules: training ``orchestrate.training_cron`` (weekly), monitoring
  ``orchestrate.monitoring_cron`` (daily), both in ``orchestrate.timezone``; the
  feedback flow, when present, is deployed without a schedule (manual/automation trigger);
  so is the PACS inference flow (``xrayops-pacs-inference/pacs``), which ``xrayops pacs listen`` runs once per
  study with ``pacs.dispatch: deployment`` and ``pacs.deployment`` set to that name.
- a concurrency limit per deployment, ``orchestrate.concurrency_limit`` (default 1): a run that
  would exceed it waits in the queue until one ends (two trainings never write the same
  dataset, checkpoints and registry at once);
- the global concurrency limit ``promote.registry_write_limit`` (limit 1), when set and missing:
  the lock every writer of a shared registry takes around alias moves (:mod:`flows.registry_lock`).

The training flow is always deployed; monitoring and feedback are deployed when
``flows/monitoring.py`` / ``flows/feedback.py`` exist and define a flow. Schedules only
fire on a real server (``prefect server start``), never on the temporary one.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import FEEDBACK_DEPLOYMENT, MONITORING_DEPLOYMENT, PACS_DEPLOYMENT, TRAINING_DEPLOYMENT
from pipeline.config import Settings
from pipeline.errors import ConfigError, DeployError

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOL_TYPE = "process"
TAGS = ["xrayops"]


@dataclass(frozen=True)
class FlowSpec:
    """One deployable flow: where it lives and which schedule it gets."""

    module: str                      # flows.training
    attributes: tuple[str, ...]      # candidate names of the flow object, in order
    deployment: str                  # <flow name>/<deployment name>
    cron: Callable[[Settings], str | None]
    required: bool = False

    @property
    def path(self) -> str:
        return self.module.replace(".", "/") + ".py"

    @property
    def flow_name(self) -> str:
        return self.deployment.split("/")[0]

    @property
    def deployment_name(self) -> str:
        return self.deployment.split("/")[1]


SPECS = (
    FlowSpec("flows.training", ("training_flow",), TRAINING_DEPLOYMENT, lambda s: s.orchestrate.training_cron, True),
    FlowSpec("flows.monitoring", ("monitoring_flow", "drift_flow", "monitor_flow"), MONITORING_DEPLOYMENT,
             lambda s: s.orchestrate.monitoring_cron),
    FlowSpec("flows.feedback", ("feedback_flow",), FEEDBACK_DEPLOYMENT, lambda s: None),
    FlowSpec("flows.pacs", ("pacs_inference_flow",), PACS_DEPLOYMENT, lambda s: None),
)


@dataclass(frozen=True)
class Deployed:
    """What was applied (printed by the CLI, checked by tests)."""

    name: str                        # <flow name>/<deployment name>
    entrypoint: str
    cron: str | None
    timezone: str | None
    deployment_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "entrypoint": self.entrypoint, "cron": self.cron, "timezone": self.timezone,
                "id": self.deployment_id}


def find_flow(spec: FlowSpec, project_dir: Path) -> tuple[str, Any] | None:
    """(attribute, flow object) of ``spec`` in the project, or None when the module is absent."""
    from prefect import Flow

    if not (project_dir / spec.path).is_file():
        if spec.required:
            raise DeployError(f"{project_dir / spec.path} not found: run `xrayops deploy` from the project folder "
                              "or pass --project-dir")
        return None
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        if spec.required:
            raise
        logger.warning("skipping %s: cannot import it (%s)", spec.module, exc)
        return None
    for attr in spec.attributes:
        if isinstance(getattr(module, attr, None), Flow):
            return attr, getattr(module, attr)
    defined_here = [(name, obj) for name, obj in vars(module).items()
                    if isinstance(obj, Flow) and getattr(obj.fn, "__module__", None) == spec.module]
    named = [(name, obj) for name, obj in defined_here if obj.name == spec.flow_name]
    if named or defined_here:
        return (named or defined_here)[0]
    logger.warning("skipping %s: it defines no flow", spec.module)
    return None


def check_schedule(cron: str, timezone: str, setting: str) -> None:
    """Validate a cron string and timezone now, with the setting to fix, rather than at deploy time."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"orchestrate.{setting}={cron!r} with orchestrate.timezone={timezone!r} is not a valid "
                          f"schedule ({msg}). Use a 5-field cron string and an IANA timezone, e.g. '0 2 * * 1', "
                          "'Europe/Paris'.") from None


async def ensure_registry_write_limit(settings: Settings) -> bool:
    """Create the global concurrency limit ``promote.registry_write_limit`` (limit 1) when it is set and
    missing; True if created. An existing limit is left as it is (an operator may have tuned it)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    name = settings.promote.registry_write_limit
    if not name:
        return False
    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    logger.info("created global concurrency limit %s (limit 1) for registry alias moves", name)
    return True


async def ensure_work_pool(name: str, pool_type: str = POOL_TYPE) -> bool:
    """Create the work pool when missing (with the worker type's default job template); True if created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            template = await get_default_base_job_template_for_infrastructure_type(pool_type)
            await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template or {}))
            logger.info("created work pool %s (type %s)", name, pool_type)
            return True
    if pool.type != pool_type:
        logger.warning("work pool %s has type %s, not %s: deployments still go there", name, pool.type, pool_type)
    return False


def concurrency_limit(settings: Settings) -> Any:
    """``orchestrate.concurrency_limit`` as Prefect's deployment limit: runs beyond it wait in the queue
    (``ENQUEUE``), none is dropped; None = no limit."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    limit = settings.orchestrate.concurrency_limit
    if limit is None:
        return None
    return ConcurrencyLimitConfig(limit=limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build_deployment(spec: FlowSpec, attr: str, settings: Settings, *, project_dir: Path,
                     job_variables: dict[str, Any], paused: bool) -> Any:
    """The deployment of one flow (a ``RunnerDeployment``, nothing sent to a server yet), with the flow code
    loaded from ``project_dir``, its schedule and its concurrency limit."""
    from prefect import Flow
    from prefect.schedules import Cron

    cron = spec.cron(settings)
    schedules = [Cron(cron, timezone=settings.orchestrate.timezone)] if cron else []
    remote = Flow.from_source(source=str(project_dir), entrypoint=f"{spec.path}:{attr}")
    deployment = remote.to_deployment(
        name=spec.deployment_name, schedules=schedules, paused=paused, job_variables=job_variables, tags=TAGS,
        description=(remote.description or "").strip() or None, concurrency_limit=concurrency_limit(settings),
    )
    return with_form(deployment, spec, settings)


def with_form(deployment: Any, spec: FlowSpec, settings: Settings) -> Any:
    """Apply the flow module's ``deployment_form(settings, schema)``, when it has one: the parameters every
    run of the deployment gets (scheduled ones included) and the schema of its UI form (defaults shown)."""
    from prefect.utilities.callables import ParameterSchema

    form = getattr(importlib.import_module(spec.module), "deployment_form", None)
    if form is None:
        return deployment
    parameters, schema = form(settings, deployment._parameter_openapi_schema.model_dump(exclude_unset=True))
    deployment.parameters = parameters
    deployment._parameter_openapi_schema = ParameterSchema(**schema)
    return deployment


def deploy_flow(spec: FlowSpec, attr: str, settings: Settings, *, project_dir: Path, pool: str,
                job_variables: dict[str, Any], paused: bool) -> Deployed:
    """Apply one deployment (see :func:`build_deployment`) to the work pool ``pool``."""
    from prefect import deploy

    deployment = build_deployment(spec, attr, settings, project_dir=project_dir, job_variables=job_variables,
                                  paused=paused)
    ids = deploy(deployment, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                 ignore_warnings=True)
    cron = spec.cron(settings)
    tz = settings.orchestrate.timezone
    name = f"{deployment.flow_name}/{spec.deployment_name}"
    logger.info("deployment %s → pool %s, schedule %s, at most %s run(s) at a time", name, pool, cron or "none",
                settings.orchestrate.concurrency_limit or "unlimited")
    return Deployed(name, f"{spec.path}:{attr}", cron, tz if cron else None, str(ids[0]))


def deploy_all(settings: Settings, *, project_dir: Path | None = None, pool: str | None = None,
               params_file: Path | None = None, paused: bool = False) -> list[Deployed]:
    """Create the work pool if needed and apply every deployment found in the project.

    Args:
        params_file: when given, runs of these deployments read this params.yaml (set as
            ``XRAYOPS_PARAMS`` in the deployment's job variables); otherwise the worker's
            ``$XRAYOPS_PARAMS`` or the project folder's params.yaml.
        paused: apply the schedules paused (resume them in the UI or with `prefect deployment resume`).

    Raises:
        DeployError: no Prefect server is configured, or the project holds no training flow.
    """
    import os

    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError("PREFECT_API_URL is not set: deployments and schedules need a Prefect server. Start one "
                          "(`prefect server start`, or `docker compose up prefect` in infra/) and export "
                          "PREFECT_API_URL=http://<host>:4200/api")
    project_dir = (project_dir or PROJECT_DIR).resolve()
    pool = pool or settings.orchestrate.work_pool
    tz = settings.orchestrate.timezone
    check_schedule(settings.orchestrate.training_cron, tz, "training_cron")
    check_schedule(settings.orchestrate.monitoring_cron, tz, "monitoring_cron")
    asyncio.run(ensure_work_pool(pool))
    asyncio.run(ensure_registry_write_limit(settings))
    job_variables = {"env": {"XRAYOPS_PARAMS": str(params_file.resolve())}} if params_file else {}
    deployed = []
    for spec in SPECS:
        found = find_flow(spec, project_dir)
        if found:
            deployed.append(deploy_flow(spec, found[0], settings, project_dir=project_dir, pool=pool,
                                        job_variables=job_variables, paused=paused))
    return deployed
