"""Deployments applied by ``xrayops deploy`` carry a concurrency limit per flow (``orchestrate.concurrency_limit``):
two runs of the same deployment never overlap; the one beyond the limit waits in the queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.config import Settings


def built(settings: Settings) -> dict[str, object]:
    """Each deployment deploy would apply, by deployment name (nothing is sent to a server)."""
    from flows.deploy import PROJECT_DIR, SPECS, build_deployment, find_flow

    out = {}
    for spec in SPECS:
        found = find_flow(spec, PROJECT_DIR)
        if found:
            out[spec.deployment] = build_deployment(spec, found[0], settings, project_dir=PROJECT_DIR,
                                                    job_variables={}, paused=False)
    return out


def test_every_deployment_gets_the_configured_concurrency_limit(make_settings: Callable[..., Settings]) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows import TRAINING_DEPLOYMENT

    deployments = built(make_settings())
    assert TRAINING_DEPLOYMENT in deployments
    for name, deployment in deployments.items():
        assert deployment.concurrency_limit == 1, name  # params.yaml default
        assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE, name
    assert {d.concurrency_limit for d in built(make_settings("orchestrate.concurrency_limit=3")).values()} == {3}
    unlimited = built(make_settings("orchestrate.concurrency_limit=null")).values()
    assert {(d.concurrency_limit, d.concurrency_options) for d in unlimited} == {(None, None)}


def test_training_deployment_runs_without_simulation_and_shows_its_defaults(
        make_settings: Callable[..., Settings]) -> None:
    from flows import TRAINING_DEPLOYMENT

    deployment = built(make_settings("train.epochs=3"))[TRAINING_DEPLOYMENT]
    assert deployment.parameters == {"params": {"simulate_production": False}}
    schema = deployment._parameter_openapi_schema.model_dump()
    assert schema["properties"]["params"]["default"]["epochs"] == 3
    assert schema["definitions"]["TrainingParameters"]["properties"]["model"]["default"] == "xray_cnn"


def test_a_limit_below_one_is_a_config_error(make_settings: Callable[..., Settings]) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="orchestrate.concurrency_limit"):
        make_settings("orchestrate.concurrency_limit=0")


@pytest.mark.slow
def test_the_server_stores_the_limit(prefect_harness: None, make_settings: Callable[..., Settings]) -> None:
    """Applied to a (temporary) Prefect server, the training deployment holds the limit there."""
    from prefect import get_client

    from flows.deploy import PROJECT_DIR, SPECS, deploy_flow, ensure_work_pool, find_flow

    settings = make_settings("orchestrate.concurrency_limit=2")
    spec = SPECS[0]
    asyncio.run(ensure_work_pool("xrayops-test-pool"))
    attr, _ = find_flow(spec, PROJECT_DIR)
    deployed = deploy_flow(spec, attr, settings, project_dir=PROJECT_DIR, pool="xrayops-test-pool",
                           job_variables={}, paused=True)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployed.name)
        client.delete_deployment(deployment.id)  # the harness server is shared: monitoring tests expect none
    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 2
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert deployment.entrypoint == "flows/training.py:training_flow"


@pytest.mark.slow
def test_deploy_applies_the_pacs_deployment_the_listener_can_run(prefect_harness: None,
                                                                  make_settings: Callable[..., Settings],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``deploy_all`` (what ``xrayops deploy`` calls) applies ``xrayops-pacs-inference/pacs``: unscheduled, its
    form asks for the study reference only (``pacs.dispatch: deployment`` passes nothing else identifying)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from flows import PACS_DEPLOYMENT
    from flows.deploy import deploy_all

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # deploy refuses without a real server's URL
    deployed = {d.name: d for d in deploy_all(make_settings(), pool="xrayops-test-pool", paused=True)}
    with get_client(sync_client=True) as client:
        stored = client.read_deployment_by_name(PACS_DEPLOYMENT)
        for d in deployed.values():  # the harness server is shared: monitoring tests expect none
            client.delete_deployment(d.deployment_id)
    assert PACS_DEPLOYMENT in deployed and deployed[PACS_DEPLOYMENT].cron is None
    assert stored.entrypoint == "flows/pacs.py:pacs_inference_flow" and stored.schedules == []
    assert stored.work_pool_name == "xrayops-test-pool"
    schema = stored.parameter_openapi_schema
    assert schema["required"] == ["study_ref"] and "study_uid" not in schema["properties"]


@pytest.mark.slow
def test_deploy_creates_the_registry_write_limit_once(prefect_harness: None,
                                                      make_settings: Callable[..., Settings]) -> None:
    """With promote.registry_write_limit set, deploy creates that global limit (1 slot) on the server when missing
    and leaves an existing one (an operator's setting) as it is; with the setting null it creates nothing."""
    import uuid

    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import ensure_registry_write_limit

    name = f"registry-write-{uuid.uuid4().hex[:6]}"
    assert asyncio.run(ensure_registry_write_limit(make_settings())) is False  # null: nothing to create
    settings = make_settings(f"promote.registry_write_limit={name}")
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_global_concurrency_limit_by_name(name)
        assert asyncio.run(ensure_registry_write_limit(settings)) is True
        assert client.read_global_concurrency_limit_by_name(name).limit == 1
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=2))
        assert asyncio.run(ensure_registry_write_limit(settings)) is False
        assert client.read_global_concurrency_limit_by_name(name).limit == 2
        client.delete_global_concurrency_limit_by_name(name)
