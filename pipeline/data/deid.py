"""Pseudonymisation of patient identifiers.

Patient identifiers are replaced at ingestion by a keyed hash (HMAC-SHA256 with a
secret salt). The salt comes from the environment variable named in
``data.ingest.salt_env``; when that is unset, a random salt is created once under
``<home>/secrets/`` (git-ignored, mode 0600) so pseudonyms stay stable on one
machine. The salt is never logged, committed or written next to the data.

A salt shorter than :data:`MIN_SALT_BYTES` is refused, from either place: with an empty
or short key, pseudonyms of short identifiers (a 7-digit MRN) are reversed by trying
every value in about a second. The file is created whole or not at all (written and
flushed under a temporary name, then hard-linked into place, which never replaces an
existing file), so processes creating it at once all end up with the first one's salt
and no reader ever sees a half-written file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import uuid
from pathlib import Path

from pipeline.durable import fsync_path
from pipeline.errors import SaltError

logger = logging.getLogger(__name__)

SALT_FILE = "pseudonym_salt"
MIN_SALT_BYTES = 32
NEW_SALT = "python -c 'import secrets; print(secrets.token_hex(32))'"


def load_salt(env_var: str, home: Path) -> bytes:
    """Return the pseudonymisation salt from ``$env_var`` or the local secret file (created when missing).

    Raises:
        SaltError: the salt is set but empty or shorter than :data:`MIN_SALT_BYTES`, or the file
            cannot be created.
    """
    if env_var in os.environ:  # set but empty counts as set: a blank deployment secret must not pass
        salt = os.environ[env_var].encode()
        _check_length(salt, f"${env_var}", hint=f"set {env_var} to a random value of at least {MIN_SALT_BYTES} "
                      f"bytes (e.g. `{NEW_SALT}`), the same on every machine; unset it to use the local salt file")
        return salt
    path = home / "secrets" / SALT_FILE
    if not path.exists():
        _create_salt_file(path, env_var)
    salt = path.read_bytes().strip()
    _check_length(salt, f"the salt file {path}", hint=(
        f"an empty or short file is left by a crash while it was created, or was edited by hand. If nothing was "
        f"ingested with it yet, delete it and rerun (a new salt is created); otherwise restore it from your backup "
        f"or set {env_var} to the salt the data was pseudonymised with"))
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        logger.warning("the pseudonymisation salt file %s can be read by other users: chmod 600 it", path)
    return salt


def _check_length(salt: bytes, where: str, hint: str) -> None:
    if len(salt) < MIN_SALT_BYTES:
        what = "is empty" if not salt else f"holds {len(salt)} bytes"
        raise SaltError(f"pseudonymisation salt from {where} {what}; at least {MIN_SALT_BYTES} are needed, or "
                        "pseudonyms can be reversed by trying every identifier", hint=hint)


def _create_salt_file(path: Path, env_var: str) -> None:
    """Create ``path`` with a new random salt, whole or not at all; if another process wins, keep its file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces: the first creator wins
        except FileExistsError:
            return  # another process created it first: everyone uses that salt
        except OSError as exc:
            raise SaltError(f"cannot create the pseudonymisation salt file {path}: {exc.strerror} (its file system "
                            "must allow hard links, which make creating it atomic)",
                            hint=f"set {env_var} to a random value of at least {MIN_SALT_BYTES} bytes "
                            f"(e.g. `{NEW_SALT}`), or move paths.home to a local disk") from exc
        fsync_path(path.parent)
        logger.info("created a local pseudonymisation salt under %s (set %s to share one)", path.parent, env_var)
    finally:
        tmp.unlink(missing_ok=True)


def pseudonymise(identifier: str, salt: bytes, prefix: str = "P") -> str:
    """Map an identifier to a stable, non-reversible pseudonym (``P`` + 16 hex digits)."""
    digest = hmac.new(salt, identifier.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:16]}"


def age_band(age: float | None) -> str | None:
    """Ten-year age band; ages of 90 and over are pooled (HIPAA safe harbour)."""
    if age is None or age != age or age < 0:
        return None
    if age >= 90:
        return "90+"
    low = int(age // 10) * 10
    return f"{low}-{low + 9}"
