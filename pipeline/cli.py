"""``xrayops`` command line. Heavy libraries are imported inside commands, so ``--help`` is instant.

Every command that runs a stage or flow takes ``--set section.field=value`` (repeatable),
validated against the config models, and ``--params PATH``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.errors import ValidationFailed, XrayopsError

app = typer.Typer(name="xrayops", help="Train, review, ship and watch chest X-ray classifiers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Raw datasets: generate / materialise and version with DVC.", no_args_is_help=True)
model_app = typer.Typer(help="The model zoo.", no_args_is_help=True)
quarantine_app = typer.Typer(help="Files rejected at ingestion.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(quarantine_app, name="quarantine")

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.field=value (repeatable).",
                                                  metavar="KEY=VALUE")]
ParamsOpt = Annotated[Path | None, typer.Option("--params", help="params.yaml to use (default: ./params.yaml).",
                                                envvar="XRAYOPS_PARAMS")]


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn expected failures into one line on stderr (+ a hint): exit 2, or 1 for failed data validation.

    Every error xrayops raises on purpose derives from :class:`pipeline.errors.XrayopsError`; a missing
    file or folder named on the command line is reported the same way. Anything else is a bug and
    keeps its traceback.
    """
    try:
        yield
    except typer.Exit:
        raise
    except (XrayopsError, FileNotFoundError, NotADirectoryError) as exc:
        typer.secho(f"error: {_one_line(exc)}", err=True, fg="red")
        hint = getattr(exc, "hint", None)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        raise typer.Exit(1 if isinstance(exc, ValidationFailed) else 2) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def tracking_errors(settings: Any) -> Iterator[None]:
    """MLflow "server not there" failures (after MLflow's retries) → one line naming the server and the fix."""
    from pipeline.tracking import tracking_errors as wrap

    with wrap(settings):
        yield


def settings_for(params: Path | None, sets: list[str] | None, extra: list[str] | None = None) -> Any:
    """Load settings, apply overrides, switch telemetry off and configure logging."""
    from pipeline.config import load_settings
    from pipeline.runtime import configure_logging, quiet_tools

    quiet_tools()
    configure_logging()
    return load_settings(params, [*(extra or []), *(sets or [])])


def _dump(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- basics


@app.command()
def version() -> None:
    """Print the xrayops version and the versions of its core tools."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    typer.echo(f"xrayops {v('xrayops')}")
    for pkg in ("prefect", "mlflow", "tensorflow", "keras", "dvc", "great-expectations", "evidently"):
        try:
            typer.echo(f"  {pkg} {v(pkg)}")
        except PackageNotFoundError:
            typer.echo(f"  {pkg} (not installed)")


@app.command()
def run(
    sets: SetOpt = None,
    params: ParamsOpt = None,
    summary: Annotated[Path | None, typer.Option(help="Also write the run summary JSON here.")] = None,
    simulate: Annotated[bool, typer.Option(help="Simulate production traffic and write a drift report.")] = True,
) -> None:
    """Run the whole training flow (Prefect; temporary local server unless PREFECT_API_URL is set)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from flows.environment import configure_prefect

        configure_prefect(settings)
        _import_tensorflow_quietly()
        from flows.training import TrainingParameters
        from flows.training import run as run_flow

        result = run_flow(TrainingParameters(overrides=list(sets or []), simulate_production=simulate,
                                             params_path=str(params) if params else None), summary)
        _print_summary(result)


def _print_summary(s: dict[str, Any]) -> None:
    reg, m = s["registry"], s["metrics"]
    typer.secho("\nxrayops run complete", bold=True)
    typer.echo(f"  data      {s['data']['dataset']}  DVC md5 {s['data']['dvc_md5']}  "
               f"({s['data']['ingested']} images, {s['data']['quarantined']} quarantined, "
               f"{s['data']['patients']} patients)")
    shown = {k: v for k, v in m.items() if isinstance(v, float) and k in
             ("auc", "sensitivity", "specificity", "accuracy", "macro_f1", "ece")}
    typer.echo("  metrics   " + "  ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    if m.get("ci", {}).get("auc"):
        lo, hi = m["ci"]["auc"]
        typer.echo(f"  AUC CI    [{lo:.3f}, {hi:.3f}] (patient-level bootstrap)")
    versus = reg["gate"].get("versus_champion")
    if versus:
        metric = next((k for k in versus if k.startswith("delta_")), None)
        if metric and versus.get("ci"):
            lo, hi = versus["ci"]
            typer.echo(f"  vs champion {metric.replace('delta_', 'Δ')} {versus[metric]:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    typer.echo(f"  registry  {reg['model_name']} v{reg['version']}  aliases {reg['aliases']}  "
               f"gate: {reg['gate']['reason']}")
    if s["reports"].get("drift_html"):
        typer.echo(f"  drift     share {s['drift']['drift_share']} on the simulated batch (not production traffic)  "
                   f"report {s['reports']['drift_html']}")
    typer.echo(f"  wall time {s['wall_seconds']} s")
    typer.echo(f"  MLflow UI {s['mlflow_ui']}")


# --------------------------------------------------------------------------- data


@data_app.command("generate")
def data_generate(sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """Generate/materialise the configured raw dataset and version it with DVC."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.data.ingest import prepare_raw, version_raw

        root = prepare_raw(settings)
        version = version_raw(settings)
        _dump({"raw_dir": str(root), "dvc": version.to_dict() if version else None})


@app.command()
def ingest(
    source: Annotated[str | None, typer.Option(help="Source name (default: data.source).")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="Raw dataset folder.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Label / mapping CSV.")] = None,
    rev: Annotated[str | None, typer.Option(help="Git rev/tag of the dataset in its DVC repo.")] = None,
    repo: Annotated[str | None, typer.Option(help="DVC repo holding the dataset (with --rev).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output dataset folder.")] = None,
    version_with_dvc: Annotated[bool | None, typer.Option("--dvc/--no-dvc",
                                                          help="Version the raw folder with DVC first.")] = None,
    url: Annotated[str | None, typer.Option(help="--source dicomweb: the PACS's DICOMweb root "
                                                 "(data.dicomweb.url).")] = None,
    study_filter: Annotated[list[str] | None, typer.Option(
        "--study-filter", help="--source dicomweb: a QIDO-RS study filter KEY=VALUE (repeatable; replaces "
                               "data.dicomweb.study_filter), e.g. ModalitiesInStudy=CR.")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Build DIR/manifest.parquet, DIR/quarantine.csv and DIR/ingest_summary.json from a raw dataset.

    With --source dicomweb the raw dataset is first pulled from a PACS (--url, --study-filter) into
    --input (default <data_dir>/raw/dicomweb); a rerun fetches only what is not pulled yet.
    """
    local_repo = repo is not None and Path(repo).expanduser().is_dir()
    extra = _opt_sets({"data.source": source, "data.labels": _abs(labels), "data.rev": rev,
                       # with --rev, --input is a path inside the DVC repo, not on this disk
                       "data.input": input.as_posix() if (rev and input is not None) else _abs(input),
                       "data.repo": str(Path(repo).expanduser().resolve()) if local_repo else repo,
                       "data.dataset_dir": _abs(out), "data.version_with_dvc": version_with_dvc,
                       "data.dicomweb.url": url})
    if input is not None and version_with_dvc is None and rev is None:
        extra.append("data.version_with_dvc=false")  # an explicit folder may live outside any DVC repo
    with friendly_errors():
        if study_filter is not None:
            extra.append(f"data.dicomweb.study_filter={json.dumps(_key_values(study_filter, '--study-filter'))}")
        settings = settings_for(params, sets, extra)
        from pipeline.data.ingest import prepare_raw, run_ingest, version_raw

        pulls = settings.data.source == "dicomweb"  # its raw folder is a pull cache: refreshed from the PACS
        if (input is None or pulls) and not settings.data.rev:
            prepare_raw(settings)
        version = version_raw(settings)
        summary = run_ingest(settings, version)
        _dump({k: summary.get(k) for k in ("files_seen", "ingested", "quarantined", "quarantine_reasons",
                                           "excluded_by_policy", "patients", "excluded_by_label_mapping",
                                           "labels_csv", "dataset_hash", "dvc_rev")}
               | ({"dicomweb": summary["dicomweb"]} if "dicomweb" in summary else {}))


def _key_values(items: list[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` strings → a dict (a ConfigError naming ``option`` for one without ``=`` or a key)."""
    from pipeline.errors import ConfigError

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r} is not KEY=VALUE (e.g. {option} ModalitiesInStudy=CR)")
        out[key.strip()] = value.strip()
    return out


def _abs(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None


def _opt_sets(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (bool, int, float)) else json.dumps(str(value))
        out.append(f"{key}={text}")
    return out


@app.command()
def validate(
    dataset_dir: Annotated[Path | None, typer.Argument(help="Dataset folder (default: from params).")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Validate DIR/manifest.parquet with Great Expectations; exit 1 on a critical failure."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.data.validate import run_validation

        result = run_validation(settings, dataset_dir.resolve() if dataset_dir else None)
        typer.echo(f"validation passed: {result['statistics']['successful_expectations']}/"
                   f"{result['statistics']['evaluated_expectations']} expectations; "
                   f"warnings: {result['warning_failures'] or 'none'}; docs: {result['data_docs']}")


@app.command()
def split(
    dataset_dir: Annotated[Path | None, typer.Argument(help="Dataset folder (default: from params).")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Split DIR by patient; writes DIR/split.parquet and DIR/split_certificate.json."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.data.split import run_split

        cert = run_split(settings, dataset_dir.resolve() if dataset_dir else None)
        _dump({k: cert[k] for k in ("images", "patients", "prevalence", "patient_overlap",
                                    "exact_duplicates_across_splits")}
              | {"near_duplicates_across_splits": len(cert["near_duplicates_across_splits"])})


@app.command()
def train(sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """Train train.model on the split dataset (MLflow-tracked); writes <models_dir>/<dataset>/."""
    with friendly_errors():
        settings = settings_for(params, sets)
        _import_tensorflow_quietly()
        from pipeline.training.train import run_train

        with tracking_errors(settings):
            result = run_train(settings)
        _dump({"run_id": result.run_id, "model_uri": result.model_uri, "epochs": result.epochs_run,
               "seconds": result.seconds, "final": {k: v[-1] for k, v in result.history.items()}})


@app.command()
def evaluate(sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """Evaluate the last trained model on the test split (metrics with patient-level CIs)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        _import_tensorflow_quietly()
        from pipeline.evaluation.evaluate import run_evaluate
        from pipeline.job import log_reference_profile
        from pipeline.training.train import load_trained

        trained = load_trained(settings)
        with tracking_errors(settings):
            result = run_evaluate(settings, trained)
            log_reference_profile(settings, trained, result)
        _dump(result.to_json()["metrics"])


@app.command()
def promote(sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """Register the last evaluated model and promote it through the gate."""
    with friendly_errors():
        settings = settings_for(params, sets)
        _import_tensorflow_quietly()
        from pipeline.registry.promote import promote_challenger

        trained, evaluation = _reload_evaluation(settings)
        result = promote_challenger(settings, trained, evaluation, lock=_registry_lock(settings))
        if result.awaiting_approval:
            typer.echo(f"gate passed; approval required: `xrayops registry approve {result.version.version} "
                       "--reviewer NAME` (or reject with --reject)", err=True)
        _dump(result.decision.to_dict())


def _registry_lock(settings: Any) -> Any:
    """The Prefect limit ``promote.registry_write_limit`` around alias moves, when set (else the file lock only)."""
    if not settings.promote.registry_write_limit:
        return None
    from flows.registry_lock import registry_write_lock

    return registry_write_lock(settings)


def _reload_evaluation(settings: Any) -> tuple[Any, Any]:
    from pipeline.evaluation.evaluate import run_evaluate
    from pipeline.training.train import load_trained

    trained = load_trained(settings)
    return trained, run_evaluate(settings, trained)


# --------------------------------------------------------------------------- model zoo


@model_app.command("list")
def model_list() -> None:
    """List the zoo models."""
    from pipeline.training.models import list_models

    for spec in list_models():
        typer.echo(f"{spec.name:<18} {spec.family:<9} {spec.image_size}x{spec.image_size}x{spec.channels}  "
                   f"{spec.description}")


@model_app.command("describe")
def model_describe(
    name: Annotated[str, typer.Argument(help="Zoo model name (see `xrayops model list`).")],
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input side (default: the model's).")] = None,
    channels: Annotated[int | None, typer.Option(help="Input channels, 1 or 3 (default: the model's).")] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="Classes (default: the model's task).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Architecture report: per-layer output shape, parameters (formula vs Keras), receptive field, FLOPs."""
    with friendly_errors():
        from pipeline.runtime import quiet_tools

        quiet_tools()
        from pipeline.training.models import build_model, get_spec
        from pipeline.training.models.architecture import architecture_report

        spec = get_spec(name)
        model = build_model(name, image_size=image_size, channels=channels,
                            num_classes=num_classes or spec.num_classes, weights="none")
        report = architecture_report(model)
        if as_json:
            _dump(report.to_dict())
        else:
            typer.echo(report.to_text())


# --------------------------------------------------------------------------- quarantine


@quarantine_app.command("locate")
def quarantine_locate(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder holding quarantine.csv.")],
    input: Annotated[Path, typer.Option("--input", help="The raw dataset folder that was ingested.")],
    params: ParamsOpt = None,
) -> None:
    """Resolve de-identified quarantine references to files (prints paths: may show identifiers)."""
    with friendly_errors():
        settings = settings_for(params, None)
        from pipeline.data.deid import load_salt
        from pipeline.data.quarantine import QUARANTINE_FILE, locate, read_quarantine

        if not (dataset_dir / QUARANTINE_FILE).is_file():
            raise FileNotFoundError(f"{dataset_dir / QUARANTINE_FILE} not found: run `xrayops ingest --out "
                                    f"{dataset_dir}` first")
        if not input.is_dir():
            raise NotADirectoryError(f"--input {input} is not a folder: pass the raw dataset folder that was ingested")
        found = locate(dataset_dir, input, load_salt(settings.data.ingest.salt_env, settings.home))
        entries = read_quarantine(dataset_dir)
        for entry in entries:
            typer.echo(f"{entry.reason:<20} {found.get(entry.path, '<not found>')}")
        if entries and not found:
            from pipeline.errors import DataError

            raise DataError(f"none of the {len(entries)} quarantined files was found under {input}",
                            hint=f"pass the raw folder that was ingested into {dataset_dir}, with the pseudonymisation "
                                 f"salt of that ingest (${settings.data.ingest.salt_env})")


# --------------------------------------------------------------------------- serving, UI, monitoring, feedback

feedback_app = typer.Typer(help="Clinician feedback → labelled dataset versions.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Serve the version holding serve.model_alias over HTTP (FastAPI + uvicorn; API key from $XRAYOPS_API_KEY)."""
    from pipeline.runtime import configure_logging, import_tensorflow_quietly

    configure_logging(plain=not sys.stderr.isatty())  # a log collector gets one record per line, unwrapped
    with friendly_errors():
        settings = settings_for(params, sets)
        import_tensorflow_quietly()  # no CUDA/oneDNN start-up noise on CPU hosts
        from pipeline.serving.app import run as run_api

        run_api(settings, host, port)


ui_app = typer.Typer(help="The clinician app (default command) and its local users (`users`).")
ui_users_app = typer.Typer(help="Local users of the clinician app (ui.users_file): roles and scrypt-hashed "
                           "passwords.", no_args_is_help=True)
app.add_typer(ui_app, name="ui")
ui_app.add_typer(ui_users_app, name="users")


@ui_app.callback(invoke_without_command=True)
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Start the clinician app (Streamlit): sign-in, upload, prediction, Grad-CAM, feedback.

    People sign in (ui.auth: OIDC via .streamlit/secrets.toml [auth], or the local user file); without
    sign-in (ui.auth=none) the app only listens on a loopback address.
    """
    if ctx.invoked_subcommand is not None:
        return
    import os
    import subprocess

    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.ui.auth import resolve_auth
        from pipeline.ui.render import SETS_ENV

        plan = resolve_auth(settings, host)  # refuses no sign-in off loopback, and sign-in without users
        script = Path(__file__).resolve().parent / "ui" / "app.py"
        env = {**os.environ, "XRAYOPS_PARAMS": str(settings.root / "params.yaml"), SETS_ENV: json.dumps(sets or [])}
        cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", host,
               "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--client.toolbarMode", "viewer", "--client.showErrorDetails", "none"]
        if plan.mode == "oidc":
            cmd += ["--secrets.files", str(settings.ui_secrets_file)]
        raise typer.Exit(subprocess.call(cmd, env=env))


@ui_users_app.command("add")
def ui_users_add(
    name: Annotated[str, typer.Argument(help="User name (for OIDC users: the e-mail address the provider reports).")],
    role: Annotated[str, typer.Option(help="clinician (predict, feedback), adjudicator (also resolves "
                                      "disagreements) or reviewer.")] = "clinician",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line "
                                                 "of stdin (scripts) instead of prompting.")] = False,
    oidc: Annotated[bool, typer.Option("--oidc", help="An OIDC user: role only, no password (the identity "
                                       "provider signs them in).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Change an existing user's role/password.")] = False,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Add a user of the clinician app; the password is prompted for (never an argument)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.errors import UiAuthError
        from pipeline.ui.auth import UserStore, check_name, check_password

        check_name(name)
        password = None
        if not oidc:
            if password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
                if not password:
                    raise UiAuthError("--password-stdin: no password on the first line of stdin",
                                      hint="pipe it in, e.g. `printf '%s\\n' \"$PASSWORD\" | "
                                           f"xrayops ui users add {name} --password-stdin`")
            else:
                password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
            check_password(password)
        UserStore(settings.ui_users_file).add(name, role, password, replace=replace)
        typer.echo(f"{'updated' if replace else 'added'} {name} ({role}{', OIDC' if oidc else ''}) in "
                   f"{settings.ui_users_file}")


@ui_users_app.command("list")
def ui_users_list(sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """List the users of the clinician app (names, roles, password or OIDC)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.ui.auth import UserStore

        for name, entry in sorted(UserStore(settings.ui_users_file).load().items()):
            typer.echo(f"{name}\t{entry['role']}\t{'password' if entry.get('password') else 'oidc'}")


@ui_users_app.command("remove")
def ui_users_remove(name: Annotated[str, typer.Argument(help="User name.")], sets: SetOpt = None,
                    params: ParamsOpt = None) -> None:
    """Remove a user of the clinician app."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.ui.auth import UserStore

        UserStore(settings.ui_users_file).remove(name)
        typer.echo(f"removed {name} from {settings.ui_users_file}")


monitor_app = typer.Typer(help="Drift monitoring: a report per run (default command) and its timeline (`ui`).")
app.add_typer(monitor_app, name="monitor")


@monitor_app.callback(invoke_without_command=True)
def monitor(
    ctx: typer.Context,
    window_hours: Annotated[float | None, typer.Option(help="Compare the last N hours (default: monitor.*).")] = None,
    last_k: Annotated[int | None, typer.Option(help="Compare the last K predictions.")] = None,
    retrain: Annotated[bool | None, typer.Option("--retrain/--no-retrain",
                                                 help="Start the training deployment on drift.")] = None,
    summary_path: Annotated[Path | None, typer.Option("--summary", help="Also write the monitoring summary JSON "
                                                      "here (status, current_rows, rows_by_source, "
                                                      "skipped_parts, …).")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Drift report of production inputs vs the champion's reference (Prefect flow; HTML + JSON + MLflow).

    Real traffic only (api, ui, pacs) unless monitor.include_simulation is set; no rows yet is
    status no_data and exit 0. Each run also adds a snapshot to the model's Evidently workspace
    (`xrayops monitor ui` shows the timeline).
    """
    if ctx.invoked_subcommand is not None:
        return
    with friendly_errors():
        settings = settings_for(params, sets)
        from flows.environment import configure_prefect

        configure_prefect(settings)
        from flows.monitoring import MonitoringParameters
        from flows.monitoring import run as run_flow
        from pipeline.monitoring.drift import summary_markdown

        summary = run_flow(MonitoringParameters(window_hours=window_hours, last_k=last_k, retrain_on_drift=retrain,
                                                overrides=list(sets or []),
                                                params_path=str(params) if params else None))
        if summary.get("status") == "no_model":  # the flow run completes (nothing to watch); the command did not
            from pipeline.errors import RegistryError

            raise RegistryError(summary["message"])
        if summary_path:
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        if summary.get("skipped_parts"):
            typer.secho(f"warning: skipped {summary['skipped_parts']} unreadable log part file(s) "
                        f"(e.g. {summary['skipped_files'][0]}): move damaged files out of the log folder",
                        err=True, fg="yellow")
        typer.echo(summary_markdown(summary))


@monitor_app.command("ui")
def monitor_ui(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
    workspace: Annotated[Path | None, typer.Option(help="Evidently workspace folder (default: monitor.workspace, "
                                                   "null = <paths.home>/evidently-workspace).")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Start the Evidently UI on the monitoring workspace: one project per model, drift and label-free estimates,
    rejection rate, volume and latency over time (Ctrl-C stops it)."""
    import os
    import signal

    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.monitoring.workspace import start_ui, workspace_dir

        path = workspace.resolve() if workspace else workspace_dir(settings)
        process = start_ui(path, host, port, dict(os.environ))
        typer.echo(f"Evidently UI on http://{host}:{port}  (workspace {path}; Ctrl-C stops it)")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the UI too, like Ctrl-C
        # and Ctrl-C works even when started from a shell that ignores SIGINT (a background job inherits SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            try:
                code = process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a UI busy starting up may not honour SIGTERM: never hang Ctrl-C
                process.kill()
                code = process.wait()
        raise typer.Exit(code)


@feedback_app.command("ingest")
def feedback_ingest(sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """Adjudicated feedback → a DVC-versioned folder dataset; prints accuracy per model version (Prefect flow)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from flows.environment import configure_prefect
        from pipeline.errors import FeedbackError
        from pipeline.monitoring.feedback import feedback_files

        if not feedback_files(settings.feedback_log):
            raise FeedbackError(f"no clinician feedback under {settings.feedback_log}: nothing to ingest",
                                hint="feedback is given in the clinician app (`xrayops ui`); set paths.feedback_log "
                                     "if it is kept elsewhere")
        configure_prefect(settings)
        from flows.feedback import FeedbackParameters
        from flows.feedback import run as run_flow
        from pipeline.monitoring.feedback import summary_markdown

        summary = run_flow(FeedbackParameters(overrides=list(sets or []), params_path=str(params) if params else None))
        if summary.get("skipped_parts"):
            typer.secho(f"warning: skipped {summary['skipped_parts']} unreadable feedback record file(s) "
                        f"(e.g. {summary['skipped_files'][0]}): move damaged files out of the feedback folder",
                        err=True, fg="yellow")
        typer.echo(summary_markdown(summary))


# --------------------------------------------------------------------------- orchestration (Prefect server)


def _prefect_error(exc: Exception) -> None:
    typer.secho(f"error: {_one_line(exc)}", err=True, fg="red")
    raise typer.Exit(2) from None


@app.command()
def deploy(
    params: ParamsOpt = None,
    pool: Annotated[str | None, typer.Option(help="Work pool (default: orchestrate.work_pool).")] = None,
    project_dir: Annotated[Path | None, typer.Option(help="Folder holding flows/ (default: this checkout).")] = None,
    paused: Annotated[bool, typer.Option(help="Apply the schedules paused.")] = False,
    sets: SetOpt = None,
) -> None:
    """Create the work pool if missing and apply the deployments (cron schedules from orchestrate.*).

    Needs PREFECT_API_URL (a `prefect server start` server). With --params, runs read that params.yaml.
    """
    with friendly_errors():
        settings = settings_for(params, sets)
        from flows.deploy import deploy_all
        from flows.environment import check_prefect_api

        check_prefect_api(required=True)
        deployed = deploy_all(settings, project_dir=project_dir, pool=pool, params_file=params, paused=paused)
        pool_name = pool or settings.orchestrate.work_pool
        for d in deployed:
            when = f"cron '{d.cron}' ({d.timezone})" if d.cron else "no schedule (manual)"
            typer.echo(f"deployed {d.name:<32} {when}  pool {pool_name}")
        typer.echo(f"\nstart a worker:  xrayops worker --pool {pool_name}")
        typer.echo(f"run one now:     xrayops trigger training --param epochs=3   "
                   f"(or: prefect deployment run '{deployed[0].name}' --param params='{{\"epochs\": 3}}')")


@app.command()
def worker(
    pool: Annotated[str | None, typer.Option(help="Work pool (default: orchestrate.work_pool).")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name (default: generated).")] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs at once on this worker.")] = None,
    healthcheck: Annotated[bool, typer.Option(help="Serve GET :8080/health (PREFECT_WORKER_WEBSERVER_PORT).")] = False,
    params: ParamsOpt = None,
) -> None:
    """Start a Prefect process worker on the work pool (runs the deployments' flows; Ctrl-C stops it)."""
    import os
    import shutil

    with friendly_errors():
        settings = settings_for(params, None)
        from flows.environment import check_prefect_api

        check_prefect_api(required=True)  # at start only: once running, the worker rides out server restarts
        if params:
            os.environ["XRAYOPS_PARAMS"] = str(params.resolve())
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
        cmd = [prefect, "worker", "start", "--pool", pool or settings.orchestrate.work_pool, "--type", "process"]
        cmd += ["--name", name] if name else []
        cmd += ["--limit", str(limit)] if limit else []
        cmd += ["--with-healthcheck"] if healthcheck else []
        sys.stdout.flush()
        os.execv(prefect, cmd)  # the worker replaces this process: signals reach it directly


@app.command()
def trigger(
    target: Annotated[str, typer.Argument(help="training | monitoring | feedback | <flow>/<deployment>.")] = "training",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Run parameter name=value (repeatable), "
                                                    "e.g. epochs=3, model=vgg_small, require_approval=true.")] = None,
    sets: SetOpt = None,
    wait: Annotated[bool, typer.Option(help="Wait until the run ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 3600,
) -> None:
    """Start a run of a deployment with custom parameters (what the UI's "Custom run" does)."""
    with friendly_errors():
        from pipeline.runtime import configure_logging, quiet_tools

        quiet_tools()
        configure_logging()
        from flows.environment import check_prefect_api
        from flows.trigger import trigger as start_run

        check_prefect_api(required=True)  # without a server Prefect would start a temporary one with no deployments
        try:
            result = start_run(target, param or [], sets or [], wait=wait, timeout_s=timeout)
        except XrayopsError:
            raise
        except (ValueError, RuntimeError) as exc:
            _prefect_error(exc)
        _dump(result)
        if wait and result["state"] != "Completed":
            raise typer.Exit(1)


# --------------------------------------------------------------------------- model registry

registry_app = typer.Typer(help="The MLflow model registry: versions, aliases, gate verdicts, rollback.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("show")
def registry_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """List the versions of the registered model with aliases, AUC (CI), threshold, gate and approval."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.registry.contract import GateTags
        from pipeline.registry.read import overview

        with tracking_errors(settings):
            rows = overview(settings)
        if as_json:
            _dump({"model": settings.registered_model, "versions": rows})
            return
        if not rows:
            typer.echo(f"{settings.registered_model}: no versions yet (run `xrayops run`)")
            return
        typer.secho(f"{settings.registered_model}", bold=True)
        typer.echo(f"{'ver':>4}  {'aliases':<34} {'model':<16} {'test metric [CI]':<28} {'thr':<9} {'gate':<5} "
                   f"{'approval':<9} {'gradcam':<8} failed")
        for r in rows:
            typer.echo(f"{r['version']:>4}  {','.join(r['aliases']) or '-':<34} {r['model'] or '-':<16} "
                       f"{r['auc'] or '-':<28} {(r['threshold'] or '-')[:8]:<9} {r['gate']:<5} {r['approval']:<9} "
                       f"{r['gradcam']:<8} {r['failed'] if r['gate'] == GateTags.FAIL else ''}"
                       f"{'  rolled back ' + r['rolled_back'] if r['rolled_back'] else ''}")


@registry_app.command("rollback")
def registry_rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded on both versions).")],
    actor: Annotated[str | None, typer.Option(help="Who (default: $USER).")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Move `champion` back to `previous-champion`, with an audit record (tags, description, JSON artifact)."""
    import getpass

    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.registry.write import rollback

        with tracking_errors(settings):
            _dump(rollback(settings, reason=reason, actor=actor or getpass.getuser(), lock=_registry_lock(settings)))


@registry_app.command("approve")
def registry_approve(
    version: Annotated[str, typer.Argument(help="Version that passed the gate.")],
    reviewer: Annotated[str, typer.Option(help="Your name (recorded on the version).")],
    comment: Annotated[str, typer.Option(help="Why (recorded on the version).")] = "",
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approving.")] = False,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Record a reviewer's decision on a gate-passing VERSION; approval moves `champion` to it."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.registry.promote import approve_version

        with tracking_errors(settings):
            _dump(approve_version(settings, version, reviewer=reviewer, comment=comment, approve=not reject,
                                  lock=_registry_lock(settings)))


@registry_app.command("card")
def registry_card(
    version: Annotated[str, typer.Argument(help="Version number.")],
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """(Re)write the model card of VERSION and print it (markdown; its file path goes to stderr)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.registry.modelcard import publish_model_card

        with tracking_errors(settings):
            path = publish_model_card(settings, version)
        typer.echo(path.read_text())
        typer.echo(f"model card: {path}", err=True)


@registry_app.command("evidence")
def registry_evidence(
    version: Annotated[str, typer.Argument(help="Version number.")],
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """(Re)write the evidence pack of VERSION (HTML + JSON: reporting checklist, change envelope, diff against
    the champion) and print the HTML file's path."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.registry.evidence import publish_evidence

        with tracking_errors(settings):
            path = publish_evidence(settings, version)
        typer.echo(path)
        typer.echo(f"evidence pack: {path.with_suffix('.json')} (JSON)", err=True)


# --------------------------------------------------------------------------- audit log

audit_app = typer.Typer(help="The hash-chained audit log of registry and serving actions.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
AuditPathOpt = Annotated[Path | None, typer.Option("--path", help="Audit log file (default: paths.audit_log).")]


def _audit_log(path: Path | None, params: Path | None, sets: list[str] | None) -> Any:
    from pipeline.audit import AuditLog

    return AuditLog(path) if path is not None else AuditLog.of(settings_for(params, sets))


@audit_app.command("verify")
def audit_verify(path: AuditPathOpt = None, sets: SetOpt = None, params: ParamsOpt = None) -> None:
    """Check the chain: exit 0 with a summary when intact, 1 naming the first bad line otherwise."""
    with friendly_errors():
        log = _audit_log(path, params, sets)
        try:
            verdict = log.verify()
        except FileNotFoundError:
            if path is not None:
                raise
            typer.echo(f"audit log {log.path}: no records yet")
            return
        typer.echo(verdict.summary(), err=not verdict.ok)
        if not verdict.ok:
            raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    last: Annotated[int, typer.Option("--last", "-n", min=1, help="How many records, newest last.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON lines.")] = False,
    path: AuditPathOpt = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Print the last records of the audit log (it is not verified here: `xrayops audit verify`)."""
    with friendly_errors():
        log = _audit_log(path, params, sets)
        if path is not None and not log.path.exists():  # a log asked for by name must exist (as in verify)
            raise FileNotFoundError(f"no audit log at {log.path}")
        for r in log.records(last):
            if as_json:
                typer.echo(json.dumps(r, sort_keys=True))
                continue
            details = r.get("details") or {}
            phase = f" [{details['phase']}]" if isinstance(details, dict) and "phase" in details else ""
            rest = {k: v for k, v in details.items() if k != "phase"} if isinstance(details, dict) else details
            typer.echo(f"{r.get('seq')!s:>5} {r.get('time', '-')} {r.get('action', '?')}{phase} "
                       f"{r.get('model') or '-'} v{r.get('version') or '-'} by {r.get('actor') or '-'}  "
                       f"{json.dumps(rest, sort_keys=True) if rest else r.get('unreadable', '')}")


# --------------------------------------------------------------------------- PACS (hospital integration)

pacs_app = typer.Typer(help="Results back to the hospital's PACS: process a study, or listen for new ones.",
                       no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")
PacsUrlOpt = Annotated[str | None, typer.Option("--url", help="DICOMweb root of the PACS (default: "
                                                "data.dicomweb.url), e.g. http://pacs:8042/dicom-web.")]


@pacs_app.command("process")
def pacs_process(
    study: Annotated[str, typer.Option("--study", help="StudyInstanceUID of the study to process.")],
    url: PacsUrlOpt = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Score one study with the served champion and store the SR in it: exit 0 with an SR, 1 with the reason."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.pacs.process import PacsContext, pacs_client, process_study

        with pacs_client(settings, url) as client:
            client.ping()  # an unreachable PACS fails here, before the model is loaded
            _import_tensorflow_quietly()
            ctx = PacsContext(settings, client)
            ctx.refresh()
            outcome = process_study(ctx, study)
        typer.echo(outcome.line(), err=not outcome.ok)
        if not outcome.ok:
            raise typer.Exit(1)


@pacs_app.command("listen")
def pacs_listen(
    url: PacsUrlOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Process the pending stable studies, then exit.")] = False,
    max_seconds: Annotated[float | None, typer.Option("--max-seconds", min=0,
                                                      help="Stop after this many seconds.")] = None,
    sets: SetOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Process each stable study as it arrives (pacs.feed: Orthanc's change feed or QIDO; pacs.dispatch: flow |
    direct | deployment)."""
    with friendly_errors():
        settings = settings_for(params, sets)
        from pipeline.pacs.listen import OrthancChanges, QidoStudies, listen, orthanc_rest_url
        from pipeline.pacs.process import pacs_client, pacs_url

        target = pacs_url(settings, url)
        feed: Any
        if settings.pacs.feed == "qido":
            feed = QidoStudies(pacs_client(settings, target), days=settings.pacs.qido_days,
                               quiet_s=settings.pacs.qido_quiet_s)
            feed.client.ping()  # an unreachable PACS fails here, before the model is loaded
        else:
            feed = OrthancChanges(settings.pacs.orthanc_url or orthanc_rest_url(target),
                                  auth=_pacs_auth(settings), timeout_s=settings.data.dicomweb.timeout_s)
            feed.last_seq()  # an unreachable Orthanc fails here, before the model is loaded
        _import_tensorflow_quietly()
        handle, close = _pacs_handler(settings, target, params, list(sets or []))
        try:
            summary = listen(settings, feed, handle, once=once, max_seconds=max_seconds)
        finally:
            close()
            getattr(feed, "client", feed).close()
        for line in summary.outcomes:
            typer.echo(line)
        cursor = f"; cursor at change {summary.last_seq}" if summary.last_seq is not None else ""
        typer.echo(f"{summary.studies} stable studies processed ({summary.statuses or 'none'}){cursor}"
                   f"{'; a transient failure will be retried' if summary.pending_retry else ''}")


def _import_tensorflow_quietly() -> None:
    """TensorFlow without its CUDA/oneDNN start-up noise on CPU hosts, as `serve` does (the commands that train,
    evaluate, export or serve a model)."""
    from pipeline.runtime import import_tensorflow_quietly

    import_tensorflow_quietly()


def _pacs_auth(settings: Any) -> Any:
    from pipeline.pacs.dicomweb import PacsAuth

    cfg = settings.data.dicomweb
    return PacsAuth.from_env(cfg.username_env, cfg.password_env, cfg.token_env)


def _pacs_handler(settings: Any, url: str, params: Path | None, sets: list[str]) -> tuple[Any, Any]:
    """(study UID → outcome, close) for ``pacs.dispatch``: the flow in this process, a deployment run, or the
    library directly."""
    dispatch = settings.pacs.dispatch
    if dispatch == "direct":
        from pipeline.pacs.process import PacsContext, pacs_client, process_study

        client = pacs_client(settings, url)
        ctx = PacsContext(settings, client)

        def direct(study_uid: str) -> Any:
            ctx.refresh()
            return process_study(ctx, study_uid)

        return direct, client.close
    from flows.environment import configure_prefect

    configure_prefect(settings)
    if dispatch == "deployment":
        from flows.pacs import submit_deployment_run

        return (lambda study_uid: submit_deployment_run(settings, study_uid, url,
                                                        str(params) if params else None, sets)), lambda: None
    from flows.pacs import run_flow

    return (lambda study_uid: run_flow(settings, study_uid, url, str(params) if params else None,
                                       sets)), lambda: None


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
