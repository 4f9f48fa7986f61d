"""The one interface every dataset source implements.

A source turns a raw dataset folder (in its native layout) into a stream of
:class:`RawRecord`. Records may carry raw identifiers (file names, patient ids):
they exist only in memory between the source and ingestion, which pseudonymises
them, and must never be logged.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pipeline.errors import LabelMismatch, SourceError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
XRAY_CLASSES = ("NORMAL", "PNEUMONIA")


@dataclass(frozen=True)
class SourceProfile:
    """What a source's data looks like; fills ``null`` config fields."""

    classes: tuple[str, ...]
    positive_class: str | None
    min_size: int
    size_range: tuple[int, int]
    allow_colour: bool = False
    modality: str = "CXR"


# Radiograph sources: smallest accepted side 32 px (a tiny thumbnail is not a radiograph,
# but small research exports and test fixtures of 32-64 px must still ingest).
XRAY_PROFILE = SourceProfile(classes=XRAY_CLASSES, positive_class="PNEUMONIA", min_size=32, size_range=(32, 16384))


@dataclass
class RawRecord:
    """One candidate image as the source sees it (may hold PHI; in memory only).

    Attributes:
        path: absolute path of the file to read.
        ref: path relative to the raw root (may contain identifiers; never stored as is).
        label: class name, or None when unknown (quarantined as ``missing_label``).
        patient_key: raw patient identifier; None → taken from the DICOM header, else the file.
        source_split: the split the source shipped the file in (recorded, never used for our split).
        extra: optional slice fields: view_position, sex, age.
        label_by_uid: labels keyed by DICOM SOPInstanceUID, used when ``label`` is None (the
            ``dicom`` source's CSV may be keyed by UID, known only once the header is read).
    """

    path: Path
    ref: str
    label: str | None
    patient_key: str | None = None
    source_split: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    label_by_uid: Mapping[str, str] | None = None


class Source(Protocol):
    """A dataset source."""

    name: str
    profile: SourceProfile

    def prepare(self, root: Path) -> None:
        """Materialise the raw data under ``root`` when the source can (no-op otherwise)."""

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        """Yield every file of the dataset (bad ones too: ingestion quarantines them).

        Files whose label the source's label mapping excludes are *not* yielded; the source
        counts them (see :class:`SourceNotes`), so nothing is lost silently.
        """


class SourceNotes:
    """What a source skipped on purpose while listing records (counts only, no names).

    Attributes:
        excluded: images whose label the label mapping excludes, by raw label (NIH: by finding).
        excluded_images: number of images excluded by the label mapping.
        ignored: other files left out on purpose, by kind (metadata files, unlabelled test sets, ...).
        label_rows_without_file: rows of the label file whose image is not in the folder.
        labels_csv: how the labels CSV and the files matched (None: the source read no labels CSV).
    """

    def __init__(self) -> None:
        self.excluded: Counter[str] = Counter()
        self.excluded_images = 0
        self.ignored: Counter[str] = Counter()
        self.label_rows_without_file = 0
        self.labels_csv: LabelCsvReport | None = None

    def set_labels_csv(self, report: LabelCsvReport) -> None:
        """Record how the labels CSV matched the files (and its rows without a file)."""
        self.labels_csv = report
        self.label_rows_without_file = report.rows_without_file

    def exclude(self, *raw_labels: str) -> None:
        self.excluded_images += 1
        self.excluded.update(raw_labels or ("<empty>",))

    def to_dict(self) -> dict[str, Any]:
        return {
            "excluded_by_label_mapping": self.excluded_images,
            "excluded_labels": dict(sorted(self.excluded.items())),
            "ignored_files": {k: v for k, v in sorted(self.ignored.items()) if v},
            "label_rows_without_file": self.label_rows_without_file,
            **({"labels_csv": self.labels_csv.to_dict()} if self.labels_csv is not None else {}),
        }


class LabelMap:
    """Raw source label → class name; ``None`` for labels the mapping leaves out.

    Matching is exact first, then case-insensitive. With no mapping every label is kept as is.
    """

    def __init__(self, mapping: Mapping[str, str] | None) -> None:
        self.mapping = dict(mapping or {})
        self._folded = {str(k).strip().casefold(): v for k, v in self.mapping.items()}

    def __call__(self, raw: str) -> str | None:
        raw = raw.strip()
        if not self.mapping:
            return raw
        if raw in self.mapping:
            return self.mapping[raw]
        return self._folded.get(raw.casefold())


class MappedXraySource:
    """Base of the public X-ray sources: labels go through a :class:`LabelMap`, exclusions are
    counted in :class:`SourceNotes`, and there is nothing to materialise (the data is the user's)."""

    name = "x-ray"
    profile = XRAY_PROFILE

    def __init__(self, label_map: Mapping[str, str] | None = None) -> None:
        self.label_map = LabelMap(label_map)
        self.notes = SourceNotes()

    def prepare(self, root: Path) -> None:
        return None


def require_dir(root: Path, layout: str, hint: str = "") -> None:
    """Raise a :class:`SourceError` naming ``root`` and the expected layout when it is missing."""
    if not root.is_dir():
        raise SourceError(
            f"dataset folder {root} does not exist. Expected layout: {layout}. "
            + (hint or "Set data.input to the folder (e.g. --set data.input=/path/to/data).")
        )


def list_files(folder: Path, ignored: Counter[str] | None = None) -> list[Path]:
    """Regular files below ``folder``, sorted (deterministic order).

    Hidden files and files in hidden folders (``.DS_Store``, ``._*`` AppleDouble files,
    ``.ipynb_checkpoints/``, ``.git/``) are left out, and counted under ``hidden_files`` in
    ``ignored`` (the ingest summary's ``ignored_files``) so that nothing is dropped silently.
    """
    files: list[Path] = []
    hidden = 0
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            hidden += 1
        else:
            files.append(p)
    if ignored is not None and hidden:
        ignored["hidden_files"] += hidden
    return sorted(files)


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Read a CSV, checking its header has ``required`` columns."""
    return [row for _, row in read_csv_lines(path, required)]


def read_csv_lines(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV as ``(line number, row)`` pairs (the header is line 1), checking its header has ``required``."""
    if not path.is_file():
        raise SourceError(f"label file {path} does not exist (set data.labels=PATH)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(
                f"{path.name} lacks column(s) {missing}; found {reader.fieldnames}. "
                f"Expected a header with {list(required)}."
            )
        rows: list[tuple[int, dict[str, str]]] = []
        start = reader.line_num + 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
        return rows


# --------------------------------------------------------------------------- labels CSV ↔ files

# Suffixes a mismatch diagnosis may print (anything else could be part of a name: "Smith.John").
KNOWN_SUFFIXES = frozenset((*IMAGE_SUFFIXES, *DICOM_SUFFIXES, ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2"))
MISMATCH_EXAMPLES = 5
# kind → (diagnosis sentence, what is counted, short form for one example)
MISMATCH_KINDS: dict[str, tuple[str, str, str]] = {
    "absolute_path": ("the CSV holds absolute paths (write them relative to the input folder)", "rows",
                      "absolute path"),
    "folders_differ": ("the CSV paths hold folders that the files' paths (relative to the input folder) do not",
                       "rows", "folders differ"),
    "extension": ("the file extension differs between the CSV and the folder", "rows", "other extension"),
    "case": ("letter case differs between the CSV and the file names", "rows", "letter case differs"),
    "key_form": ("the CSV names the files in another form than this source expects", "rows",
                 "named in another form"),
    "empty_value": ("the file's row has an empty {value} cell", "files", "empty {value} cell"),
    "no_row": ("no row names the file", "files", "no row names it"),
    "no_file": ("no file of that name under the input folder", "rows", "no such file"),
    "empty_key": ("the {key} cell is empty", "rows", "empty {key} cell"),
}
_ABSOLUTE = re.compile(r"^(?:/|~|[A-Za-z]:/|[A-Za-z][A-Za-z0-9+.-]*://)")


def normalise_key(value: str) -> str:
    """A CSV key as compared with file paths: trimmed, ``/`` separators, no leading ``./``."""
    key = value.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _stem(key: str) -> str:
    head, _, last = key.rpartition("/")
    stem = PurePosixPath(last).stem if "." in last.lstrip(".") else last
    return f"{head}/{stem}" if head else stem


def _suffix(key: str) -> str:
    last = key.rpartition("/")[2]
    return PurePosixPath(last).suffix.lower() if "." in last.lstrip(".") else ""


def _say_suffix(suffix: str, short: bool = False) -> str:
    """An extension as a message may print it: a known image suffix, else only "another extension"."""
    if not suffix:
        return "no extension" if short else "files without an extension"
    if suffix in KNOWN_SUFFIXES:
        return suffix if short else f"{suffix} files"
    return "another extension" if short else "files of another extension"


def _count(n: int, unit: str) -> str:
    return f"{n} {unit if n != 1 else unit.removesuffix('s')}"


@dataclass
class LabelCsvReport:
    """How a labels CSV and the files under the input folder matched: counts, CSV line numbers and
    file ordinals only (file names and patient ids can carry PHI and never appear here).

    Attributes:
        key_column: the CSV column that names a file.
        rows: data rows in the CSV.
        rows_without_file: rows whose key names no file (or is empty).
        files: files looked up in the CSV.
        files_without_row: files no usable row names (None: cannot be known before the files are read, e.g.
            rows keyed by DICOM SOPInstanceUID).
        mismatches: mismatch kind (:data:`MISMATCH_KINDS`) → count (a row and its file pair count once).
        diagnosis: one sentence per kind, computed from the data (no names).
        examples: the first mismatches ("CSV line 7 ↔ file #3: …", "file #9: no row").
        enforced: whether ``data.ingest.max_label_mismatches`` applies to this source.
        consequence: what becomes of a tolerated file without a row.
        expected: how a key should name a file (for the hint).
        extra: further counts for the summary (e.g. the ``dicom`` source's rows keyed by UID).
        note: what could not be counted, and why.
    """

    key_column: str
    rows: int
    rows_without_file: int
    files: int
    files_without_row: int | None
    mismatches: dict[str, int]
    diagnosis: list[str]
    examples: list[str]
    enforced: bool
    consequence: str
    expected: str
    extra: dict[str, int] = field(default_factory=dict)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "rows_without_file": self.rows_without_file, "files": self.files,
                "files_without_row": self.files_without_row, **self.extra, "mismatches": dict(self.mismatches),
                "diagnosis": list(self.diagnosis), "threshold_applies": self.enforced,
                **({"note": self.note} if self.note else {})}


class LabelRows:
    """The rows of a labels CSV by the file key they hold; remembers which rows and files met.

    A source adds each row (:meth:`add`), looks each file up (:meth:`find`) and finally asks
    for the :meth:`report`, which pairs the leftovers up to say *why* they do not match
    (absolute paths, another extension, letter case, other folders). Keys and file paths
    stay in memory; the report holds only counts, CSV line numbers and file ordinals.
    """

    def __init__(self, key_column: str, value_column: str) -> None:
        self.key_column, self.value_column = key_column, value_column
        self.rows = 0
        self.lines: dict[str, list[int]] = {}
        self.usable: dict[str, bool] = {}
        self.empty_lines: list[int] = []
        self.found: set[str] = set()
        self.files = 0
        # (file ordinal, keys the source tried, the file's path relative to the root, where, kind)
        self._missing: list[tuple[int, tuple[str, ...], str, str, str]] = []

    @property
    def files_without_row(self) -> int:
        """Files looked up so far that no usable row names."""
        return len(self._missing)

    def add(self, line: int, key: str | None, usable: bool = True) -> str:
        """One CSV row naming a file by ``key``; ``usable`` False when the row's value cell is empty.

        Returns the normalised key ("" when the cell is empty: counted as a row without a file).
        """
        self.rows += 1
        norm = normalise_key(key or "")
        if not norm:
            self.empty_lines.append(line)
            return ""
        self.lines.setdefault(norm, []).append(line)
        self.usable[norm] = self.usable.get(norm, False) or usable
        return norm

    def find(self, ref: str, *keys: str, where: str = "") -> str | None:
        """The first of ``keys`` a usable row holds (normalised), or None: the file has no usable row.

        ``ref`` is the file's path relative to the input folder (diagnosis only); ``where`` a
        PHI-free place for messages (e.g. " in class folder NORMAL").
        """
        self.files += 1
        tried = tuple(dict.fromkeys(normalise_key(k) for k in keys if k))
        matched = [k for k in tried if k in self.lines]
        self.found.update(matched)
        usable = next((k for k in matched if self.usable[k]), None)
        if usable is None:
            self._missing.append((self.files, tried, normalise_key(ref), where,
                                  "empty_value" if matched else "no_row"))
        return usable

    def report(self, *, consequence: str, expected: str, enforced: bool = True,
               files_without_row_known: bool = True, extra: dict[str, int] | None = None,
               note: str | None = None) -> LabelCsvReport:
        """Counts and a diagnosis of every mismatch (see :class:`LabelCsvReport`).

        ``files_without_row_known`` False: other rows (e.g. keyed by DICOM UID) may still name the files
        left over, so they are neither counted nor reported as without a row.
        """
        kinds: Counter[str] = Counter()
        extensions: Counter[tuple[str, str]] = Counter()
        examples: list[tuple[int, int, str]] = []  # (group, order, text)
        no_row = [m for m in self._missing if m[4] == "no_row"]
        for ordinal, _, _, where, _ in (m for m in self._missing if m[4] == "empty_value"):
            kinds["empty_value"] += 1
            examples.append((1, ordinal, f"file #{ordinal}{where}: {self._short('empty_value')}"))
        exact: dict[str, list[int]] = {}
        folded: dict[str, list[int]] = {}
        stems: dict[str, list[int]] = {}
        for i, (_, tried, ref, _, _) in reversed(list(enumerate(no_row))):  # buckets pop their first file last
            names = dict.fromkeys((*tried, ref, ref.rpartition("/")[2]))
            for name in names:
                exact.setdefault(name, []).append(i)
                folded.setdefault(name.casefold(), []).append(i)
                stems.setdefault(_stem(name).casefold(), []).append(i)
        paired: set[int] = set()
        rows_without_file = len(self.empty_lines)
        for key, lines in sorted(((k, v) for k, v in self.lines.items() if k not in self.found),
                                 key=lambda kv: kv[1][0]):
            rows_without_file += len(lines)
            match = self._pair(key, exact, folded, stems, paired)
            if match is None:
                kinds["no_file"] += 1
                examples.append((2, lines[0], f"CSV line {lines[0]}: {self._short('no_file')}"))
                continue
            i, kind = match
            paired.add(i)
            ordinal, _, ref, where, _ = no_row[i]
            kinds[kind] += 1
            if kind == "extension":
                extensions[(_suffix(key), _suffix(ref))] += 1
                text = f"CSV {_say_suffix(_suffix(key), short=True)}, file {_say_suffix(_suffix(ref), short=True)}"
            else:
                text = self._short(kind)
            examples.append((0, lines[0], f"CSV line {lines[0]} ↔ file #{ordinal}{where}: {text}"))
        for i, (ordinal, _, _, where, _) in enumerate(no_row):
            if i not in paired and files_without_row_known:  # else another kind of row may name it
                kinds["no_row"] += 1
                examples.append((1, ordinal, f"file #{ordinal}{where}: {self._short('no_row')}"))
        for line in self.empty_lines:
            kinds["empty_key"] += 1
            examples.append((2, line, f"CSV line {line}: {self._short('empty_key')}"))
        diagnosis = []
        for kind in MISMATCH_KINDS:
            if not kinds[kind]:
                continue
            sentence, unit, _ = MISMATCH_KINDS[kind]
            if kind == "extension":
                diagnosis += [f"the CSV names {_say_suffix(a)}, the folder holds {_say_suffix(b)} "
                              f"({_count(n, unit)})" for (a, b), n in extensions.most_common()]
            else:
                text = sentence.format(key=self.key_column, value=self.value_column)
                diagnosis.append(f"{text} ({_count(kinds[kind], unit)})")
        return LabelCsvReport(
            key_column=self.key_column, rows=self.rows, rows_without_file=rows_without_file, files=self.files,
            files_without_row=len(self._missing) if files_without_row_known else None,
            mismatches={k: kinds[k] for k in MISMATCH_KINDS if kinds[k]}, diagnosis=diagnosis,
            examples=[text for *_, text in sorted(examples)[:MISMATCH_EXAMPLES]], enforced=enforced,
            consequence=consequence, expected=expected, extra=dict(extra or {}), note=note)

    def _short(self, kind: str) -> str:
        return MISMATCH_KINDS[kind][2].format(key=self.key_column, value=self.value_column)

    @staticmethod
    def _pair(key: str, exact: dict[str, list[int]], folded: dict[str, list[int]], stems: dict[str, list[int]],
              paired: set[int]) -> tuple[int, str] | None:
        """A file without a row that this unmatched row most likely meant, and the kind of mismatch.

        Each index maps a name to files not yet paired (paired ones are dropped from the front as
        they are met, so many files of one name, e.g. ``IMG`` in every DICOM folder, stay linear).
        """
        absolute = bool(_ABSOLUTE.match(key))
        parts = [p for p in key.split("/") if p and p not in (".", "~") and not p.endswith(":")]
        for start in range(len(parts)):
            tail = "/".join(parts[start:])
            for index, probe, kind in ((exact, tail, "key_form"), (folded, tail.casefold(), "case"),
                                       (stems, _stem(tail).casefold(), "extension")):
                bucket = index.get(probe)
                while bucket and bucket[-1] in paired:
                    bucket.pop()
                if not bucket:
                    continue
                free = bucket.pop()
                if absolute:
                    return free, "absolute_path"
                if start:
                    return free, "folders_differ"
                return free, kind
        return None


def check_label_rows(notes: SourceNotes | None, source: str, max_mismatches: int) -> None:
    """Stop before anything is written when too many files have no row in the labels CSV.

    Logs the counts and the diagnosis (never a name) when rows and files do not all match.

    Raises:
        LabelMismatch: more files without a row than ``max_mismatches`` (``data.ingest.max_label_mismatches``)
            in a source where the CSV gives the label or patient of a file it names.
    """
    report = notes.labels_csv if notes is not None else None
    if report is None:
        return
    missing = report.files_without_row or 0
    if report.enforced and missing > max_mismatches:
        raise LabelMismatch(
            f"the labels CSV does not match the files of the {source} dataset: {missing} of {report.files} "
            f"file(s) have no usable row (data.ingest.max_label_mismatches allows {max_mismatches}) and "
            f"{report.rows_without_file} of {report.rows} row(s) name no file. "
            f"Diagnosis: {'; '.join(report.diagnosis)}. First mismatches (file #N: the N-th file the source lists, in "
            f"path order): {'; '.join(report.examples)}. Nothing was ingested.",
            hint=f"make each value of the CSV column {report.key_column!r} name its file {report.expected}; or, "
                 "to ingest anyway, "
                 "set data.ingest.max_label_mismatches to the number of files you accept without a row "
                 f"(--set data.ingest.max_label_mismatches=N): those files {report.consequence}.")
    if missing or report.rows_without_file:
        logger.warning("labels CSV: %s of %d file(s) without a row, %d of %d row(s) without a file (%s)",
                       "?" if report.files_without_row is None else missing, report.files,
                       report.rows_without_file, report.rows, "; ".join(report.diagnosis) or "no diagnosis")
