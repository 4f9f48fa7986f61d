"""DVC access: version a raw dataset folder and read a dataset by (repo, path, rev).

Uses DVC's Python API in-process (no CLI round trips). The remote named
``xrayops`` is written to the repo's *local* config (``.dvc/config.local``, not
committed) from ``paths.dvc_remote``, so production switches to S3/MinIO by setting
only. Analytics and update checks are off (see :func:`pipeline.runtime.quiet_tools`).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import VersioningError

logger = logging.getLogger(__name__)

REMOTE_NAME = "xrayops"


@dataclass(frozen=True)
class DatasetVersion:
    """Where a dataset version lives and its content hash."""

    repo: str
    path: str
    rev: str | None
    dvc_md5: str
    nfiles: int | None
    pushed: bool
    commit: str | None = None  # the git commit ``rev`` resolved to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quiet_dvc_console() -> None:
    """DVC's own console output at WARNING. ``import dvc`` sets its logger to INFO with handlers of its own on
    stdout, so its hints ("To track the changes with git, run: …") were printed twice in a run, raw and again
    through our log. Our one line per step says what was versioned; DVC's warnings and errors still show."""
    logging.getLogger("dvc").setLevel(logging.WARNING)


def find_repo_root(path: Path) -> Path:
    """The DVC repo containing ``path``.

    Raises:
        VersioningError: ``path`` is not inside a DVC repository.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    _quiet_dvc_console()
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    try:
        return Path(Repo.find_root(str(probe)))
    except NotDvcRepoError:
        raise VersioningError(
            f"{path} is not inside a DVC repository. Run `git init && dvc init` in the project, "
            "or set data.version_with_dvc=false to skip versioning."
        ) from None


def git_head(root: Path) -> str | None:
    """The git commit of ``root`` (None outside git or before the first commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


@contextmanager
def open_repo(root: Path) -> Iterator[Any]:
    """The DVC ``Repo`` at ``root``, closed after use.

    Raises:
        VersioningError: DVC cannot open it (no git repository around it, a broken ``.dvc/config``).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.scm import SCMError

    _quiet_dvc_console()
    try:
        repo = Repo(str(root))
    except SCMError as exc:
        raise VersioningError(f"cannot open the DVC repository {root}: {exc}",
                              hint="DVC records dataset versions in git: run `git init` there (or `dvc config "
                                   "core.no_scm true` to use DVC without git), or set data.version_with_dvc=false"
                              ) from None
    except DvcException as exc:
        raise VersioningError(f"cannot open the DVC repository {root}: {exc}",
                              hint="fix or remove the offending setting in .dvc/config(.local)") from None
    with repo:
        yield repo


def ensure_remote(root: Path, url: str) -> None:
    """Point the local-config remote ``xrayops`` at ``url`` and make it the default.

    Raises:
        VersioningError: the remote folder cannot be created or the config not written.
    """
    from dvc.exceptions import DvcException

    from pipeline.connections import mask_uri

    if "://" not in url:
        try:
            Path(url).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VersioningError(f"cannot create the DVC remote folder {url}: {exc.strerror or exc}",
                                  hint="set paths.dvc_remote to a writable folder or a remote URL (s3://…), "
                                       "or set data.dvc_push=false") from None
    with open_repo(root) as repo:
        try:
            with repo.config.edit(level="local") as conf:
                conf["remote"][REMOTE_NAME] = {"url": url}
                conf["core"]["remote"] = REMOTE_NAME
        except DvcException as exc:
            raise VersioningError(f"cannot set the DVC remote {REMOTE_NAME} to {mask_uri(url)} in {root}: {exc}",
                                  hint="check paths.dvc_remote") from None


def track(path: Path, *, remote_url: str | None, push: bool) -> DatasetVersion:
    """``dvc add`` a raw dataset folder (and push it); returns its version.

    Re-running on unchanged data is cheap and gives the same hash.
    """
    from dvc.exceptions import DvcException

    from pipeline.connections import mask_uri

    root = find_repo_root(path)
    rel = path.resolve().relative_to(root).as_posix()
    with open_repo(root) as repo:
        try:
            owner = _stage_owning(repo, path)
        except DvcException as exc:  # a dvc.yaml DVC cannot read
            raise VersioningError(f"cannot read the DVC stages of {root}: {exc}",
                                  hint="fix dvc.yaml (`dvc status` shows the problem)") from None
        if owner:
            raise VersioningError(
                f"{rel} is an output of dvc.yaml stage '{owner}'; version it with `dvc repro`/`dvc commit`, "
                "or point data.input elsewhere."
            )
        try:
            stages = repo.add(str(path))
        except Exception as exc:  # noqa: BLE001 - DVC raises its own error types; say what to do
            raise VersioningError(f"`dvc add {rel}` failed: {exc}") from None
        out = stages[0].outs[0]
        md5 = str(out.hash_info.value)
        nfiles = getattr(out.meta, "nfiles", None)
    pushed = False
    if push and remote_url:
        ensure_remote(root, remote_url)
        with open_repo(root) as repo:
            try:
                repo.push(targets=[str(path)], remote=REMOTE_NAME)
            except Exception as exc:  # noqa: BLE001 - DVC's push errors vary by remote; say which push failed
                raise VersioningError(f"`dvc push` of {rel} to {mask_uri(remote_url)} failed: {exc}",
                                      hint="check paths.dvc_remote and its credentials, or set data.dvc_push=false "
                                           "to version without pushing") from None
        pushed = True
    head = git_head(root)
    version = DatasetVersion(repo=str(root), path=rel, rev=head, dvc_md5=md5, nfiles=nfiles, pushed=pushed,
                             commit=head)
    logger.info("dataset %s versioned with DVC: md5=%s files=%s pushed=%s", rel, md5, nfiles, pushed)
    return version


def _stage_owning(repo: Any, path: Path) -> str | None:
    target = str(path.resolve())
    for stage in repo.index.stages:
        if getattr(stage, "is_data_source", False):
            continue
        for out in stage.outs:
            if str(Path(out.fs_path).resolve()) == target:
                return str(stage.addressing)
    return None


def fetch(repo: str, path: str, rev: str | None, dest: Path, *, remote_url: str | None = None) -> DatasetVersion:
    """Materialise ``path`` of DVC ``repo`` at git ``rev`` into ``dest`` (cache, else remote).

    ``remote_url`` overrides the repo's default remote (used for this project, whose remote
    lives in the uncommitted ``.dvc/config.local``); other repos use their committed remote.
    The returned version's ``rev`` is the requested rev and ``commit`` the commit it names.

    Raises:
        VersioningError: the repo, rev or path does not exist, or the data is in no cache or remote.
    """
    from dvc.api import DVCFileSystem

    _quiet_dvc_console()
    config = {"remote": {REMOTE_NAME: {"url": remote_url}}, "core": {"remote": REMOTE_NAME}} if remote_url else None
    try:
        fs = DVCFileSystem(repo, rev=rev, config=config) if config else DVCFileSystem(repo, rev=rev)
        info = fs.info(path)
    except FileNotFoundError:
        raise VersioningError(f"{path} does not exist in {repo} at rev {rev or 'workspace'}") from None
    except Exception as exc:  # noqa: BLE001 - dvc/scmrepo raise many types for bad revs/repos
        raise VersioningError(f"cannot open {repo} at rev {rev!r}: {exc}") from None
    md5 = str(info.get("md5") or (info.get("dvc_info") or {}).get("md5") or "")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fs.get(path, str(tmp), recursive=True)
    except Exception as exc:  # noqa: BLE001 - any fetch failure: remove the partial copy, say what to do
        shutil.rmtree(tmp, ignore_errors=True)
        from pipeline.connections import mask_uri

        raise VersioningError(
            f"cannot fetch {path}@{rev}: {exc}. Is the data pushed? (`dvc push`, remote: "
            f"{mask_uri(remote_url) if remote_url else 'the repository default'})",
            hint="push it from the machine that versioned it (`dvc push`), or point paths.dvc_remote (or the "
                 "repository's default remote) at where it was pushed") from None
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    commit = _resolve_commit(fs, rev)
    nfiles = sum(1 for p in dest.rglob("*") if p.is_file())
    logger.info("fetched %s@%s (commit %s, md5 %s, %d files)", path, rev or "workspace", commit, md5, nfiles)
    return DatasetVersion(repo=str(repo), path=path, rev=rev or commit, dvc_md5=md5, nfiles=nfiles, pushed=False,
                          commit=commit)


def _resolve_commit(fs: Any, rev: str | None) -> str | None:
    """The commit ``rev`` names in the filesystem's repo (HEAD when ``rev`` is None)."""
    scm = getattr(fs.repo, "scm", None)
    if scm is None:
        return rev
    try:
        return str(scm.resolve_rev(rev)) if rev else str(scm.get_rev())
    except Exception:  # noqa: BLE001 - scmrepo raises its own types for unknown revs; the fetch already succeeded
        return rev
