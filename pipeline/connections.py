"""Talking about services safely: URIs fit to print, and why a connection failed, in words.

Shared by the MLflow edge (:mod:`pipeline.tracking`), the Prefect edge (:mod:`flows.environment`)
and DVC remotes (:mod:`pipeline.data.versioning`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

# errno values of a host name that does not resolve (glibc EAI_*, macOS, Windows)
UNRESOLVED_ERRNOS = (-2, -3, -5, 8, 11001)


def mask_uri(uri: str) -> str:
    """``uri`` with the password of a ``user:password@`` part replaced by ``***`` (for messages and logs)."""
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        return re.sub(r"(://[^/@:]*):[^@]*@", r"\1:***@", uri, count=1)
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    return uri.replace(netloc, f"{userinfo.split(':', 1)[0]}:***@{host}", 1)


def has_credentials(uri: str | None) -> bool:
    """Whether ``uri`` carries a ``user[:password]@`` part."""
    try:
        return bool(uri) and "@" in urlsplit(str(uri)).netloc
    except ValueError:
        return "@" in str(uri)


def connection_reason(exc: BaseException) -> str:
    """Why a connection failed, in words: the deepest OS error of the chain (e.g. "connection refused"),
    else the exception type."""
    deepest: OSError | None = None
    for link in exception_chain(exc):
        if isinstance(link, OSError) and link.strerror:
            deepest = link
    if deepest is None:
        return type(exc).__name__
    return "host name not resolved" if deepest.errno in UNRESOLVED_ERRNOS else str(deepest.strerror).lower()


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (cause, context, a urllib3 ``reason``, exception arguments)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        link = stack.pop()
        if not isinstance(link, BaseException) or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        stack += [*(a for a in link.args if isinstance(a, BaseException)), getattr(link, "reason", None),
                  link.__context__, link.__cause__]
