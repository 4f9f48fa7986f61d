"""Pseudonymisation of patient identifiers.

Patient identifiers are replaced at ingestion by a keyed hash (HMAC-SHA256 with a
secret salt). The salt comes from the environment variable named in
``data.ingest.salt_env``; when that is unset, a random salt is created once under
``<home>/secrets/`` (git-ignored, mode 0600) so pseudonyms stay stable on one
machine. The salt is never logged, committed or written next to the data.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

SALT_FILE = "pseudonym_salt"


def load_salt(env_var: str, home: Path) -> bytes:
    """Return the pseudonymisation salt from ``$env_var`` or the local secret file."""
    value = os.environ.get(env_var)
    if value:
        return value.encode()
    path = home / "secrets" / SALT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        logger.info("created a local pseudonymisation salt under %s (set %s to share one)", path.parent, env_var)
    return path.read_text().strip().encode()


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
