"""Dataset sources by name; each yields :class:`~pipeline.data.sources.base.RawRecord`."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import Settings
from pipeline.data.sources.base import LabelMap, RawRecord, Source, SourceNotes, SourceProfile
from pipeline.errors import SourceError

__all__ = ["LabelMap", "RawRecord", "Source", "SourceError", "SourceNotes", "SourceProfile", "SOURCES", "get_source"]


def _synthetic(settings: Settings) -> Source:
    from pipeline.data.sources.synthetic import SyntheticSource
    from pipeline.data.synthetic import CohortSpec

    syn = settings.data.synthetic
    spec = CohortSpec(
        n_patients=syn.n_patients, images_per_patient=tuple(syn.images_per_patient), prevalence=syn.prevalence,
        image_size=syn.image_size, bit_depth=syn.bit_depth, bad_files=syn.bad_files, shift=syn.shift,
        seed=settings.base.seed, preset=syn.preset,
    )
    return SyntheticSource(spec)


def _folder(settings: Settings) -> Source:
    from pipeline.data.sources.folder import FolderSource

    return FolderSource()


def _digits(settings: Settings) -> Source:
    from pipeline.data.sources.sklearn_digits import SklearnDigitsSource

    return SklearnDigitsSource()


def _kaggle(settings: Settings) -> Source:
    from pipeline.data.sources.kaggle_pneumonia import KagglePneumoniaSource

    return KagglePneumoniaSource(settings.data.label_maps.get("kaggle-pneumonia"))


def _nih(settings: Settings) -> Source:
    from pipeline.data.sources.nih_cxr14 import NihCxr14Source

    return NihCxr14Source(settings.data.label_maps.get("nih-cxr14"))


def _rsna(settings: Settings) -> Source:
    from pipeline.data.sources.rsna_pneumonia import RsnaPneumoniaSource

    return RsnaPneumoniaSource(settings.data.label_maps.get("rsna-pneumonia"))


def _dicom(settings: Settings) -> Source:
    from pipeline.data.sources.dicom_folder import DicomFolderSource

    return DicomFolderSource(settings.data.label_maps.get("dicom"))


def _dicomweb(settings: Settings) -> Source:
    from pipeline.data.sources.dicomweb import DicomwebSource

    maps = settings.data.label_maps  # a params.yaml older than the source: the dicom folder's map
    return DicomwebSource(settings.data.dicomweb, maps.get("dicomweb", maps.get("dicom")))


def _keras(dataset: str) -> Callable[[Settings], Source]:
    def factory(settings: Settings) -> Source:
        from pipeline.data.sources.keras_datasets import KerasDatasetSource

        return KerasDatasetSource(dataset)

    return factory


SOURCES: dict[str, Callable[[Settings], Source]] = {
    "synthetic": _synthetic,
    "folder": _folder,
    "kaggle-pneumonia": _kaggle,
    "nih-cxr14": _nih,
    "rsna-pneumonia": _rsna,
    "dicom": _dicom,
    "dicomweb": _dicomweb,
    "keras:mnist": _keras("mnist"),
    "keras:cifar10": _keras("cifar10"),
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
