"""Who may use the clinician app: sign-in configuration, the local user file, roles, pseudonymous user ids.

Two ways to sign in (``ui.auth``):

- ``oidc``: Streamlit's ``st.login`` against the identity provider of the ``[auth]`` block in
  ``ui.secrets_file`` (``.streamlit/secrets.toml``). The provider proves who someone is; their role
  still comes from the user file (an entry without a password, ``xrayops ui users add EMAIL --oidc``).
- ``local``: the user file itself (``ui.users_file``, default ``<home>/secrets/ui_users.json``): per
  user a role and an scrypt hash of the password (own random salt; compared in constant time).
  The file is written whole (temporary file, fsync, rename) with mode 0600, under a lock.

``auto`` picks oidc when the secrets file has an ``[auth]`` block, else local; ``none`` (no sign-in) is
for a developer's own machine and refused on any non-loopback address (:func:`resolve_auth`).

Roles: clinician (predict, feedback), adjudicator (also resolves disagreements), reviewer (promotion
approvals, done with ``xrayops registry approve``). Feedback records carry :func:`user_id_for` — a keyed
hash of the user name with the pseudonymisation salt — never the name itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.data.deid import load_salt, pseudonymise
from pipeline.durable import fsync_path
from pipeline.errors import UiAuthError
from pipeline.locking import file_lock

logger = logging.getLogger(__name__)

ROLES = ("clinician", "adjudicator", "reviewer")
PERMISSIONS: dict[str, frozenset[str]] = {
    "clinician": frozenset({"predict", "feedback"}),
    "adjudicator": frozenset({"predict", "feedback", "adjudicate"}),
    "reviewer": frozenset({"review"}),
}
MIN_PASSWORD = 12
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # 16 MiB, ≈ 50 ms per check
OIDC_KEYS = ("client_id", "client_secret", "server_metadata_url")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
ADD_USER = "xrayops ui users add NAME --role clinician"


@dataclass(frozen=True)
class UiUser:
    """A signed-in person. ``name`` is shown on their own screen only; records get ``user_id``."""

    name: str
    role: str
    user_id: str | None  # None only without sign-in (ui.auth=none): such feedback never counts as a clinician's

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())


@dataclass(frozen=True)
class AuthPlan:
    """How the app signs people in: ``mode`` (local | oidc | none) and, for oidc, the ``provider`` for st.login."""

    mode: str
    provider: str | None = None


# --------------------------------------------------------------------------- configuration


def is_loopback(host: str | None) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1; False for all-interfaces (0.0.0.0, ::, unset) and anything else."""
    if not host:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def oidc_block(secrets_file: Path) -> dict[str, Any] | None:
    """The ``[auth]`` table of a Streamlit secrets file, or None when the file or the table is absent.

    Raises:
        UiAuthError: the file exists but is not valid TOML.
    """
    if not secrets_file.is_file():
        return None
    try:
        data = tomllib.loads(secrets_file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UiAuthError(f"{secrets_file} is not valid TOML ({exc})",
                          hint="fix the file (Streamlit secrets format) or point ui.secrets_file elsewhere") from None
    block = data.get("auth")
    return block if isinstance(block, dict) else None


def oidc_provider(block: dict[str, Any], secrets_file: Path) -> str | None:
    """The provider ``st.login`` is called with (None = the default one in ``[auth]`` itself).

    Raises:
        UiAuthError: redirect_uri / cookie_secret missing or weak, or no provider with client_id,
            client_secret and server_metadata_url.
    """
    where = f"the [auth] block of {secrets_file}"
    redirect = str(block.get("redirect_uri") or "")
    if not redirect.endswith("/oauth2callback"):
        raise UiAuthError(f"{where} needs redirect_uri = \"<app URL>/oauth2callback\" (found {redirect[:60]!r})",
                          hint="set it to the URL the identity provider sends people back to, e.g. "
                               "https://xray.example.org/oauth2callback")
    if len(str(block.get("cookie_secret") or "")) < 32:
        raise UiAuthError(f"{where} needs a cookie_secret of at least 32 characters (it signs the login cookie)",
                          hint="cookie_secret = the output of "
                               "`python -c 'import secrets; print(secrets.token_hex(32))'`")
    if all(block.get(k) for k in OIDC_KEYS):
        return None
    for name, sub in block.items():
        if isinstance(sub, dict) and all(sub.get(k) for k in OIDC_KEYS):
            return str(name)
    raise UiAuthError(f"{where} names no identity provider with {', '.join(OIDC_KEYS)}",
                      hint="add them to [auth] (one provider) or to [auth.<name>] (see Streamlit's st.login docs)")


def resolve_auth(settings: Settings, host: str | None) -> AuthPlan:
    """Decide how the app signs people in when it listens on ``host``; refuse unsafe or incomplete set-ups.

    Raises:
        UiAuthError: no sign-in on a non-loopback address; oidc without a usable [auth] block; any
            sign-in without a user file holding at least one user (roles come from it).
    """
    mode = settings.ui.auth
    secrets_file = settings.ui_secrets_file
    block = oidc_block(secrets_file) if mode in ("auto", "oidc") else None
    if mode == "auto":
        mode = "oidc" if block is not None else "local"
    if mode == "none":
        if not is_loopback(host):
            raise UiAuthError(f"refusing to serve the clinician app on {host or 'all interfaces'} without sign-in "
                              "(ui.auth=none)",
                              hint=f"set ui.auth=local and add users (`{ADD_USER}`), or ui.auth=oidc; "
                                   "or bind to 127.0.0.1")
        return AuthPlan("none")
    provider = None
    if mode == "oidc":
        if block is None:
            raise UiAuthError(f"ui.auth=oidc but {secrets_file} has no [auth] block",
                              hint="add [auth] with redirect_uri, cookie_secret, client_id, client_secret and "
                                   "server_metadata_url, or set ui.secrets_file")
        provider = oidc_provider(block, secrets_file)
    users = UserStore(settings.ui_users_file).load()
    wanted = [u for u in users.values() if (u.get("password") is not None) == (mode == "local")]
    if not wanted:
        kind = "with a password" if mode == "local" else "for OIDC sign-in (added with --oidc)"
        raise UiAuthError(f"the clinician app signs people in ({mode}) but {settings.ui_users_file} holds no user "
                          f"{kind}",
                          hint=f"add one: `{ADD_USER}`" + (" --oidc" if mode == "oidc" else "")
                          + " (or ui.auth=none on 127.0.0.1 for a local try-out)")
    return AuthPlan(mode, provider)


# --------------------------------------------------------------------------- passwords and the user file


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """scrypt hash of ``password`` with a fresh 16-byte salt (or ``salt``); parameters kept beside it."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT["n"], r=SCRYPT["r"], p=SCRYPT["p"],
                            dklen=SCRYPT["dklen"], maxmem=64 * 1024 * 1024)
    return {"algorithm": "scrypt", **SCRYPT, "salt": salt.hex(), "hash": digest.hex()}


def verify_password(password: str, stored: dict[str, Any]) -> bool:
    """True when ``password`` matches ``stored`` (constant-time comparison of the derived keys)."""
    try:
        digest = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(stored["salt"]), n=int(stored["n"]),
                                r=int(stored["r"]), p=int(stored["p"]), dklen=int(stored["dklen"]),
                                maxmem=64 * 1024 * 1024)
        return hmac.compare_digest(digest, bytes.fromhex(stored["hash"]))
    except (KeyError, ValueError, TypeError):
        return False


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UiAuthError(f"user name {name[:40]!r} is not usable: letters, digits and . _ @ + - only, 1-128 "
                          "characters, starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UiAuthError(f"the password has {len(password)} characters; at least {MIN_PASSWORD} are required")
    return password


class UserStore:
    """The local user file: ``{"users": {name: {"role", "password": scrypt dict | null, "created_at"}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        """All users (empty when the file does not exist).

        Raises:
            UiAuthError: unreadable, malformed, or readable by other users (it holds password hashes).
        """
        if not self.path.exists():
            return {}
        if stat.S_IMODE(self.path.stat().st_mode) & 0o077:
            raise UiAuthError(f"the UI user file {self.path} can be read or written by other users",
                              hint=f"chmod 600 {self.path}")
        try:
            data = json.loads(self.path.read_text())
            users = data["users"]
            if not isinstance(users, dict) or any(u.get("role") not in ROLES for u in users.values()):
                raise ValueError("every user needs a role of " + ", ".join(ROLES))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UiAuthError(f"the UI user file {self.path} is not usable ({type(exc).__name__}: {exc})",
                              hint=f"restore it from a backup or delete it and add users again (`{ADD_USER}`)"
                              ) from None
        return users

    def authenticate(self, name: str, password: str) -> str | None:
        """The user's role when ``name`` has a password and it matches, else None (same work either way)."""
        entry = self.load().get(name)
        stored = (entry or {}).get("password")
        if stored is None:
            verify_password(password, _DUMMY)  # no early exit: an unknown name costs as much as a wrong password
            return None
        return entry["role"] if verify_password(password, stored) else None  # type: ignore[index]

    def role_of(self, name: str, *, casefold: bool = False) -> str | None:
        """The role of ``name`` (None when absent); ``casefold`` for e-mail addresses from an identity provider."""
        users = self.load()
        entry = users.get(name)
        if entry is None and casefold:
            entry = next((e for n, e in users.items() if n.casefold() == name.casefold()), None)
        return entry["role"] if entry else None

    def add(self, name: str, role: str, password: str | None, *, replace: bool = False) -> None:
        """Add (or with ``replace``, update) a user; ``password`` None = an OIDC user (role only).

        Raises:
            UiAuthError: bad name, role or password; the user exists and ``replace`` is off.
        """
        check_name(name)
        if role not in ROLES:
            raise UiAuthError(f"role {role!r} is not one of {', '.join(ROLES)}")
        entry = {"role": role, "password": hash_password(check_password(password)) if password is not None else None,
                 "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        with self._locked():
            users = self.load()
            if name in users and not replace:
                raise UiAuthError(f"user {name!r} already exists in {self.path}",
                                  hint="pass --replace to change their role or password")
            users[name] = entry
            self._write(users)

    def remove(self, name: str) -> None:
        with self._locked():
            users = self.load()
            if name not in users:
                raise UiAuthError(f"no user {name[:40]!r} in {self.path}", hint="`xrayops ui users list` shows them")
            del users[name]
            self._write(users)

    def _locked(self) -> Any:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return file_lock(self.path.with_name(f".{self.path.name}.lock"), what=f"UI user file {self.path}",
                         timeout_s=10, setting="nothing: the wait is fixed at 10 s",
                         busy=UiAuthError)

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "users": users}, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            fsync_path(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)


_DUMMY = hash_password("not a password of anyone", salt=b"\0" * 16)


# --------------------------------------------------------------------------- sign-in throttling, pseudonyms


class LoginThrottle:
    """Failed local sign-ins per user name (this process): ``max_failures`` in a row lock the name for ``lockout_s``."""

    def __init__(self, max_failures: int, lockout_s: float, clock: Any = time.monotonic) -> None:
        self.max_failures, self.lockout_s, self.clock = max_failures, lockout_s, clock
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def locked_for(self, name: str) -> float:
        """Seconds ``name`` stays locked (0 = may try)."""
        key = name.lower()
        with self._lock:
            return max(0.0, self._locked_until.get(key, 0.0) - self.clock())

    def failed(self, name: str) -> None:
        key = name.lower()
        with self._lock:
            count = self._failures.get(key, 0) + 1
            if count >= self.max_failures:
                self._locked_until[key] = self.clock() + self.lockout_s
                count = 0
                logger.warning("clinician app: a user name was locked for %.0f s after %d failed sign-ins",
                               self.lockout_s, self.max_failures)
            self._failures[key] = count

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name.lower(), None)


def user_id_for(settings: Settings, name: str) -> str:
    """Pseudonymous id of a user (``U`` + 16 hex digits): keyed hash with the pseudonymisation salt."""
    salt = load_salt(settings.data.ingest.salt_env, settings.home)
    return pseudonymise(f"ui-user:{name.strip().lower()}", salt, prefix="U")
