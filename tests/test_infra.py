"""The deployment files (infra/) agree with the code: services, ports, env vars, CLI entry points, work pools,
settings overrides, Dockerfile extras, the Kubernetes templates. Docker/Kubernetes cannot run here, so the
files are parsed and cross-checked against pipeline/cli.py, params.yaml, pyproject.toml and the flows."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from typing import Any

import pytest
import typer
import yaml

from pipeline.cli import app
from pipeline.config import load_settings
from tests.conftest import REPO

INFRA = REPO / "infra"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ENV_EXAMPLE = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")
LONG_RUNNING = {"postgres", "minio", "mlflow", "prefect-server", "worker-cpu", "worker-gpu", "api", "ui",
                "monitoring-ui"}


def interpolate(text: str) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?err} with .env.example values."""
    return VAR.sub(lambda m: ENV_EXAMPLE.get(m.group(1)) or (m.group(3) if m.group(2) == "-" else ""), text)


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return [interpolate(str(c)) for c in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def check_xrayops_command(argv: list[str]) -> Any:
    """``xrayops <sub> [<sub>] --opt …`` names a real CLI command, and each option exists on it."""
    assert argv[0] == "xrayops", argv
    command = typer.main.get_command(app)  # typer's own click: check groups by their `commands`
    args = list(argv[1:])
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        assert name in command.commands, f"`xrayops {name}` does not exist (in {argv})"
        command = command.commands[name]
    assert not hasattr(command, "commands") or command.invoke_without_command, (
        f"{argv} names a command group, not a command")
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{argv}: option {arg} is not an option of this command ({known})"
    return command


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def container_port(service: dict[str, Any]) -> int:
    return int(interpolate(service["ports"][0]).split(":")[-1])


# --------------------------------------------------------------------------- compose


def test_compose_has_the_team_services_with_health_checks_and_declared_volumes() -> None:
    assert LONG_RUNNING | {"minio-init", "deploy", "deploy-gpu"} <= set(SERVICES)
    for name in LONG_RUNNING:
        assert "healthcheck" in SERVICES[name], f"service {name} has no health check"
    declared = set(COMPOSE["volumes"])
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
            else:
                assert (INFRA / source).resolve().exists(), f"{name}: bind source {source} does not exist"
        for dep in (svc.get("depends_on") or {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"


def test_every_xrayops_command_exists_in_the_cli() -> None:
    commands = {name: command_of(svc) for name, svc in SERVICES.items() if command_of(svc)[:1] == ["xrayops"]}
    assert {"deploy", "worker-cpu", "worker-gpu", "deploy-gpu", "api", "ui"} <= set(commands)
    for argv in commands.values():
        check_xrayops_command(argv)


def test_the_cli_check_rejects_unknown_commands_and_options() -> None:
    for bad in (["xrayops", "serve", "--bogus", "1"], ["xrayops", "no-such-command"], ["xrayops", "data"]):
        with pytest.raises(AssertionError):
            check_xrayops_command(bad)


def test_ports_pools_and_settings_agree_with_params_and_code() -> None:
    settings = load_settings(REPO / "params.yaml")
    assert container_port(SERVICES["api"]) == settings.serve.port == int(option(command_of(SERVICES["api"]), "--port"))
    ui = check_xrayops_command(command_of(SERVICES["ui"]))
    ui_default = next(p.default for p in ui.params if p.name == "port")
    assert container_port(SERVICES["ui"]) == int(option(command_of(SERVICES["ui"]), "--port")) == ui_default
    assert option(command_of(SERVICES["worker-cpu"]), "--pool") == settings.orchestrate.work_pool
    assert option(command_of(SERVICES["worker-gpu"]), "--pool") == option(command_of(SERVICES["deploy-gpu"]), "--pool")
    prefect_port = int(option(command_of(SERVICES["prefect-server"]), "--port"))
    mlflow_port = int(option(command_of(SERVICES["mlflow"]), "--port"))
    assert container_port(SERVICES["prefect-server"]) == prefect_port
    assert container_port(SERVICES["mlflow"]) == mlflow_port
    for name in ("deploy", "worker-cpu", "worker-gpu", "api", "ui"):
        env = env_of(SERVICES[name])
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{prefect_port}/api"
        sets = [s.strip() for s in env["XRAYOPS_SET"].split(";") if s.strip()]
        team = load_settings(REPO / "params.yaml", sets)  # every override names a real, valid setting
        assert team.tracking_uri == f"http://mlflow:{mlflow_port}"
        assert team.artifact_root is None  # artifacts are proxied by the MLflow server (to MinIO)
        assert team.dvc_remote.startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        bucket = team.dvc_remote.removeprefix("s3://").split("/")[0]
        assert bucket in command_of(SERVICES["minio-init"])[0] or bucket == ENV_EXAMPLE["DVC_BUCKET"]


def test_the_clinician_ui_is_published_on_loopback_only_and_signs_people_in() -> None:
    svc = SERVICES["ui"]
    published = [interpolate(p) for p in svc["ports"]]
    assert published and all(p.startswith("127.0.0.1:") for p in published), (
        f"the clinician UI must not be published on all interfaces: {published}")
    sets = [s.strip() for s in env_of(svc)["XRAYOPS_SET"].split(";") if s.strip()]
    team = load_settings(REPO / "params.yaml", sets)
    assert team.ui.auth != "none", "the container listens on 0.0.0.0: sign-in is required"
    assert team.ui_users_file.is_relative_to("/state"), "users live on the state volume"


def test_monitoring_ui_serves_the_workspace_the_workers_write() -> None:
    svc = SERVICES["monitoring-ui"]
    cmd = command_of(svc)
    ui = check_xrayops_command(cmd)
    assert cmd[1:3] == ["monitor", "ui"]
    assert container_port(svc) == int(option(cmd, "--port")) == next(p.default for p in ui.params if p.name == "port")
    sets = [s.strip() for s in env_of(svc)["XRAYOPS_SET"].split(";") if s.strip()]
    home = str(load_settings(REPO / "params.yaml", sets).home)  # workspace null → <home>/evidently-workspace
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    worker = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["worker-cpu"]["volumes"]}
    assert home in mounts and mounts[home] == worker[home], "the UI must mount the volume the monitoring flow writes"


def test_mlflow_server_uses_postgres_and_minio() -> None:
    cmd, env = command_of(SERVICES["mlflow"]), env_of(SERVICES["mlflow"])
    assert option(cmd, "--backend-store-uri").startswith("postgresql+psycopg2://")
    assert option(cmd, "--backend-store-uri").endswith("@postgres:5432/mlflow")
    assert option(cmd, "--artifacts-destination") == f"s3://{ENV_EXAMPLE['MLFLOW_BUCKET']}/artifacts"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect_db = env_of(SERVICES["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    init_sql = (INFRA / "postgres" / "init-databases.sql").read_text()
    assert "CREATE DATABASE mlflow" in init_sql and "CREATE DATABASE prefect" in init_sql


def test_gpu_worker_profile_requests_nvidia_devices() -> None:
    gpu = SERVICES["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and SERVICES["deploy-gpu"]["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["dockerfile"].endswith("gpu.Dockerfile")


def test_env_example_defines_every_required_variable_and_nothing_unused() -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    used = {m.group(1) for m in VAR.finditer(text)}
    required = {m.group(1) for m in VAR.finditer(text) if m.group(2) in (None, "?")}
    assert required <= set(ENV_EXAMPLE), f"missing from .env.example: {required - set(ENV_EXAMPLE)}"
    assert set(ENV_EXAMPLE) <= used, f"unused in compose: {set(ENV_EXAMPLE) - used}"
    assert "/infra/.env" in (REPO / ".gitignore").read_text().splitlines()


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("name, gpu", [("cpu", False), ("gpu", True)])
def test_dockerfiles_install_from_the_lock_with_existing_extras(name: str, gpu: bool) -> None:
    dockerfile = (INFRA / "docker" / f"{name}.Dockerfile").read_text()
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    wanted = set(re.findall(r"--extra (\w+)", dockerfile))
    assert wanted <= extras and ("gpu" in wanted) is gpu and "server" in wanted
    assert "uv sync --frozen --no-dev" in dockerfile
    allowed = (INFRA / "docker" / f"{name}.Dockerfile.dockerignore").read_text().split()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert f"!{src}" in allowed or f"!{src}/" in allowed, f"{src} is excluded by the .dockerignore"
    built = {svc["build"]["dockerfile"] for svc in SERVICES.values() if "build" in svc}
    assert f"infra/docker/{name}.Dockerfile" in built


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_gpu_work_pool_template_is_consistent_and_requests_gpus() -> None:
    from prefect.utilities.templating import find_placeholders

    template = json.loads((INFRA / "k8s" / "gpu-work-pool-base-job-template.json").read_text())
    variables = set(template["variables"]["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= variables, f"placeholders without a variable: {used - variables}"
    assert variables <= used, f"variables never used (no effect): {variables - used}"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job" and pod["restartPolicy"] == "Never"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] >= 1


def test_kubernetes_multiworker_job_sets_tf_config_per_pod() -> None:
    service, job = yaml.safe_load_all((INFRA / "k8s" / "multiworker-training.yaml").read_text())
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == int(env["WORKERS"])
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    script = container["args"][0]
    assert "TF_CONFIG" in script and "JOB_COMPLETION_INDEX" in script
    for line in script.splitlines():
        if line.strip().startswith("xrayops "):
            check_xrayops_command(shlex.split(line.replace('"$DATA_REPO"', "R").replace('"$DATA_REV"', "V")))
    load_settings(REPO / "params.yaml", [s.strip() for s in env["XRAYOPS_SET"].split(";") if s.strip()])


def test_the_stand_in_pacs_is_opt_in_loopback_only_with_auth_and_dicomweb() -> None:
    svc = SERVICES["orthanc"]
    assert svc["profiles"] == ["pacs"] and "healthcheck" in svc
    published = [interpolate(p) for p in svc["ports"]]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    env = env_of(svc)
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true" and env["ORTHANC__DICOM_WEB__ENABLE"] == "true"
    assert env["ORTHANC__AUTHENTICATION_ENABLED"] == "true"  # the default of PACS_AUTH
    users = json.loads(env["ORTHANC__REGISTERED_USERS"])
    settings = load_settings(REPO / "params.yaml")
    client = env_of({"environment": COMPOSE["x-xrayops-env"]})
    assert users == {client[settings.data.dicomweb.username_env]: client[settings.data.dicomweb.password_env]}
    assert svc["volumes"][0].split(":")[0] in COMPOSE["volumes"]
