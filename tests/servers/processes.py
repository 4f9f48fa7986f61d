"""Real servers for integration tests: PostgreSQL, an MLflow tracking server, a Prefect server.

Each runs in its own process group on a free loopback port, is health-checked, and is
stopped by signalling the whole group (then SIGKILL), so no child process outlives a test.
PostgreSQL comes from the machine (``infra/scripts/ensure-postgres.sh`` installs it); as
root it runs as the ``postgres`` (or ``nobody``) user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin_dir() -> Path | None:
    """Folder of initdb/postgres: on PATH or the newest /usr/lib/postgresql/*/bin; None when absent."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class Group:
    """A process started in its own session (= process group), with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - another user's group: still there
            return True
        return True

    def stop(self, grace_s: float = 15.0) -> None:
        """Signal the whole group, wait, then SIGKILL whatever is left; reap the leader."""
        for sig, wait in ((self.stop_signal, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                if not self.alive():
                    break
                time.sleep(0.1)
            if not self.alive():
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(name: str, cmd: list[str], log_dir: Path, env: dict[str, str | None] | None = None, *,
          user: str | None = None, stop_signal: int = signal.SIGTERM, cwd: Path | None = None) -> Group:
    """Start ``cmd`` in a new session; ``env`` values of None remove the variable."""
    full = {**os.environ, **QUIET}
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full, start_new_session=True,
                                user=user, cwd=cwd)
    return Group(name, proc, log, stop_signal)


def wait_until(check: Callable[[], bool], group: Group, timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; fail with the log tail when the process died or time ran out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if group.proc.poll() is not None:
            raise RuntimeError(f"{group.name} exited with {group.proc.returncode} before {what}:\n{group.tail()}")
        try:
            if check():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not up yet (any client error)
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{group.name}: no {what} after {timeout_s:.0f} s:\n{group.tail()}")


def http_ok(url: str, auth: tuple[str, str] | None = None) -> Callable[[], bool]:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()

    def check() -> bool:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as resp:
            return bool(resp.status == 200)

    return check


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    port: int
    group: Group
    data_dir: Path
    user: str = "xrayops"
    databases: list[str] = field(default_factory=list)

    def url(self, database: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=database)

    def create_database(self, name: str) -> None:
        conn = self.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        self.databases.append(name)

    def stop(self) -> None:
        self.group.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _service_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def start_postgres(bin_dir: Path, log_dir: Path, timeout_s: float = 60) -> Postgres:
    """initdb a throw-away cluster (trust auth, loopback only, no fsync) and start it."""
    user = _service_user()
    data_root = Path(tempfile.mkdtemp(prefix="xrayops-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    data = data_root / "data"
    if user:
        info = pwd.getpwnam(user)
        os.chown(data_root, info.pw_uid, info.pw_gid)
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "xrayops", "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--no-instructions"], check=True, capture_output=True, user=user, cwd=data_root)
    port = free_port()
    cmd = [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data_root),
           "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]
    group = start("postgres", cmd, log_dir, user=user, stop_signal=signal.SIGINT, cwd=data_root)  # SIGINT = fast stop
    pg = Postgres(port, group, data_root)
    wait_until(lambda: pg.connect().close() is None, group, timeout_s, "accepted connections")
    return pg


# --------------------------------------------------------------------------- MLflow, Prefect


def start_mlflow(backend_uri: str, artifacts: Path, log_dir: Path) -> tuple[str, Group]:
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return f"http://127.0.0.1:{port}", start("mlflow", cmd, log_dir)


def start_prefect(database_url: str, home: Path, log_dir: Path, *, ui: bool = False) -> tuple[str, Group]:
    """A Prefect server; with ``ui`` it also serves its web UI at the same address (``.../api`` stripped)."""
    port = free_port()
    env: dict[str, str | None] = {
        "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": database_url, "PREFECT_API_URL": None,
        "PREFECT_UI_ENABLED": "true" if ui else "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # what the UI's JavaScript calls
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return f"http://127.0.0.1:{port}/api", start("prefect-server", cmd, log_dir, env)


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids (other than this one) whose environment has ``key=value`` (Linux /proc)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes_with_env(key: str, value: str) -> list[int]:
    """SIGKILL the process groups of every process started with ``key=value`` (e.g. orphaned flow runs)."""
    pids = processes_with_env(key, value)
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


# --------------------------------------------------------------------------- Orthanc (a real PACS)

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
ORTHANC_DICOMWEB_PLUGIN = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"


def orthanc_missing() -> str | None:
    """Why Orthanc + its DICOMweb plugin cannot run here (a skip reason), or None when both are installed."""
    exe = shutil.which("Orthanc") or (str(ORTHANC_BIN) if ORTHANC_BIN.exists() else None)
    if exe is None or not ORTHANC_DICOMWEB_PLUGIN.exists():
        return ("Orthanc with its DICOMweb plugin is not installed (/usr/sbin/Orthanc, "
                f"{ORTHANC_DICOMWEB_PLUGIN}): run `bash infra/scripts/ensure-orthanc.sh` (CI does) "
                "to run the PACS tests")
    return None


@dataclass
class Orthanc:
    """A throw-away Orthanc on loopback: REST API at ``http_url``, DICOMweb at ``dicomweb_url``, C-STORE SCP at
    127.0.0.1:``dicom_port`` with AE title ``aet``."""

    http_url: str
    dicom_port: int
    aet: str
    group: Group
    storage_dir: Path

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    def stop(self) -> None:
        self.group.stop()


def start_orthanc(log_dir: Path, storage_dir: Path, *, aet: str = "XRAYOPS_PACS", stable_age_s: int = 1,
                  users: dict[str, str] | None = None, timeout_s: float = 60) -> Orthanc:
    """Start Orthanc (DICOMweb on, no auth, loopback only, random free ports, storage/index under ``storage_dir``)
    and wait until ``/system`` answers.

    Orthanc 1.10 has no bind-address option: ``RemoteAccessAllowed: false`` refuses HTTP from anything but
    localhost; the DICOM port is a random high port. Only the DICOMweb plugin is loaded (the other Debian
    plugins, worklists and serve-folders, are not needed and would read more configuration). ``users``
    (name → password) turns HTTP basic auth on for the REST API and DICOMweb alike (health is then
    checked with the first user)."""
    reason = orthanc_missing()
    if reason:
        raise FileNotFoundError(reason)
    storage_dir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:  # pragma: no cover - the kernel rarely hands out the same port twice
        dicom_port = free_port()
    config = {
        "Name": "xrayops-test-pacs", "StorageDirectory": str(storage_dir / "storage"),
        "IndexDirectory": str(storage_dir / "index"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
        **({"RegisteredUsers": users} if users else {}),
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": stable_age_s, "DicomCheckCalledAet": False, "HttpTimeout": 30, "ConcurrentJobs": 2,
    }
    cfg = storage_dir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    group = start("orthanc", [shutil.which("Orthanc") or str(ORTHANC_BIN), str(cfg)], log_dir)
    orthanc = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, aet, group, storage_dir)
    try:
        wait_until(http_ok(f"{orthanc.http_url}/system", auth=next(iter(users.items())) if users else None), group,
                   timeout_s, "healthy /system")
    except BaseException:
        group.stop()
        raise
    return orthanc
