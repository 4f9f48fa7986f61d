"""Which DICOM files are the images this task trains on and serves (``data.admission``).

A PACS export holds more than chest radiographs: CT and MR series, segmentations,
lateral views, raw "for processing" detector images, colour screenshots, multi-frame
cine loops. Each is a valid file of another kind, not a broken one, so it is neither
decoded nor quarantined: the header alone (read before any pixel byte is decoded, see
:func:`pipeline.data.dicom.read_header`) is judged against the policy, and a file outside
it raises :class:`OutOfPolicy` with one of :data:`POLICY_REASONS`. Ingestion lists such
files in ``excluded.csv`` and counts them per reason (``excluded_by_policy``); serving
refuses them (``out_of_policy``).

The defaults (``params.yaml``) describe chest radiographs: Modality CR or DX, body part
CHEST or absent, view PA or AP or absent (laterals only when ``views`` lists them), one
frame, MONOCHROME1/2, presentation intent FOR PRESENTATION or absent, no burned-in
annotation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import BadImage

if TYPE_CHECKING:
    from pipeline.config import AdmissionSection

POLICY_REASONS: dict[str, str] = {
    "modality": "Modality is not one of data.admission.modalities (e.g. CT, MR, SEG)",
    "body_part": "BodyPartExamined is not one of data.admission.body_parts",
    "view": "ViewPosition is not one of data.admission.views (e.g. a lateral)",
    "frames": "more frames than data.admission.max_frames",
    "colour": "PhotometricInterpretation is not one of data.admission.photometric (colour, palette)",
    "presentation_intent": "PresentationIntentType is not one of data.admission.presentation_intents",
    "burned_in": "BurnedInAnnotation=YES: identifying text may be drawn into the pixels",
}


class OutOfPolicy(BadImage):
    """A readable file that is not the kind of image the task admits; ``reason`` in :data:`POLICY_REASONS`."""


@dataclass(frozen=True)
class AdmissionPolicy:
    """``data.admission`` as the readers use it (picklable, no pydantic in worker processes)."""

    modalities: frozenset[str]
    body_parts: frozenset[str]
    allow_missing_body_part: bool
    views: frozenset[str]
    allow_missing_view: bool
    max_frames: int
    photometric: frozenset[str]
    presentation_intents: frozenset[str]
    exclude_burned_in: bool

    @classmethod
    def from_config(cls, cfg: AdmissionSection) -> AdmissionPolicy:
        return cls(frozenset(cfg.modalities), frozenset(cfg.body_parts), cfg.allow_missing_body_part,
                   frozenset(cfg.views), cfg.allow_missing_view, cfg.max_frames, frozenset(cfg.photometric),
                   frozenset(cfg.presentation_intents), cfg.exclude_burned_in)

    def check(self, header: Mapping[str, Any]) -> None:
        """Judge a DICOM header (a pydicom data set or a mapping of keywords).

        Raises:
            OutOfPolicy: the first rule the file breaks, in the order of :data:`POLICY_REASONS`.
        """
        modality = _text(header.get("Modality"))
        if modality not in self.modalities:
            raise OutOfPolicy("modality", f"Modality {modality[:16] or '(absent)'}; admitted: {_list(self.modalities)}")
        body = _text(header.get("BodyPartExamined"))
        if (body not in self.body_parts) if body else not self.allow_missing_body_part:
            absent = " or absent" if self.allow_missing_body_part else ""
            raise OutOfPolicy("body_part", f"BodyPartExamined {body[:16] or '(absent)'}; admitted: "
                                           f"{_list(self.body_parts)}{absent}")
        self.check_view(header.get("ViewPosition"), "ViewPosition")
        frames = header_int(header.get("NumberOfFrames"), 1)
        if frames > self.max_frames:
            raise OutOfPolicy("frames", f"{frames} frames; admitted: at most {self.max_frames}")
        photometric = _text(header.get("PhotometricInterpretation")) or "MONOCHROME2"
        samples = header_int(header.get("SamplesPerPixel"), 1)
        if photometric not in self.photometric or samples != 1:
            raise OutOfPolicy("colour", f"PhotometricInterpretation {photometric[:16]}, {samples} sample(s) per pixel; "
                                        f"admitted: {_list(self.photometric)}, 1 sample")
        intent = _text(header.get("PresentationIntentType"))
        if intent and intent not in self.presentation_intents:
            raise OutOfPolicy("presentation_intent", f"PresentationIntentType {intent[:16]}; admitted: "
                                                     f"{_list(self.presentation_intents)} or absent")
        if self.exclude_burned_in and _text(header.get("BurnedInAnnotation")) == "YES":
            raise OutOfPolicy("burned_in", "BurnedInAnnotation=YES (data.admission.exclude_burned_in)")


    def check_view(self, value: Any, where: str) -> None:
        """The view rule alone, for a view from any place (``where``: a DICOM ViewPosition, a labels CSV's
        view_position, a view an API client declares).

        Raises:
            OutOfPolicy: ``view``.
        """
        view = _text(value)
        if (view not in self.views) if view else not self.allow_missing_view:
            raise OutOfPolicy("view", f"{where} {view[:16] or '(absent)'}; admitted: {_list(self.views)}"
                                      f"{' or absent' if self.allow_missing_view else ''} (data.admission.views)")

    def summary(self) -> dict[str, Any]:
        """The policy as JSON (sorted lists), recorded with the files it judged."""
        return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(self).items()}


def header_int(value: Any, default: int = 0) -> int:
    """An integer header element (size, count); absent or empty → ``default``.

    Raises:
        BadImage: ``corrupt_pixel_data``: the element holds something else.
    """
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        raise BadImage("corrupt_pixel_data", f"a numeric header element holds {str(value)[:20]!r}") from None


def _text(value: Any) -> str:
    """A code string as the policy compares it: stripped, upper case; multi-valued → the first value."""
    if value is not None and not isinstance(value, (str, bytes, int, float)):
        value = next(iter(value), None) if hasattr(value, "__iter__") else value  # pydicom MultiValue
    return str(value or "").strip().upper()


def _list(values: frozenset[str]) -> str:
    return ", ".join(sorted(values))
