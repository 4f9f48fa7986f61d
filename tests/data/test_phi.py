"""No PHI anywhere: PHI planted in DICOM headers and file names never reaches a produced file or a log.

Runs the real pipeline on tiny DICOM fixtures made here: ingest → validate → split, then the
whole training flow (1 epoch) in Prefect's test harness, and searches every file the run
produced (dataset dir with quarantine.csv, GX results and Data Docs, MLflow SQLite DB and
artifacts, drift report, models dir, Prefect's database) and the captured logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Settings
from tests.data.helpers import PHI, find_tokens, write_dicom

pytestmark = pytest.mark.slow

N_PATIENTS = 24
PATIENT_IDS = [f"MRNQ7{p:04d}" for p in range(N_PATIENTS)]
# header values, their name parts, the raw patient ids, and the identifying part of the file names
TOKENS = [*PHI.values(), "Zyxqvist", "Henrietta", "Plumtrebb", "Oswin", "Qwertyvale", *PATIENT_IDS,
          "ZyxqvistHenrietta", "Henrietta_Zyxqvist"]
LENIENT = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1", "promote.export_onnx=false"]


def _pacs_export(root: Path) -> Path:
    """DICOM files named after the patient, full of PHI, labelled by SOPInstanceUID; plus bad files."""
    lines = ["SOPInstanceUID,label"]
    for p, mrn in enumerate(PATIENT_IDS):
        positive = p % 2 == 0
        for k in range(2 if p % 4 == 0 else 1):
            uid = f"1.2.826.0.1.3680043.10.7.{p}.{k}"
            name = f"Henrietta_Zyxqvist_{mrn}_{k}.dcm" if p % 3 == 0 else f"ZyxqvistHenrietta-{mrn}-{k}"
            write_dicom(root / name, 200 + p, k=k, patient_id=mrn, sop_uid=uid, positive=positive,
                        phi=PHI, photometric="MONOCHROME1" if p == 5 else "MONOCHROME2")
            lines.append(f"{uid},{'PNEUMONIA' if positive else 'NORMAL'}")
    write_dicom(root / f"Zyxqvist_{PATIENT_IDS[0]}_nopixels.dcm", None, patient_id=PATIENT_IDS[0], phi=PHI)
    (root / f"Henrietta_Zyxqvist_{PATIENT_IDS[1]}_report.txt").write_text(f"{PHI['PatientName']} DOB 19230417\n")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_no_planted_phi_in_any_output(prefect_harness: None, make_settings: Callable[..., Settings],
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from flows.training import TrainingParameters, run
    from pipeline.data.ingest import run_ingest
    from pipeline.data.split import run_split
    from pipeline.data.validate import run_validation

    caplog.set_level(logging.DEBUG)
    raw = _pacs_export(tmp_path / "pacs_export")
    settings = make_settings("data.source=dicom", f"data.input={raw}", f"data.labels={raw / 'labels.csv'}",
                             "data.version_with_dvc=false", "train.epochs=1", *LENIENT)

    # the stages one by one, as the CLI runs them
    summary = run_ingest(settings, show_progress=False)
    assert summary["ingested"] == 30 and summary["quarantine_reasons"] == {"dicom_no_pixels": 1, "not_an_image": 1}
    run_validation(settings)
    assert run_split(settings)["patient_overlap"] == 0

    # and the whole training flow on the same dataset (MLflow, drift report, registry, ...)
    result = run(TrainingParameters(params_path=str(settings.root / "params.yaml"), simulate_production=True),
                 tmp_path / "summary.json")
    assert result["data"]["ingested"] == 30 and result["train"]["run_id"]
    assert Path(result["reports"]["drift_html"]).is_file()

    produced = [p for p in tmp_path.iterdir() if p != raw]
    assert (settings.home / "mlflow.db").is_file() and any((settings.home / "mlartifacts").rglob("*"))
    assert (settings.dataset_dir / "quarantine.csv").is_file()
    assert (settings.dataset_dir / "validation" / "data_docs" / "index.html").is_file()
    prefect_db = _prefect_database()
    assert prefect_db, "the harness' Prefect database was not found"
    leaks = find_tokens(produced + prefect_db, TOKENS)
    assert not leaks, f"PHI found in produced files: {leaks}"
    assert set(find_tokens([raw], TOKENS)) == set(TOKENS)  # the search does find what was planted

    captured = capsys.readouterr()
    logs = (caplog.text + captured.out + captured.err).lower()
    assert len(logs) > 1000  # the run did log
    assert not [t for t in TOKENS if t.lower() in logs], "PHI found in the logs"


def _prefect_database() -> list[Path]:
    """Prefect's SQLite database of the test harness (flow/task run records and logs)."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value() or "")
    path = Path(url.split("///", 1)[-1]) if url.startswith("sqlite") else None
    return [p for p in (path, Path(f"{path}-wal") if path else None) if p is not None and p.is_file()]
