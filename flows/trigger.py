"""Start a run of a deployment with custom parameters, exactly as the Prefect UI's "Custom run" does.

The UI and ``prefect deployment run`` send a parameters dict to the API; this builds the
same dict from ``key=value`` strings. Flows whose only parameter is a pydantic model (the
training flow's ``params``) take the keys of that model, so ``epochs=1`` means
``{"params": {"epochs": 1}}``; ``--set section.field=value`` strings go to its
``overrides`` list.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

FINAL_WAIT_POLL_S = 2.0


def deployment_name(target: str) -> str:
    """``training`` → ``xrayops-training/training``; a full ``flow/deployment`` name is kept."""
    if "/" in target:
        return target
    short = target.removeprefix("xrayops-")
    return f"xrayops-{short}/{short}"


def _model_parameter(schema: dict[str, Any]) -> str | None:
    """The name of the flow's single model-typed parameter, if that is its only parameter."""
    props = schema.get("properties") or {}
    if len(props) != 1:
        return None
    name, prop = next(iter(props.items()))
    return name if "$ref" in prop or "allOf" in prop or "anyOf" in prop else None


def _text_fields(schema: dict[str, Any], wrapper: str | None) -> set[str]:
    """Fields of the model parameter ``wrapper`` whose only type (besides null) is string: a value given for
    them is text as typed, never read as YAML (``rev=1.10`` stays "1.10", ``input=/data/cxr #2`` keeps its "#")."""
    if wrapper is None:
        return set()
    prop = schema["properties"][wrapper]
    refs = [prop.get("$ref"), *(p.get("$ref") for p in [*prop.get("allOf", []), *prop.get("anyOf", [])])]
    ref = next((r for r in refs if r), "")
    model = (schema.get("definitions") or schema.get("$defs") or {}).get(ref.rsplit("/", 1)[-1], {})
    text = set()
    for name, field in (model.get("properties") or {}).items():
        types = {option.get("type") for option in field.get("anyOf", [field])} - {"null"}
        if types == {"string"}:
            text.add(name)
    return text


def build_parameters(schema: dict[str, Any], pairs: list[str], sets: list[str]) -> dict[str, Any]:
    """Parameters dict for a deployment run from ``key=value`` and ``section.field=value``.

    Values are read as YAML (``3``, ``true``, ``[1, 2]``), except for fields of the settings model that
    only take text, which get the text as typed. An empty value leaves a settings-model field unset (the run
    reads params.yaml; its schema has no null) and is None for other flows.
    """
    wrapper = _model_parameter(schema)
    text = _text_fields(schema, wrapper)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--param {pair!r} is not of the form name=value (e.g. epochs=3)")
        if not raw.strip():
            if wrapper:
                values.pop(key, None)
            else:
                values[key] = None
            continue
        values[key] = raw if key in text else yaml.safe_load(raw)
    if wrapper:
        if sets:
            values["overrides"] = [*values.get("overrides", []), *sets]
        return {wrapper: values} if values else {}
    if sets:
        raise ValueError("--set needs a flow whose parameters are one settings model (like the training flow)")
    return values


def trigger(target: str, pairs: list[str] | None = None, sets: list[str] | None = None, *,
            wait: bool = False, timeout_s: float = 3600) -> dict[str, Any]:
    """Create a flow run of a deployment (optionally wait for it); returns its id, state and UI link."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_UI_URL

    from pipeline.errors import DeployError

    name = deployment_name(target)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise DeployError(f"the Prefect server has no deployment {name!r}",
                              hint="apply the deployments with `xrayops deploy` (`prefect deployment ls` lists "
                                   "what is there)") from None
    parameters = build_parameters(deployment.parameter_openapi_schema or {}, pairs or [], sets or [])
    run = run_deployment(name=name, parameters=parameters, timeout=0, tags=["manual"])
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while wait and not (run.state and run.state.is_final()) and time.monotonic() < deadline:
            time.sleep(FINAL_WAIT_POLL_S)
            run = client.read_flow_run(run.id)
    ui = PREFECT_UI_URL.value()
    return {"deployment": name, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "state": run.state.name if run.state else None, "parameters": parameters,
            "url": f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else None}
