"""The PACS inference flow: one stable study → champion → SR back in the study (+ FHIR), as a Prefect run.

A thin wrapper of :func:`pipeline.pacs.process.process_study`. The PACS client, the served model and the
production-log writer are built once per process and reused by every run in it (:func:`context`): the listener
(``xrayops pacs listen`` with ``pacs.dispatch: flow``) runs this flow in its own process once per stable study, and
loading the model for each study would cost seconds. The flow ends ``Completed`` for every outcome that is an answer
(an SR, no frontal image, a gate refusal) and ``Failed`` for a transient one (PACS unreachable, no verified
model) so the Prefect UI shows what needs a retry, and for ``study_unknown`` (a run that cannot see the listener's
pending store: a misconfigured worker).

A run never gets a study UID: Prefect keeps run parameters in its database and shows them in its UI, outside our
de-identified stores. The dispatcher (:func:`run_flow`, :func:`submit_deployment_run`) keeps the UID in the 0600
pending store (:func:`pipeline.pacs.process.hand_over`) and passes the salted reference ``S…``; the run reads the
UID back there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows import PACS_FLOW
from pipeline.config import Settings, load_settings, with_overrides
from pipeline.pacs.process import STUDY_UNKNOWN, PacsContext, PacsOutcome, hand_over, pacs_client, process_study_ref

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
def process_study_task(ctx: PacsContext, study_ref: str) -> PacsOutcome:
    outcome = process_study_ref(ctx, study_ref)
    get_run_logger().info("%s", outcome.line())  # de-identified: the salted study reference only
    return outcome


@flow(name=PACS_FLOW, log_prints=False, validate_parameters=True)
def pacs_inference_flow(study_ref: str, url: str | None = None, params_path: str | None = None,
                        overrides: list[str] | None = None) -> Any:
    """Process one study of the PACS at ``url`` (default ``data.dicomweb.url``) with the served champion.

    Args:
        study_ref: the study's salted reference (S + 16 hex digits), never its UID: the listener keeps the UID
            under <pacs.state_dir>/pending/ before it starts the run, and the run reads it there.
        url: DICOMweb root of the PACS.
        params_path: params.yaml (empty = the project's).
        overrides: section.field=value strings.
    """
    settings = with_overrides(load_settings(params_path), list(overrides or []))
    ctx = context(settings, url, (params_path, tuple(overrides or []), url))
    outcome = process_study_task(ctx, study_ref)
    if outcome.transient or outcome.status == STUDY_UNKNOWN:
        return Failed(message=outcome.line(), data=outcome)
    return Completed(message=outcome.line(), data=outcome)


def refuse_credentials_in_url(url: str | None) -> None:
    """A flow run's parameters are stored in Prefect's database and shown in its UI: a PACS URL with
    ``user:password@`` must not become one (fail closed, before anything is handed over)."""
    from pipeline.connections import has_credentials, mask_uri
    from pipeline.errors import ConfigError

    if has_credentials(url):
        raise ConfigError(f"the PACS URL {mask_uri(str(url))} carries credentials, which Prefect would store with "
                          "the flow run's parameters",
                          hint="pass the URL without them and set XRAYOPS_PACS_USER / XRAYOPS_PACS_PASSWORD (or "
                          "XRAYOPS_PACS_TOKEN; names in data.dicomweb), or use pacs.dispatch=direct")


def run_flow(settings: Settings, study_uid: str, url: str | None, params_path: str | None,
             overrides: list[str]) -> PacsOutcome:
    """Hand the study over (its UID kept in the pending store of ``settings``, which must be the settings that
    ``params_path`` + ``overrides`` give), run the flow in this process with its reference, and return the outcome
    (a Failed run's too)."""
    refuse_credentials_in_url(url)
    ref = hand_over(settings, study_uid)
    state = pacs_inference_flow(ref, url, params_path, overrides, return_state=True)
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
    """Hand the study over (as :func:`run_flow`) and start a run of ``pacs.deployment`` with its reference;
    return at once (``timeout=0``). The worker must share ``pacs.state_dir`` and the salt with the listener."""
    from prefect.deployments import run_deployment

    from flows import PACS_DEPLOYMENT
    from pipeline.errors import ConfigError

    if not settings.pacs.deployment:
        raise ConfigError("pacs.dispatch is 'deployment' but pacs.deployment is not set",
                          hint=f"`xrayops deploy` applies {PACS_DEPLOYMENT}: --set "
                          f"pacs.deployment={PACS_DEPLOYMENT}, or pacs.dispatch=flow")
    refuse_credentials_in_url(url)
    ref = hand_over(settings, study_uid)
    run = run_deployment(settings.pacs.deployment, timeout=0, parameters={
        "study_ref": ref, "url": url, "params_path": params_path, "overrides": overrides})
    return Submitted(ref, str(run.name))
