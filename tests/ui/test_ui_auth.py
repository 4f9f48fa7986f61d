"""Sign-in of the clinician app without a browser: the user file, passwords, throttling, pseudonymous ids, and the
configuration rules (OIDC block, refusal off loopback). A real identity provider cannot run offline: the OIDC tests
cover how the [auth] block is read and checked, not a login round trip."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Settings
from pipeline.errors import UiAuthError
from pipeline.ui.auth import (
    AuthPlan,
    LoginThrottle,
    UserStore,
    hash_password,
    is_loopback,
    resolve_auth,
    user_id_for,
    verify_password,
)
from tests.conftest import REPO

PASSWORD = "correct horse battery"
OIDC = """[auth]
redirect_uri = "https://xray.example.org/oauth2callback"
cookie_secret = "0123456789abcdef0123456789abcdef"
{provider}
client_id = "xrayops"
client_secret = "s3cret"
server_metadata_url = "https://idp.example.org/.well-known/openid-configuration"
"""


def test_passwords_are_salted_scrypt_hashes_checked_in_constant_time() -> None:
    one, two = hash_password(PASSWORD), hash_password(PASSWORD)
    assert one["algorithm"] == "scrypt" and one["n"] >= 2**14 and len(bytes.fromhex(one["salt"])) == 16
    assert one["hash"] != two["hash"], "a salt per user: equal passwords, different hashes"
    assert verify_password(PASSWORD, one) and verify_password(PASSWORD, two)
    assert not verify_password(PASSWORD + "x", one) and not verify_password(PASSWORD, {"hash": "zz"})


def test_the_user_file_is_private_whole_and_holds_no_password(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "secrets" / "ui_users.json")
    store.add("alice", "clinician", PASSWORD)
    store.add("dr.who@example.org", "adjudicator", None)  # OIDC user: role only
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert PASSWORD not in store.path.read_text() and list(tmp_path.joinpath("secrets").glob("*.tmp")) == []
    assert store.authenticate("alice", PASSWORD) == "clinician"
    assert store.authenticate("alice", "wrong password!") is None
    assert store.authenticate("dr.who@example.org", "") is None, "an OIDC user has no password to sign in with"
    assert store.authenticate("nobody", PASSWORD) is None
    assert store.role_of("DR.WHO@example.org", casefold=True) == "adjudicator"
    with pytest.raises(UiAuthError, match="already exists"):
        store.add("alice", "reviewer", PASSWORD)
    store.add("alice", "reviewer", PASSWORD, replace=True)
    assert store.role_of("alice") == "reviewer"
    for name, role, password, match in (("../x", "clinician", PASSWORD, "not usable"),
                                        ("eve", "admin", PASSWORD, "not one of clinician"),
                                        ("eve", "clinician", "short", "at least 12")):
        with pytest.raises(UiAuthError, match=match):
            store.add(name, role, password)
    store.remove("alice")
    assert store.role_of("alice") is None
    os.chmod(store.path, 0o644)
    with pytest.raises(UiAuthError, match="other users") as err:
        store.load()
    assert err.value.hint == f"chmod 600 {store.path}"
    os.chmod(store.path, 0o600)
    store.path.write_text('{"users": {"x": {"role": "root"}}}')
    with pytest.raises(UiAuthError, match="not usable"):
        store.load()


def test_failed_sign_ins_lock_the_name_for_a_while() -> None:
    now = [0.0]
    throttle = LoginThrottle(3, 60, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("Alice")
    assert throttle.locked_for("alice") == 0
    throttle.succeeded("alice")  # a success resets the count
    for _ in range(3):
        throttle.failed("alice")
    assert throttle.locked_for("ALICE") == 60 and throttle.locked_for("bob") == 0
    now[0] = 59.5
    assert throttle.locked_for("alice") == 0.5
    now[0] = 61
    assert throttle.locked_for("alice") == 0


def test_user_ids_are_keyed_pseudonyms(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings()
    monkeypatch.setenv(settings.data.ingest.salt_env, "a" * 64)
    uid = user_id_for(settings, "alice")
    assert uid.startswith("U") and len(uid) == 17 and "alice" not in uid
    assert user_id_for(settings, " Alice ") == uid and user_id_for(settings, "bob") != uid
    monkeypatch.setenv(settings.data.ingest.salt_env, "b" * 64)
    assert user_id_for(settings, "alice") != uid, "another salt, another pseudonym"


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                 ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                                 ("", False), (None, False), ("10.1.2.3", False),
                                                 ("xray.example.org", False)])
def test_loopback_addresses(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_sign_in_configuration_is_resolved_or_refused(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert (settings.ui.auth, settings.ui_users_file) == ("auto", settings.home / "secrets" / "ui_users.json")
    none = make_settings("ui.auth=none")
    assert resolve_auth(none, "127.0.0.1").mode == "none"
    for host in ("0.0.0.0", None, "192.168.1.5"):
        with pytest.raises(UiAuthError, match="refusing to serve the clinician app .* without sign-in"):
            resolve_auth(none, host)
    with pytest.raises(UiAuthError, match="holds no user with a password") as err:
        resolve_auth(settings, "127.0.0.1")  # auto → local, and nobody can sign in
    assert "xrayops ui users add NAME --role clinician" in (err.value.hint or "")
    UserStore(settings.ui_users_file).add("alice", "clinician", PASSWORD)
    assert resolve_auth(settings, "0.0.0.0").mode == "local"

    secrets = settings.ui_secrets_file
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text(OIDC.format(provider=""))
    with pytest.raises(UiAuthError, match="no user for OIDC sign-in"):
        resolve_auth(settings, "0.0.0.0")  # auto → oidc: roles still come from the user file
    UserStore(settings.ui_users_file).add("dr.who@example.org", "clinician", None)
    assert resolve_auth(settings, "0.0.0.0") == AuthPlan("oidc", None)
    secrets.write_text(OIDC.format(provider="[auth.hospital]"))
    assert resolve_auth(settings, "0.0.0.0").provider == "hospital"
    for broken, match in (("redirect_uri = \"https://x/\"", "redirect_uri"),
                          ("cookie_secret = \"short\"", "cookie_secret of at least 32"),
                          ("client_secret = \"\"", "no identity provider")):
        key = broken.split(" = ")[0]
        text = "\n".join(broken if line.startswith(f"{key} =") else line
                         for line in OIDC.format(provider="").splitlines())
        secrets.write_text(text)
        with pytest.raises(UiAuthError, match=match):
            resolve_auth(settings, "0.0.0.0")
    secrets.write_text("[auth\n")
    with pytest.raises(UiAuthError, match="not valid TOML"):
        resolve_auth(settings, "0.0.0.0")
    secrets.unlink()
    with pytest.raises(UiAuthError, match="ui.auth=oidc but .* has no \\[auth\\] block"):
        resolve_auth(make_settings("ui.auth=oidc"), "127.0.0.1")


def test_users_add_reads_the_password_from_stdin_never_from_the_command_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    users = tmp_path / "users.json"
    base = ["--params", str(params), "--set", f"ui.users_file={users}"]
    runner = CliRunner()
    out = runner.invoke(app, ["ui", "users", "add", "alice", "--role", "adjudicator", "--password-stdin", *base],
                        input=f"{PASSWORD}\n")
    assert out.exit_code == 0, out.output
    assert UserStore(users).authenticate("alice", PASSWORD) == "adjudicator" and PASSWORD not in users.read_text()
    out = runner.invoke(app, ["ui", "users", "add", "bob", *base], input=f"{PASSWORD}\n{PASSWORD}\n")  # prompted
    assert out.exit_code == 0 and UserStore(users).authenticate("bob", PASSWORD) == "clinician", out.output
    out = runner.invoke(app, ["ui", "users", "add", "dr@example.org", "--oidc", *base])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["ui", "users", "list", *base])
    assert out.output.split() == ["alice", "adjudicator", "password", "bob", "clinician", "password",
                                  "dr@example.org", "clinician", "oidc"]
    out = runner.invoke(app, ["ui", "users", "add", "carol", "--password", PASSWORD, *base])
    assert out.exit_code != 0 and "No such option" in out.output, "no option takes a password"
    out = runner.invoke(app, ["ui", "users", "remove", "bob", *base])
    assert out.exit_code == 0 and UserStore(users).role_of("bob") is None


@pytest.mark.slow
def test_the_ui_refuses_to_listen_beyond_loopback_without_sign_in(tmp_path: Path) -> None:
    """The real entry point, in a subprocess: one line, exit 2, and no Streamlit started."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    env = {**os.environ, "XRAYOPS_SET": ""}
    cmd = [sys.executable, "-m", "pipeline.cli", "ui", "--host", "0.0.0.0", "--port", "1", "--params", str(params)]
    out = subprocess.run([*cmd, "--set", "ui.auth=none"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: refusing to serve the clinician app on 0.0.0.0 without sign-in"), out.stderr
    assert lines[1].startswith("hint: set ui.auth=local") and len(lines) == 2 and "Traceback" not in out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)  # auto → local, no users
    assert out.returncode == 2 and "holds no user with a password" in out.stderr, out.stderr
    assert out.stderr.count("error:") == 1
