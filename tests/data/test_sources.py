"""Dataset sources on tiny fixtures that mimic each real layout (made here, never downloaded)."""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources.base import LabelMap
from pipeline.data.sources.dicom_folder import DicomFolderSource
from pipeline.data.sources.kaggle_pneumonia import KagglePneumoniaSource, find_dataset_root, patient_from_name
from pipeline.data.sources.keras_datasets import DATASETS, KerasDatasetSource, load_arrays
from pipeline.data.sources.nih_cxr14 import NihCxr14Source
from pipeline.data.sources.rsna_pneumonia import RsnaPneumoniaSource, image_targets
from pipeline.errors import SourceError
from tests.data.helpers import write_dicom, write_jpeg, write_png

NIH_MAP = {"Pneumonia": "PNEUMONIA", "No Finding": "NORMAL"}


@pytest.mark.parametrize(("name", "patient"), [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1438_virus_2453.jpeg", "person1438"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0588-0001.jpeg", "NORMAL2-IM-0588"),
    ("scan.jpeg", None),
])
def test_kaggle_patient_ids_from_file_names(name: str, patient: str | None) -> None:
    assert patient_from_name(name) == patient


def _kaggle_tree(root: Path) -> Path:
    base = root / "chest_xray"
    write_jpeg(base / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg", 1, positive=True)
    write_jpeg(base / "test" / "PNEUMONIA" / "person1_virus_6.jpeg", 1, k=1, positive=True)
    write_jpeg(base / "val" / "NORMAL" / "NORMAL2-IM-0588-0001.jpeg", 2)
    write_jpeg(base / "train" / "NORMAL" / "IM-0115-0001.jpeg", 3)
    (base / "__MACOSX").mkdir()
    (base / "__MACOSX" / "junk").write_text("x")
    return base


@pytest.mark.parametrize("level", ["parent", "chest_xray"])
def test_kaggle_records_from_either_root(tmp_path: Path, level: str) -> None:
    base = _kaggle_tree(tmp_path)
    source = KagglePneumoniaSource({"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"})
    recs = list(source.records(tmp_path if level == "parent" else base, None))
    by_name = {r.path.name: r for r in recs}
    assert len(recs) == 4
    assert by_name["person1_bacteria_1.jpeg"].patient_key == by_name["person1_virus_6.jpeg"].patient_key == "person1"
    assert {r.source_split for r in recs} == {"train", "val", "test"}
    assert by_name["IM-0115-0001.jpeg"].label == "NORMAL"


def test_hidden_files_are_left_out_and_counted(tmp_path: Path) -> None:
    base = _kaggle_tree(tmp_path)
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (base / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"\0\5\26\7")
    write_jpeg(base / "test" / "NORMAL" / ".ipynb_checkpoints" / "IM-0115-0001.jpeg", 3)
    source = KagglePneumoniaSource({"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"})
    assert len(list(source.records(base, None))) == 4
    assert source.notes.to_dict()["ignored_files"]["hidden_files"] == 3


def test_kaggle_nested_zip_copy_uses_the_shallowest(tmp_path: Path) -> None:
    _kaggle_tree(tmp_path / "chest_xray")  # chest_xray/chest_xray/... as in the Kaggle zip
    write_jpeg(tmp_path / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg", 5)
    assert find_dataset_root(tmp_path) == tmp_path / "chest_xray"
    with pytest.raises(SourceError, match="Expected layout"):
        find_dataset_root(tmp_path / "chest_xray" / "train" / "NORMAL")


def _nih_tree(root: Path) -> Path:
    rows = [
        ("00000001_000.png", "Pneumonia", 1, 58, "M", "PA"),
        ("00000001_001.png", "Pneumonia|Effusion", 1, 58, "M", "AP"),
        ("00000002_000.png", "No Finding", 2, 41, "F", "PA"),
        ("00000003_000.png", "Effusion|Infiltration", 3, 70, "F", "PA"),
        ("00000004_000.png", "Cardiomegaly", 4, 33, "M", "AP"),
        ("00000099_000.png", "No Finding", 99, 20, "F", "PA"),  # row without an image
    ]
    for i, (name, *_rest) in enumerate(rows[:5]):
        write_png(root / f"images_00{1 + i % 2}" / "images" / name, i)
    write_png(root / "images_001" / "images" / "00000005_000.png", 9)  # image without a row
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]"])
        for name, labels, pid, age, sex, view in rows:
            w.writerow([name, labels, 0, pid, age, sex, view, 64, 64])
    (root / "README_CHESTXRAY.pdf").write_bytes(b"%PDF-1.4")
    (root / "test_list.txt").write_text("00000002_000.png\n")
    return root


def test_nih_label_mapping_excludes_and_counts(tmp_path: Path) -> None:
    source = NihCxr14Source(NIH_MAP)
    recs = {r.path.name: r for r in source.records(_nih_tree(tmp_path), None)}
    assert recs["00000001_000.png"].label == recs["00000001_001.png"].label == "PNEUMONIA"
    assert recs["00000002_000.png"].label == "NORMAL" and recs["00000002_000.png"].source_split == "test"
    assert recs["00000005_000.png"].label is None  # no CSV row: quarantined later as missing_label
    assert recs["00000001_001.png"].extra == {"view_position": "AP", "sex": "M", "age": "58"}
    assert recs["00000001_000.png"].patient_key == recs["00000001_001.png"].patient_key == "1"
    notes = source.notes.to_dict()
    assert notes["excluded_by_label_mapping"] == 2
    assert notes["excluded_labels"] == {"Cardiomegaly": 1, "Effusion": 1, "Infiltration": 1}
    assert notes["label_rows_without_file"] == 1 and notes["ignored_files"] == {"metadata_files": 3}


def test_nih_custom_mapping_and_missing_csv(tmp_path: Path) -> None:
    root = _nih_tree(tmp_path)
    source = NihCxr14Source({"Effusion": "EFFUSION", "No Finding": "NORMAL"})
    labels = {r.path.name: r.label for r in source.records(root, None)}
    assert labels["00000001_001.png"] == "EFFUSION" and "00000001_000.png" not in labels
    assert labels["00000003_000.png"] == "EFFUSION"
    (root / "Data_Entry_2017.csv").unlink()
    with pytest.raises(SourceError, match="Data_Entry_2017.csv"):
        list(NihCxr14Source(NIH_MAP).records(root, None))


def test_label_map_is_case_insensitive_and_identity_without_map() -> None:
    assert LabelMap({"Pneumonia": "PNEUMONIA"})("pneumonia ") == "PNEUMONIA"
    assert LabelMap({"Pneumonia": "PNEUMONIA"})("Edema") is None
    assert LabelMap(None)("cat") == "cat"


def test_rsna_target_is_the_max_over_rows(tmp_path: Path) -> None:
    labels = tmp_path / "stage_2_train_labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\n"
                      "aaa,,,,,0\nbbb,10,10,5,5,1\nbbb,30,30,5,5,1\nccc,,,,,0\nccc,1,1,2,2,1\nddd,,,,,0\n")
    assert image_targets(labels) == {"aaa": "0", "bbb": "1", "ccc": "1", "ddd": "0"}
    for i, pid in enumerate(["aaa", "bbb", "ccc", "eee"]):
        write_dicom(tmp_path / "stage_2_train_images" / f"{pid}.dcm", i, patient_id=pid)
    write_dicom(tmp_path / "stage_2_test_images" / "zzz.dcm", 7, patient_id="zzz")
    source = RsnaPneumoniaSource({"1": "PNEUMONIA", "0": "NORMAL"})
    recs = {r.patient_key: r.label for r in source.records(tmp_path, None)}
    assert recs == {"aaa": "NORMAL", "bbb": "PNEUMONIA", "ccc": "PNEUMONIA", "eee": None}
    notes = source.notes.to_dict()
    assert notes["label_rows_without_file"] == 1  # ddd
    assert notes["ignored_files"] == {"metadata_files": 1, "unlabelled_test_images": 1}


def test_dicom_labels_by_file_or_uid(tmp_path: Path) -> None:
    write_dicom(tmp_path / "dcm" / "a", 1, patient_id="P1", sop_uid="1.2.3.1")
    write_dicom(tmp_path / "dcm" / "b.dcm", 2, patient_id="P2", sop_uid="1.2.3.2")
    write_dicom(tmp_path / "dcm" / "c.dcm", 3, patient_id="P3", sop_uid="1.2.3.3")
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,file,label\n1.2.3.1,,pneumonia\n,b.dcm,0\n,c.dcm,edema\n")
    source = DicomFolderSource({"PNEUMONIA": "PNEUMONIA", "NORMAL": "NORMAL", "0": "NORMAL", "1": "PNEUMONIA"})
    recs = {r.path.name: r for r in source.records(tmp_path / "dcm", tmp_path / "labels.csv")}
    assert set(recs) == {"a", "b.dcm"}  # c.dcm: label excluded by the map, counted
    assert recs["a"].label is None and recs["a"].label_by_uid["1.2.3.1"] == "PNEUMONIA"
    assert recs["b.dcm"].label == "NORMAL" and recs["b.dcm"].patient_key is None  # patient from the header
    assert source.notes.excluded_images == 1
    with pytest.raises(SourceError, match="label CSV"):
        list(source.records(tmp_path / "dcm", tmp_path / "nope.csv"))


# --------------------------------------------------------------------------- keras


def _fake_mnist(path: Path) -> None:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), y_train=np.array([0, 1, 2, 3, 4, 5]),
             x_test=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), y_test=np.array([6, 7]))


def _fake_cifar_tarball(path: Path) -> None:
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}, protocol=4)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_keras_mnist_materialises_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    _fake_mnist(tmp_path / "keras" / "datasets" / "mnist.npz")
    source = KerasDatasetSource("mnist")
    source.prepare(tmp_path / "raw")
    recs = list(source.records(tmp_path / "raw", None))
    assert len(recs) == 8 and {r.source_split for r in recs} == {"train", "test"}
    assert {r.label for r in recs} == {str(d) for d in range(8)}
    assert len({r.patient_key for r in recs}) == 8


def test_keras_cifar10_materialises_from_a_cached_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    _fake_cifar_tarball(tmp_path / "keras" / "datasets" / "cifar-10-python.tar.gz")
    arrays = load_arrays(DATASETS["cifar10"])
    assert arrays["train"][0].shape == (10, 32, 32, 3) and arrays["test"][0].shape == (3, 32, 32, 3)
    source = KerasDatasetSource("cifar10")
    source.prepare(tmp_path / "raw")
    assert len(list(source.records(tmp_path / "raw", None))) == 13
    assert source.profile.allow_colour and "airplane" in source.profile.classes


def test_keras_cache_refuses_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    path = tmp_path / "keras" / "datasets" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    blob = pickle.dumps({b"data": print})  # a global that is not numpy: must not be resolved
    with tarfile.open(path, "w:gz") as tar:
        for name in ("data_batch_1", "test_batch"):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(SourceError, match="unreadable"):
        load_arrays(DATASETS["cifar10"])


def test_keras_offline_error_names_the_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, the real Keras download path fails; the error says where to put the file."""
    import urllib.error

    import keras.src.utils.file_utils as file_utils

    def offline(*args: object, **kwargs: object) -> None:  # the network edge: no download in tests
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(SourceError) as err:
        KerasDatasetSource("mnist").prepare(tmp_path / "raw")
    message = str(err.value)
    assert str(tmp_path / "keras" / "datasets" / "mnist.npz") in message
    assert "~/.keras/datasets/mnist.npz" in message and "URL fetch failure" in message
    assert not (tmp_path / "raw").exists()
