"""The PACS inference flow: one stable study → champion → SR back in the study (+ FHIR), as a Prefect run.

A thin wrapper of :func:`pipeline.pacs.process.process_study`. The PACS client, the served model and the
production-log writer are built once per process and reused by every run in it (:func:`context`): the listener
(``xrayops pacs listen`` with ``pacs.dispatch: flow``) runs this flow in its own process once per stable study, and
loading the model for each study would cost seconds. The flow ends ``Completed`` for every outcome that is an answer
(an SR, no frontal image, a gate refusal) and ``Failed`` only for a transient one (PACS unreachable, no verified
model) so the Prefect UI shows what needs a retry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from pipeline.config import Settings, load_settings, with_overrides
from pipeline.pacs.process import PacsContext, PacsOutcome, pacs_client, process_study

_CONTEXTS: dict[tuple[str | None, tuple[str, ...], str | None], PacsContext] = {}
_LOCK = threading.Lock()


def context(settings: Settings, url: str | None, key: tuple[str | None, tuple[str, ...], str | None]) -> PacsContext:
    """The process-wide context for these settings and PACS URL (built, and the model loaded, on first use)."""
    with _LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            ctx = PacsContext(settings, pacs_client(settings, url))
            _CONTEXTS[key] = ctx
    ctx.refresh()  # the alias may have moved since the last study: verify and load the new version
    return ctx


@task(name="process-study", cache_policy=NO_CACHE)
def process_study_task(ctx: PacsContext, study_uid: str) -> PacsOutcome:
    outcome = process_study(ctx, study_uid)
    get_run_logger().info("%s", outcome.line())  # de-identified: the salted study reference only
    return outcome


@flow(name="xrayops-pacs-inference", log_prints=False, validate_parameters=True)
def pacs_inference_flow(study_uid: str, url: str | None = None, params_path: str | None = None,
                        overrides: list[str] | None = None) -> Any:
    """Process one study of the PACS at ``url`` (default ``data.dicomweb.url``) with the served champion.

    Args:
        study_uid: StudyInstanceUID of a stable study (it is never logged; the run logs its salted reference).
        url: DICOMweb root of the PACS.
        params_path: params.yaml (empty = the project's).
        overrides: section.field=value strings.
    """
    settings = with_overrides(load_settings(params_path), list(overrides or []))
    ctx = context(settings, url, (params_path, tuple(overrides or []), url))
    outcome = process_study_task(ctx, study_uid)
    if outcome.transient:
        return Failed(message=outcome.line(), data=outcome)
    return Completed(message=outcome.line(), data=outcome)


def run_flow(study_uid: str, url: str | None, params_path: str | None, overrides: list[str]) -> PacsOutcome:
    """Run the flow in this process and return its outcome (a Failed run's too: it is a transient outcome)."""
    state = pacs_inference_flow(study_uid, url, params_path, overrides, return_state=True)
    return state.result(raise_on_failure=False)


@dataclass(frozen=True)
class Submitted:
    """A deployment run started for a study (the worker that runs it records the outcome)."""

    study_ref: str
    flow_run: str
    status: str = "submitted"
    transient: bool = False

    def line(self) -> str:
        return f"study {self.study_ref}: flow run {self.flow_run} submitted"


def submit_deployment_run(settings: Settings, study_uid: str, url: str | None, params_path: str | None,
                          overrides: list[str]) -> Submitted:
    """Start a run of ``pacs.deployment`` for the study and return at once (``timeout=0``)."""
    from prefect.deployments import run_deployment

    from pipeline.data.deid import load_salt
    from pipeline.errors import ConfigError
    from pipeline.pacs.process import study_ref

    if not settings.pacs.deployment:
        raise ConfigError("pacs.dispatch is 'deployment' but pacs.deployment is not set",
                          hint="--set pacs.deployment=xrayops-pacs-inference/<deployment>, or pacs.dispatch=flow")
    run = run_deployment(settings.pacs.deployment, timeout=0, parameters={
        "study_uid": study_uid, "url": url, "params_path": params_path, "overrides": overrides})
    return Submitted(study_ref(study_uid, load_salt(settings.data.ingest.salt_env, settings.home)), str(run.name))
