"""A real MLflow tracking server killed during a promotion: the registry fails closed and recovers.

The server process (SQLite backend on disk) is killed (1) before a promotion reads the champion and
(2) between its two alias writes (``previous-champion`` moved, ``champion`` not yet). Each time the
promotion stops with a registry error — never "no champion", never a half-moved chain presented as
done — and after the server is restarted on the same store, ``champion`` is still the version that
passed the gate against its predecessor, and the retried promotion completes with a consistent chain.
A server is a registry other machines can write to: before ``promote.registry_write_limit`` is set, an
alias move (library or CLI) is refused; with it, every move takes that Prefect limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import Settings, with_overrides
from pipeline.errors import ConfigError, RegistryError, ServiceUnavailable
from pipeline.registry import write
from pipeline.registry.contract import CHAMPION, PREVIOUS
from pipeline.registry.read import aliases, get_alias
from pipeline.registry.write import move_champion
from tests.registry.versions import gate_against_current, new_version
from tests.servers.processes import Group, http_ok, start_mlflow, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture
def mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], tuple[str, Group]]]:
    """``start()`` → (url, process group) of an MLflow server on one SQLite store; every server is stopped after."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails at once, not after backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    groups: list[Group] = []

    def start() -> tuple[str, Group]:
        url, group = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path)
        groups.append(group)
        wait_until(http_ok(f"{url}/health"), group, 240, "healthy /health")
        return url, group

    yield start
    for group in groups:
        group.stop()


def on_server(settings: Settings, url: str) -> Settings:
    return with_overrides(settings, [f"paths.mlflow_tracking_uri={url}", "paths.mlflow_registry_uri=null"])


def test_killed_server_mid_promotion_fails_closed_and_the_retry_completes(
        prefect_harness: None, make_settings: Callable[..., Settings],
        mlflow_server: Callable[[], tuple[str, Group]], monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from typer.testing import CliRunner

    from flows.registry_lock import registry_write_lock
    from pipeline.cli import app
    from tests.test_cli_errors import error_lines

    monkeypatch.setattr(write, "publish_card", lambda settings, version: None)  # no evaluation to card
    url, group = mlflow_server()
    settings = on_server(make_settings("promote.registered_model=xr-server-faults"), url)
    MlflowClient(url, url).create_registered_model(settings.registered_model)
    v1 = new_version(settings)

    # (0) a shared registry without promote.registry_write_limit: no alias moves, one line from the CLI
    with pytest.raises(ConfigError, match="promote.registry_write_limit is null"):
        move_champion(settings, v1.version, reason="no shared lock", expected_champion=None)
    refused = CliRunner().invoke(app, ["registry", "rollback", "--reason", "x", "--params",
                                       str(settings.root / "params.yaml"), "--set", f"paths.mlflow_tracking_uri={url}",
                                       "--set", f"promote.registered_model={settings.registered_model}"])
    assert refused.exit_code == 2, refused.output
    error, hint = error_lines(refused.output)
    assert "is shared" in error and hint is not None and "promote.registry_write_limit: registry-write" in hint
    assert aliases(settings) == {}
    limit = f"registry-write-{settings.registered_model}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    settings = with_overrides(settings, [f"promote.registry_write_limit={limit}"])
    lock = registry_write_lock(settings)

    move_champion(settings, v1.version, reason="first champion", expected_champion=None, lock=lock)
    v2 = new_version(settings)
    decision = gate_against_current(settings, v2)
    assert decision.promote and decision.champion_version == str(v1.version)

    # (1) the server is gone before the promotion reads the champion: an error, not "no champion"
    group.stop()
    with pytest.raises((RegistryError, ServiceUnavailable)):
        get_alias(settings, CHAMPION)
    with pytest.raises((RegistryError, ServiceUnavailable)):
        move_champion(settings, v2.version, reason="gated", expected_champion=decision.champion_version, lock=lock)
    url, group = mlflow_server()
    settings = on_server(settings, url)
    assert aliases(settings) == {CHAMPION: str(v1.version)}, "nothing moved while the server was down"

    # (2) the server dies between the two alias writes
    real = MlflowClient.set_registered_model_alias

    def write_then_die(self: MlflowClient, name: str, alias: str, version: str) -> None:
        real(self, name, alias, version)
        if alias == PREVIOUS:
            group.stop()

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", write_then_die)
    with pytest.raises((RegistryError, ServiceUnavailable)) as err:
        move_champion(settings, v2.version, reason="gated", expected_champion=decision.champion_version, lock=lock)
    assert "inconsistent" in str(err.value) or "unchanged" in str(err.value), str(err.value)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    url, group = mlflow_server()
    settings = on_server(settings, url)
    assert get_alias(settings, CHAMPION).version == v1.version, "champion never pointed at a half-promoted version"

    # the retried promotion completes: champion v2 (gated against v1), previous-champion v1
    move_champion(settings, v2.version, reason="gated", expected_champion=decision.champion_version, lock=lock)
    assert aliases(settings) == {CHAMPION: str(v2.version), PREVIOUS: str(v1.version)}
    tags = MlflowClient(url, url).get_model_version(settings.registered_model, str(v2.version)).tags
    assert tags["previous_champion_version"] == str(v1.version)
