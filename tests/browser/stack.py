"""One real training stack for the browser tests: an MLflow server and a Prefect server (with its UI) on
temporary SQLite, a tiny git + DVC project deployed with ``xrayops deploy``, and a ``xrayops worker``.

The Prefect UI test starts one training run by filling the deployment's "Custom run" form in Chromium; the
MLflow UI test reads the same run's registered version, so the suite trains once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import TINY, init_git_dvc, write_params
from tests.servers.processes import (
    Group,
    http_ok,
    kill_processes_with_env,
    start,
    start_mlflow,
    start_prefect,
    wait_until,
)

XRAYOPS = str(Path(sys.executable).parent / "xrayops")
LENIENT_GATE = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1"]
REGISTERED_MODEL = "xrayops-synthetic"
FORM_MODEL = "alexnet_small"  # not the params.yaml default (xray_cnn): proves the drop-down choice reached the run
SALT = "test-salt-not-secret-0123456789abcdef"


@dataclass
class TrainingStack:
    mlflow_url: str
    prefect_api: str
    project: Path
    params: Path
    env: dict[str, str]
    log_dir: Path
    groups: list[Group] = field(default_factory=list)

    @property
    def prefect_ui(self) -> str:
        return self.prefect_api.removesuffix("/api")

    def start_worker(self) -> Group:
        worker = start("worker", [XRAYOPS, "worker"], self.log_dir, self.env, cwd=self.project)
        self.groups.append(worker)
        return worker

    def logs(self, n: int = 60) -> str:
        return "\n".join(f"--- {g.name}\n{g.tail(n)}" for g in self.groups)

    def stop(self) -> list[str]:
        """Stop every process (flow runs included); the names of any still alive."""
        for group in reversed(self.groups):
            group.stop()
        orphans = kill_processes_with_env("PREFECT_API_URL", self.prefect_api)  # flow runs get their own group
        return [g.name for g in self.groups if g.alive()] + [f"flow-run pid {p}" for p in orphans]


def start_training_stack(root: Path) -> TrainingStack:
    """Servers (started together), the project, ``xrayops deploy --paused`` (no schedule fires) and a worker."""
    groups: list[Group] = []
    try:
        mlflow_url, mlflow_group = start_mlflow(f"sqlite:///{root / 'mlflow.db'}", root / "mlflow-artifacts", root)
        groups.append(mlflow_group)
        prefect_api, prefect_group = start_prefect(f"sqlite+aiosqlite:///{root / 'prefect.db'}",
                                                   root / "prefect-server-home", root, ui=True)
        groups.append(prefect_group)
        project = root / "project"
        project.mkdir()
        # an MLflow server is a shared registry: alias moves need the Prefect limit (deploy creates it)
        params = write_params(project, [*TINY, *LENIENT_GATE, f"paths.mlflow_tracking_uri={mlflow_url}",
                                        "promote.export_onnx=false", "orchestrate.task_retries=0",
                                        "promote.registry_write_limit=registry-write"])
        init_git_dvc(project)
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(root / "prefect-client-home"),
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "XRAYOPS_PSEUDONYM_SALT": SALT}
        env.pop("XRAYOPS_PARAMS", None)  # the deployment's job variables carry it
        wait_until(http_ok(f"{mlflow_url}/health"), mlflow_group, 240, "healthy /health")
        wait_until(http_ok(f"{prefect_api}/health"), prefect_group, 240, "healthy /api/health")
        stack = TrainingStack(mlflow_url, prefect_api, project, params, env, root, groups)
        out = subprocess.run([XRAYOPS, "deploy", "--params", str(params), "--paused"], env=env, cwd=project,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"xrayops deploy → {out.returncode}\n{out.stdout}\n{out.stderr}"
        stack.start_worker()
        return stack
    except BaseException:
        for group in reversed(groups):
            group.stop()
        raise


# --------------------------------------------------------------------------- the Prefect UI's schema form


def form_field(page: Any, title: str) -> Any:
    """The innermost form property whose label is ``title`` (the UI appends " (Optional)")."""
    label = page.locator(".schema-form-property__label").filter(
        has_text=re.compile(rf"^{re.escape(title)}( \(Optional\))?$"))
    return label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")


def open_drop_down(page: Any, title: str) -> list[str]:
    """Open the drop-down of field ``title`` as a keyboard user does (focus, Space); the names it offers."""
    control = form_field(page, title).locator(".p-select-button__control")
    control.focus()
    page.keyboard.press(" ")
    options = page.get_by_role("option")
    options.first.wait_for()
    return [o.inner_text().strip() for o in options.all()]


def choose(page: Any, title: str, value: str) -> list[str]:
    """Pick ``value`` in the drop-down of field ``title``; returns the names it offered."""
    offered = open_drop_down(page, title)
    page.get_by_role("option").filter(has_text=re.compile(rf"^\s*{re.escape(value)}\s*$")).click()
    shown = form_field(page, title).locator(".p-select-button__control").inner_text().strip()
    assert shown == value, f"{title}: chose {value!r}, the form shows {shown!r}"
    return offered


def wait_for_final_state(client: Any, flow_run_id: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    run = client.read_flow_run(flow_run_id)
    while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
        time.sleep(2)
        run = client.read_flow_run(flow_run_id)
    return run


FORM_RUN_TIMEOUT_S = 600


@dataclass
class FormRun:
    """What the form offered and what came of submitting it."""

    flow_run_id: str
    defaults_shown: dict[str, Any]   # the form's values before anything was changed
    sources_offered: list[str]
    models_offered: list[str]
    parameters: dict[str, Any]
    state: str
    seconds: float
    worker_log: str


def start_run_from_form(stack: TrainingStack, page: Any, screenshot: Any, timeout_s: float) -> FormRun:
    """Deployments → training → Run → Custom run; pick source and model, switch simulation on, Submit; then
    wait (API) for the run to end."""
    from playwright.sync_api import expect
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import TRAINING_DEPLOYMENT

    page.goto(f"{stack.prefect_ui}/deployments")
    page.get_by_role("link", name="training", exact=True).click()
    page.wait_for_url(re.compile(r"/deployments/deployment/"))
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+/run"))
    form_field(page, "Epochs").wait_for()
    shown = {"source": form_field(page, "Dataset source").locator(".p-select-button__control").inner_text().strip(),
             "model": form_field(page, "Model").locator(".p-select-button__control").inner_text().strip(),
             "epochs": form_field(page, "Epochs").locator("input").input_value(),
             "simulate": form_field(page, "Simulate production traffic and drift report").get_by_role(
                 "switch").is_checked()}
    sources = choose(page, "Dataset source", "synthetic")
    models = open_drop_down(page, "Model")
    screenshot(page, "prefect-run-form-model-drop-down")
    page.get_by_role("option").filter(has_text=re.compile(rf"^\s*{FORM_MODEL}\s*$")).click()
    simulate = form_field(page, "Simulate production traffic and drift report").get_by_role("switch")
    simulate.click()
    expect(simulate).to_be_checked()
    page.wait_for_timeout(500)  # the switch slides over (a CSS transition) before the screenshot
    screenshot(page, "prefect-run-form")
    t0 = time.monotonic()
    page.get_by_role("button", name="Submit").click()
    try:
        page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+($|\?)"))  # the UI goes back to the deployment
    except Exception as exc:  # say what the form showed instead (a validation error, a toast)
        page.screenshot(path=str(stack.log_dir / "form-not-submitted.png"), full_page=True)
        raise AssertionError(f"the form was not submitted; the page shows:\n{page.inner_text('body')[-2000:]}\n"
                             f"{stack.logs(20)}") from exc

    with temporary_settings({PREFECT_API_URL: stack.prefect_api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(TRAINING_DEPLOYMENT)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        started = [r for r in runs if not r.auto_scheduled]
        assert len(started) == 1, f"expected the one run submitted from the form, found {len(started)}"
        run = wait_for_final_state(client, started[0].id, timeout_s)
    worker = next(g for g in stack.groups if g.name == "worker")
    return FormRun(str(run.id), shown, sources, models, run.parameters, run.state.name if run.state else "?",
                   time.monotonic() - t0, worker.tail(80))
