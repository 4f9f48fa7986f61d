"""Dataset sources by name; each yields :class:`~pipeline.data.sources.base.RawRecord`."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import Settings
from pipeline.data.sources.base import RawRecord, Source, SourceError, SourceProfile

__all__ = ["RawRecord", "Source", "SourceError", "SourceProfile", "SOURCES", "get_source"]


def _synthetic(settings: Settings) -> Source:
    from pipeline.data.sources.synthetic import SyntheticSource
    from pipeline.data.synthetic import CohortSpec

    syn = settings.data.synthetic
    spec = CohortSpec(
        n_patients=syn.n_patients, images_per_patient=tuple(syn.images_per_patient), prevalence=syn.prevalence,
        image_size=syn.image_size, bit_depth=syn.bit_depth, bad_files=syn.bad_files, shift=syn.shift,
        seed=settings.base.seed,
    )
    return SyntheticSource(spec)


def _folder(settings: Settings) -> Source:
    from pipeline.data.sources.folder import FolderSource

    return FolderSource()


def _digits(settings: Settings) -> Source:
    from pipeline.data.sources.sklearn_digits import SklearnDigitsSource

    return SklearnDigitsSource()


SOURCES: dict[str, Callable[[Settings], Source]] = {
    "synthetic": _synthetic,
    "folder": _folder,
    "sklearn:digits": _digits,
}


def get_source(settings: Settings) -> Source:
    """The source named by ``data.source``.

    Raises:
        SourceError: unknown source name.
    """
    name = settings.data.source
    if name not in SOURCES:
        raise SourceError(f"unknown data.source {name!r}; choose one of: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](settings)
