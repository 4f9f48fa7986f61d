"""Config loading: params.yaml is complete, overrides are validated, paths never follow the cwd."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Settings, apply_overrides, load_settings, with_overrides, with_values
from pipeline.errors import ConfigError
from tests.conftest import REPO


def test_params_yaml_loads_and_sets_every_field() -> None:
    settings = load_settings(REPO / "params.yaml")
    assert settings.base.seed == 42
    # Models declare no defaults: every field the models know must be present in the file.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params) == {f.alias or n for n, f in Settings.model_fields.items() if n != "root"}


def test_overrides_are_typed_and_nested() -> None:
    settings = with_overrides(load_settings(REPO / "params.yaml"),
                              ["train.epochs=3", "data.synthetic.images_per_patient=[2, 5]", "promote.min_auc=0.8"])
    assert settings.train.epochs == 3
    assert settings.data.synthetic.images_per_patient == (2, 5)
    assert settings.promote.min_auc == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown field 'train.epoch'"),
        ("trian.epochs=3", "unknown section 'trian'"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs", "section.field=value"),
        ("split.fractions=[0.5, 0.5, 0.5]", "summing to 1"),
        ("data.synthetic.images_per_patient=[3, 1]", "min <= max"),
    ],
)
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_overrides(load_settings(REPO / "params.yaml"), [override])


def test_missing_field_says_how_to_fix(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["train"]["epochs"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train.epochs: missing .* --set train.epochs=VALUE"):
        load_settings(tmp_path / "params.yaml")


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="cannot find params.yaml"):
        load_settings(tmp_path / "nope.yaml")


def test_paths_resolve_against_params_folder_not_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    settings = load_settings(tmp_path / "project" / "params.yaml")
    assert settings.home == tmp_path / "project" / ".xrayops"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'project' / '.xrayops' / 'mlflow.db'}"
    assert settings.raw_dir == tmp_path / "project" / "data" / "raw" / "synthetic"
    assert settings.dataset_dir == tmp_path / "project" / "data" / "datasets" / "synthetic"


def test_derived_names_follow_the_source() -> None:
    settings = with_overrides(load_settings(REPO / "params.yaml"), ["data.source=sklearn:digits"])
    assert settings.dataset_name == "sklearn-digits"
    assert settings.registered_model == "xrayops-sklearn-digits"


def test_apply_overrides_does_not_mutate_input() -> None:
    params = {"train": {"epochs": 1}}
    out = apply_overrides(params, ["train.epochs=2"])
    assert params["train"]["epochs"] == 1 and out["train"]["epochs"] == 2


def test_flat_params_cover_all_sections() -> None:
    flat = load_settings(REPO / "params.yaml").flat_params()
    assert flat["train.epochs"] == load_settings(REPO / "params.yaml").train.epochs
    assert "data.synthetic.n_patients" in flat and "validate.min_rows" in flat


def test_typed_values_are_set_as_they_are_not_reread_as_yaml() -> None:
    base = load_settings(REPO / "params.yaml")
    settings = with_values(base, {"data.input": "/data/cxr #2", "data.rev": "1.10", "train.epochs": 3,
                                  "train.model": "yes", "data.synthetic.images_per_patient": [2, 5]})
    assert settings.data.input == "/data/cxr #2"  # YAML would cut at the comment
    assert settings.data.rev == "1.10"  # YAML would read the float 1.1
    assert settings.train.model == "yes"  # YAML would read True
    assert settings.train.epochs == 3 and isinstance(settings.train.epochs, int)
    assert settings.data.synthetic.images_per_patient == (2, 5)
    assert with_values(base, {}) is base
    # the same strings through --set keep today's YAML meaning
    assert with_overrides(base, ["train.epochs=3"]).train.epochs == 3
    assert with_overrides(base, ["data.input=/data/cxr #2"]).data.input == "/data/cxr"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train.epochs": 0}, "train.epochs: Input should be greater than or equal to 1"),
        ({"train.epochs": "three"}, "train.epochs"),
        ({"data.rev": 1.1}, "data.rev: Input should be a valid string"),
        ({"train.epoch": 3}, "setting 'train.epoch': unknown field 'train.epoch'"),
        ({"trian.epochs": 3}, "unknown section 'trian'"),
        ({"train.": 3}, "section.field"),
    ],
)
def test_bad_typed_values_name_the_field(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_values(load_settings(REPO / "params.yaml"), values)
