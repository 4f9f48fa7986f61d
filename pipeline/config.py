"""Typed configuration: one pydantic model per ``params.yaml`` section.

``params.yaml`` is the one source of defaults: the models below declare types,
ranges and documentation but no values, so a field missing from the file is an
error that names the field, not a silently different default.  Overrides come
as ``section.field=value`` strings (``--set`` on the CLI, ``overrides`` in a
flow run, ``-S`` in ``dvc exp run``) and are validated by the same models.
Values that are already typed (UI form fields) go through :func:`with_values`,
which sets them as they are, never re-read as YAML.

Nothing here touches the file system at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

PARAMS_ENV = "XRAYOPS_PARAMS"
OVERRIDES_ENV = "XRAYOPS_SET"  # "section.field=value;…" applied before --set (containers, k8s pods)
PARAMS_FILE = "params.yaml"


SubgroupAttribute = Literal["site", "manufacturer", "view", "sex", "age_band"]
QualityFeature = Literal["mean", "std", "p05", "p50", "p95", "contrast", "entropy", "sharpness", "aspect"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sections


class BaseSection(_Section):
    seed: int = Field(description="The one random seed; every stage derives its randomness from it.")
    project: str = Field(description="Project name; prefixes MLflow experiments.")


class PathsSection(_Section):
    home: str = Field(description="Folder for local state (MLflow DB, Prefect home, DVC remote, logs).")
    data_dir: str = Field(description="Folder holding raw data and ingested datasets.")
    reports_dir: str = Field(description="Folder for human-facing reports (drift, model cards).")
    models_dir: str = Field(description="Folder for trained-model outputs of the DVC stages (model.keras, train.json).")
    mlflow_tracking_uri: str | None = Field(description="MLflow tracking URI; null = SQLite under home.")
    mlflow_artifact_root: str | None = Field(description="Artifact root for new experiments; null = under home "
                                             "(or, with an http(s) tracking server, the server's own artifact store).")
    mlflow_registry_uri: str | None = Field(description="MLflow registry URI; null = the tracking URI.")
    prefect_home: str | None = Field(description="PREFECT_HOME; null = <home>/prefect.")
    dvc_remote: str | None = Field(description="DVC remote URL (path, s3://…); null = <home>/dvc-remote.")
    production_log: str | None = Field(description="Prediction log folder; null = <home>/production-log.")
    feedback_log: str | None = Field(description="Clinician feedback folder; null = <home>/feedback.")
    simulation_log: str | None = Field(description="Simulated-traffic log of the main job's drift demo, kept apart "
                                       "from the production log; null = <home>/simulation-log.")
    audit_log: str | None = Field(description="Append-only, hash-chained audit log of registry and "
                                  "serving actions (JSON lines); null = <home>/audit/audit.jsonl. Point every "
                                  "writer at one shared file when several machines move the registry.")


class SyntheticSection(_Section):
    n_patients: int = Field(ge=4, description="Number of synthetic patients.")
    images_per_patient: tuple[int, int] = Field(description="Inclusive [min, max] images per patient.")
    prevalence: float = Field(gt=0, lt=1, description="Share of patients with pneumonia.")
    image_size: int = Field(ge=32, le=4096, description="Side of the square images in pixels.")
    bit_depth: Literal[8, 16] = Field(description="PNG bit depth of the generated images.")
    bad_files: int = Field(ge=0, description="Deliberately bad files to add (corrupt, empty, tiny, ...).")
    shift: float = Field(ge=0, description="Acquisition shift (exposure/contrast/noise); 0 = training-like.")
    preset: Literal["realistic", "easy"] = Field(
        description="easy: the first one-site cohort a small CNN separates perfectly; realistic: three sites "
        "(scanners, AP share, prevalence), subtle-to-obvious lesions, benign look-alikes and a spurious "
        "'portable' marker at one site (see pipeline.data.synthetic).")

    @field_validator("images_per_patient")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError("must be [min, max] with 1 <= min <= max")
        return v


class IngestSection(_Section):
    workers: int = Field(ge=0, description="Parallel readers; 0 = one per CPU core.")
    executor: Literal["auto", "process", "thread"] = Field(
        description="Where readers run: worker processes (process), threads (thread), or auto = processes "
        "once a dataset has more than a few dozen files.")
    png_inflate: Literal["isal", "pillow"] = Field(
        description="Who inflates PNG pixel data: isal = Intel ISA-L (same pixels; Pillow un-filters; decoding 512x512 "
        "radiograph PNGs ~1.6x faster), pillow = Pillow alone (the switch-off).")
    min_size: int | None = Field(ge=1, description="Smallest accepted side in pixels; null = the source's default.")
    max_pixels: int = Field(ge=1, description="Largest accepted width*height (decompression-bomb guard).")
    max_bytes: int = Field(ge=1, description="Largest accepted file size in bytes.")
    dicom_bit_depth: Literal[8, 16] = Field(description="Keep DICOM at 16 bits or normalise to 8 bits.")
    salt_env: str = Field(description="Environment variable holding the pseudonymisation salt (at least 32 bytes; "
                          "unset = a random salt created once under <home>/secrets/).")
    lock_timeout_s: float = Field(gt=0, description="How long an ingest waits for another run that holds the same "
                                  "dataset's lock (ingesting or preparing it) before it fails naming that run's pid.")
    max_label_mismatches: int = Field(ge=0, description="When a labels CSV is given: how many files without a row "
                                      "(no label / patient id for them) ingestion tolerates before it stops with the "
                                      "first mismatches listed; 0 = any. Rows without a file are counted only.")


class AdmissionSection(_Section):
    """Which DICOM files count as the images this task trains on (defaults: chest radiographs).

    Judged from the header, before any pixel is decoded. A file outside the policy is not an
    error (a CT in a PACS export is a valid file of another kind): it is excluded and counted
    per reason in ``ingest_summary.json`` (``excluded_by_policy``) and listed in ``excluded.csv``;
    serving refuses such an upload (``out_of_policy``).
    """

    modalities: list[str] = Field(min_length=1, description="Allowed Modality values (CR, DX; DX for presentation).")
    body_parts: list[str] = Field(description="Allowed BodyPartExamined values (case-insensitive).")
    allow_missing_body_part: bool = Field(description="Admit files without BodyPartExamined (many CR exports "
                                          "leave it empty).")
    views: list[str] = Field(min_length=1, description="Allowed ViewPosition values (PA, AP; add LL to admit "
                             "laterals).")
    allow_missing_view: bool = Field(description="Admit files without ViewPosition.")
    max_frames: int = Field(ge=1, description="Most frames a file may hold (1: single-frame radiographs).")
    photometric: list[str] = Field(min_length=1, description="Allowed PhotometricInterpretation values.")
    presentation_intents: list[str] = Field(description="Allowed PresentationIntentType values (DX: FOR "
                                            "PRESENTATION; FOR PROCESSING images are raw detector data); absent "
                                            "is always allowed (CR has none).")
    exclude_burned_in: bool = Field(description="Exclude files with BurnedInAnnotation=YES (identifying text drawn "
                                    "into the pixels).")

    @field_validator("modalities", "body_parts", "views", "photometric", "presentation_intents")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [str(x).strip().upper() for x in v]


class DicomwebSection(_Section):
    """Where the ``dicomweb`` source pulls training data from: a PACS's DICOMweb API (QIDO-RS + WADO-RS).

    Credentials are never written here: the section names the environment variables that hold them
    (unset variables = no authentication)."""

    url: str | None = Field(description="DICOMweb root of the PACS, e.g. http://pacs.example.org:8042/dicom-web "
                            "(or --url); a user:password@ in it is masked in every message.")
    study_filter: dict[str, str] = Field(description="QIDO-RS study search filters, attribute keyword or tag → "
                                         "value (e.g. {ModalitiesInStudy: CR, StudyDate: 20240101-20241231}); "
                                         "{} = every study.")
    timeout_s: float = Field(gt=0, description="Seconds to wait for each answer of the PACS (read timeout).")
    connect_timeout_s: float = Field(gt=0, description="Seconds to wait for a connection to the PACS.")
    retries: int = Field(ge=0, le=10, description="Extra attempts of a request the PACS answers 429/408/503/504 "
                         "(exponential back-off).")
    page_size: int = Field(ge=1, description="Results per QIDO-RS search request.")
    username_env: str | None = Field(description="Environment variable holding the basic-auth user name.")
    password_env: str | None = Field(description="Environment variable holding the basic-auth password.")
    token_env: str | None = Field(description="Environment variable holding a bearer token (instead of basic auth).")

    @field_validator("study_filter")
    @classmethod
    def _attributes(cls, v: dict[str, str]) -> dict[str, str]:
        from pydicom.datadict import tag_for_keyword

        for key in v:
            if tag_for_keyword(key) is None and not re.fullmatch(r"[0-9A-Fa-f]{8}", key):
                raise ValueError(f"{key!r} is not a DICOM attribute keyword (e.g. ModalitiesInStudy, StudyDate) or "
                                 "an 8-hex-digit tag")
        return {str(k): str(val) for k, val in v.items()}


class DataSection(_Section):
    source: str = Field(description="Dataset source: synthetic, folder, kaggle-pneumonia, nih-cxr14, "
                        "rsna-pneumonia, dicom, dicomweb (a PACS), keras:mnist, keras:cifar10, sklearn:digits.")
    name: str | None = Field(description="Dataset name; null = derived from the source.")
    input: str | None = Field(description="Raw data folder; null = <data_dir>/raw/<name>.")
    labels: str | None = Field(description="Label/mapping CSV for sources that need one.")
    repo: str | None = Field(description="DVC repo (path or URL) to read the dataset from; null = this project.")
    rev: str | None = Field(description="Git rev/tag of the dataset version; null = the workspace.")
    dataset_dir: str | None = Field(description="Where ingest writes; null = <data_dir>/datasets/<name>.")
    classes: list[str] | None = Field(description="Class names in label-index order; null = the source's.")
    positive_class: str | None = Field(description="Positive class of a binary task; null = the source's.")
    version_with_dvc: bool = Field(description="Track the raw dataset with DVC and record its hash.")
    dvc_push: bool = Field(description="Push the dataset version to the DVC remote.")
    label_maps: dict[str, dict[str, str]] = Field(
        description="Per source: raw label → class (matched case-insensitively). Labels a source's map does "
        "not list are excluded and counted (ingest_summary.json: excluded_by_label_mapping); sources "
        "without a map keep their labels.")
    synthetic: SyntheticSection
    ingest: IngestSection
    admission: AdmissionSection
    dicomweb: DicomwebSection


class ValidateSection(_Section):
    min_rows: int = Field(ge=1, description="Fewest images a dataset may have (critical).")
    warn_min_rows: int = Field(ge=1, description="Fewer images than this raise a warning (too few to train well).")
    max_rows: int = Field(ge=1, description="Most images a dataset may have (critical).")
    prevalence_range: tuple[float, float] = Field(description="Allowed share of the positive class (warning).")
    max_images_per_patient: int = Field(ge=1, description="Most images one patient may have (warning).")
    size_range: tuple[int, int] | None = Field(description="Allowed image side range; null = the source's.")
    mean_range: tuple[float, float] = Field(description="Allowed mean intensity on a 0-1 scale (warning).")
    std_range: tuple[float, float] = Field(description="Allowed intensity std on a 0-1 scale (warning).")
    fail_on_warning: bool = Field(description="Treat warning-level failures as critical.")


class SplitSection(_Section):
    fractions: tuple[float, float, float] = Field(description="Train/val/test fractions of patients.")
    near_duplicate_hamming: int = Field(ge=0, le=31,
                                        description="Max differing bits (of 256) of near-duplicate pHashes.")
    near_duplicate_action: Literal["merge", "drop", "report"] = Field(
        description="merge: keep near-duplicate patients on one side; drop: remove the later image; "
        "report: only list them.")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"must be three positive numbers summing to 1, got {list(v)}")
        return v


class AugmentSection(_Section):
    rotation_deg: float = Field(ge=0, le=45, description="Max rotation in degrees.")
    translate: float = Field(ge=0, le=0.5, description="Max translation as a fraction of the side.")
    zoom: float = Field(ge=0, le=0.5, description="Max zoom in/out as a fraction.")
    contrast: float = Field(ge=0, le=1, description="Max contrast change factor.")
    brightness: float = Field(ge=0, le=1, description="Max brightness change factor.")
    horizontal_flip: bool = Field(description="Flip left/right (off for chest X-rays: anatomy is lateralised).")
    shear_deg: float = Field(ge=0, le=45, description="Max shear angle in degrees.")
    fill_mode: Literal["constant", "nearest", "reflect", "wrap"] = Field(
        description="How pixels moved in from outside the image are filled (constant = black).")


class TrainSection(_Section):
    model: str = Field(description="Zoo model name (see `xrayops model list`).")
    image_size: int | None = Field(ge=8, description="Input side in pixels; null = the model's default.")
    channels: Literal[1, 3] | None = Field(description="Input channels; null = the model's default.")
    epochs: int = Field(ge=1, description="Training epochs (phase 1 for transfer models).")
    batch_size: int = Field(ge=1, description="Batch size per replica.")
    learning_rate: float = Field(gt=0, description="Initial learning rate.")
    loss: Literal["crossentropy", "focal"] = Field(description="Loss; focal applies to binary tasks.")
    class_weights: bool = Field(description="Weight classes by inverse frequency in the training split.")
    calibration: Literal["platt", "none"] = Field(
        description="Binary models: Platt scaling fitted on the validation split after training and folded into "
        "the output layer (the saved model outputs calibrated probabilities; AUC and ranking unchanged).")
    early_stopping_patience: int = Field(ge=1, description="Epochs without val improvement before stopping.")
    reduce_lr_patience: int = Field(ge=1, description="Epochs without val improvement before halving the LR.")
    weights: str = Field(description="Transfer backbones: imagenet | none | path to a .weights.h5 file.")
    fine_tune_epochs: int = Field(ge=0, description="Phase-2 epochs with the top layers unfrozen.")
    fine_tune_layers: int = Field(ge=0, description="Backbone layers to unfreeze in phase 2.")
    fine_tune_learning_rate: float = Field(gt=0, description="Learning rate of phase 2.")
    mixed_precision: Literal["auto", "on", "off"] = Field(description="mixed_float16 on GPUs when auto.")
    xla: bool = Field(description="Compile with XLA (slower on CPU).")
    deterministic: bool = Field(description="Enable TensorFlow op determinism (slower).")
    cache: bool = Field(description="Cache decoded, resized images in memory.")
    augment: AugmentSection


class EvaluateSection(_Section):
    threshold_policy: Literal["sensitivity_floor", "youden", "fixed"] = Field(
        description="How the operating threshold is chosen on the validation split.")
    sensitivity_floor: float = Field(gt=0, le=1, description="Minimum validation sensitivity (policy floor).")
    fixed_threshold: float = Field(gt=0, lt=1, description="Threshold for policy 'fixed'.")
    bootstrap_resamples: int = Field(ge=10, description="Patient-level bootstrap resamples for CIs.")
    ci_level: float = Field(gt=0.5, lt=1, description="Confidence level of intervals.")
    calibration_bins: int = Field(ge=2, description="Bins of the reliability diagram / ECE.")
    gradcam_examples: int = Field(ge=0, description="Images per cell of the Grad-CAM grid.")
    gradcam_sanity_max_rank_corr: float = Field(description="Max rank correlation trained vs randomised.")
    explain_methods: list[Literal["gradcam", "integrated_gradients", "smoothgrad"]] = Field(
        min_length=1, description="Explanation methods whose examples, randomisation sanity check and lung-field "
        "mass evaluation logs (gradcam is always the model card's headline).")
    ig_steps: int = Field(ge=2, description="Integrated Gradients: trapezoid intervals between baseline and image.")
    ig_baseline: Literal["black", "blur"] = Field(
        description="Integrated Gradients baseline: all-zero image or the image under a strong Gaussian blur "
        "(black is degenerate for models that standardise each image: their attributions sum to ~0).")
    ig_sanity_max_rank_corr: float = Field(description="Integrated Gradients: max rank corr trained vs randomised.")
    smoothgrad_samples: int = Field(ge=0, description="SmoothGrad noisy copies per image (0 = vanilla gradient).")
    smoothgrad_sigma: float = Field(ge=0, description="SmoothGrad noise σ as a share of the image's value range.")
    smoothgrad_sanity_max_rank_corr: float = Field(description="SmoothGrad: max rank corr trained vs randomised.")
    explain_batch_size: int = Field(ge=1, description="Images per gradient call for IG steps and SmoothGrad "
                                    "samples (bounds memory).")
    subgroup_attributes: list[SubgroupAttribute] = Field(
        description="Attributes reported per subgroup (site = the manifest's site column, else source; view = "
        "view_position); absent columns are skipped and said so.")
    subgroup_min_patients: int = Field(ge=1, description="Categories with fewer test patients are pooled into "
                                       "'other' (never shown by name).")
    failure_top_k: int = Field(ge=0, description="Most confident false positives and false negatives listed in "
                               "the failure analysis (by image_id only).")
    quality_features: list[QualityFeature] = Field(
        description="Manifest image-quality features whose quantile bins get error rates in the failure analysis.")
    quality_bins: int = Field(ge=2, description="Quantile bins per quality feature; bins with fewer than "
                              "subgroup_min_patients test patients are merged with a neighbour.")
    shortcut_masks: dict[str, list[tuple[float, float, float, float]]] = Field(
        description="Shortcut test: named regions, each a list of [x0, y0, x1, y1] rectangles in relative "
        "coordinates (0-1), masked (and shuffled within site) before re-scoring the test set; {} = off.")
    shortcut_shuffle_within_site: bool = Field(
        description="Also re-score with each region's content swapped between test images of the same site.")
    shortcut_auc_drop_alert: float = Field(ge=0, le=1, description="Flag a shortcut when masking a region lowers "
                                           "test AUC by more than this and the ΔAUC interval lies below zero.")

    @field_validator("shortcut_masks")
    @classmethod
    def _relative_rects(cls, v: dict[str, list[tuple[float, float, float, float]]]
                        ) -> dict[str, list[tuple[float, float, float, float]]]:
        for name, rects in v.items():
            for x0, y0, x1, y1 in rects:
                if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                    raise ValueError(f"mask {name!r}: rectangle {[x0, y0, x1, y1]} must be [x0, y0, x1, y1] with "
                                     "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return v


class PromoteSection(_Section):
    registered_model: str | None = Field(description="Registered model name; null = <project>-<dataset>.")
    min_auc: float = Field(ge=0, le=1, description="Absolute floor on test ROC-AUC (binary).")
    min_accuracy: float = Field(ge=0, le=1, description="Absolute floor on test accuracy (multi-class).")
    sensitivity_ci_floor: float = Field(ge=0, le=1, description="Floor on the sensitivity CI lower bound.")
    auc_margin: float = Field(ge=0, description="Non-inferiority margin on paired ΔAUC lower bound.")
    require_superiority: bool = Field(description="Also require the ΔAUC lower bound > 0.")
    max_ece: float = Field(ge=0, le=1, description="Upper limit of expected calibration error.")
    require_approval: bool = Field(description="Pause for a human decision before moving 'champion'.")
    approval_timeout_s: int = Field(ge=1, description="Seconds to wait for a reviewer.")
    approval_poll_s: int = Field(ge=1, description="Seconds between checks for the reviewer's answer.")
    export_onnx: bool = Field(description="Export the registered model to ONNX with a parity check.")
    registry_lock_timeout_s: float = Field(gt=0, description="How long an alias move (promotion, approval, "
                                           "rollback) waits for another writer's registry lock before it fails.")
    registry_write_limit: str | None = Field(
        description="Prefect global concurrency limit (limit 1) the flows and the CLI also take around alias moves, "
        "for a registry other machines can write to (the file lock under paths.home covers one machine); it must "
        "exist: `prefect gcl create registry-write --limit 1`. null = the file lock only, which is allowed only "
        "for a local SQLite/file registry: with a registry server or database (http(s)://, postgresql://, ...) "
        "alias moves are refused until this is set (e.g. registry-write).")
    subgroup_by: SubgroupAttribute = Field(description="Attribute whose subgroups the subgroup criteria check.")
    subgroup_min_patients: int = Field(ge=1, description="Subgroups with fewer test patients are not checked by "
                                       "the subgroup criteria (they are still reported).")
    subgroup_sensitivity_ci_floor: float | None = Field(
        ge=0, le=1, description="Floor on the sensitivity CI lower bound in every checked subgroup; null = off.")
    subgroup_auc_margin: float | None = Field(
        ge=0, description="Worst-subgroup non-inferiority: the challenger's worst checked subgroup AUC must be >= "
        "the re-scored champion's worst minus this margin; null = off.")


class MonitorSection(_Section):
    drift_share_threshold: float = Field(ge=0, le=1, description="Drifted-feature share that raises an alert.")
    min_rows: int = Field(ge=1, description="Fewest production rows for a meaningful report.")
    window_hours: float | None = Field(description="Current window: last N hours; null = use last_k.")
    last_k: int = Field(ge=1, description="Current window: last K predictions when window_hours is null.")
    simulate_rows: int = Field(ge=0, description="Production images simulated by the main job (0 = none).")
    simulate_shift: float = Field(ge=0, description="Acquisition shift of the simulated production batch.")
    simulate_shifted_fraction: float = Field(ge=0, le=1, description="Share of simulated images that are shifted.")
    retrain_on_drift: bool = Field(description="Trigger the training deployment when drift is detected.")
    include_simulation: bool = Field(description="Also compare simulated traffic (paths.simulation_log) in "
                                     "`xrayops monitor`; drift on it never triggers retraining. false = real "
                                     "traffic (api, ui, pacs) only.")
    embedding_components: int = Field(ge=1, description="PCA components of the penultimate-layer embedding.")
    training_deployment: str = Field(description="Prefect deployment ('flow-name/deployment-name') run when drift "
                                     "is detected and retrain_on_drift is set.")
    feedback_dataset: str = Field(description="Raw dataset (folder source, <data_dir>/raw/<name>) built from "
                                  "adjudicated clinician feedback by `xrayops feedback ingest`.")
    estimation_resamples: int = Field(ge=1, description="Bootstrap resamples of the label-free estimates' "
                                      "intervals (CBPE performance, BBSE prevalence).")
    cbpe_auc_drop_alert: float = Field(ge=0, le=1, description="Alert when the CBPE-estimated AUC of the window "
                                       "is lower than the reference's realised AUC by more than this.")
    prevalence_change_alert: float = Field(ge=0, le=1, description="Alert when the BBSE-estimated prevalence of "
                                           "the window differs from the reference prevalence by more than this.")
    mmd_alpha: float = Field(gt=0, lt=1, description="Embedding drift when the MMD permutation p-value on the "
                             "emb_pc* columns is below this.")
    mmd_permutations: int = Field(ge=1, description="Permutations of the MMD test (seeded with base.seed).")
    mmd_max_rows: int = Field(ge=2, description="Rows per side in the MMD test (a seeded sample of larger sets).")
    workspace: str | None = Field(description="Evidently workspace folder: each monitoring run adds a snapshot to "
                                  "the registered model's project there (timeline dashboard, `xrayops monitor ui`). "
                                  "null = <paths.home>/evidently-workspace; relative paths are from params.yaml.")
    feedback_min_clinicians: int = Field(ge=1, description="A feedback case becomes training data when at least "
                                         "this many distinct signed-in clinicians gave it the same label (and none "
                                         "another), unless an adjudicator decided it.")
    feedback_adjudicator_decides: bool = Field(description="An adjudicator's decision (UI 'Resolve disagreements' or "
                                               "adjudications.csv) labels a case whatever the clinicians said; "
                                               "false = only adjudications.csv does.")


class ServeSection(_Section):
    host: str = Field(description="API bind address.")
    port: int = Field(ge=1, le=65535, description="API port.")
    model_alias: str = Field(description="Registry alias served.")
    api_key_env: str = Field(description="Environment variable holding the API key.")
    require_api_key: bool = Field(description="Reject requests without a valid X-API-Key.")
    max_upload_bytes: int = Field(ge=1, description="Largest accepted upload.")
    max_pixels: int = Field(ge=1, description="Largest accepted width*height.")
    min_side: int = Field(ge=1, description="Smallest accepted image side.")
    max_aspect: float = Field(ge=1, description="Largest accepted aspect ratio.")
    workers: int = Field(ge=1, description="Inference thread pool size.")
    max_queue: int = Field(ge=0, description="Predictions that may wait for an inference thread beyond "
                           "serve.workers; more are refused at once with 503 `overloaded` + Retry-After.")
    request_timeout_s: float = Field(gt=0, description="Longest a prediction may wait and run; then 504 `timeout` "
                                     "(work already running finishes and its answer is dropped).")
    rate_limit_per_s: float | None = Field(gt=0, description="Requests per second per API key on /v1/* (token "
                                           "bucket); above it 429 `rate_limited` + Retry-After. null = no limit.")
    rate_limit_burst: int = Field(ge=1, description="Requests a key may send at once before serve.rate_limit_per_s "
                                  "applies (bucket size).")
    alias_poll_s: float = Field(gt=0, description="Seconds between checks for a moved alias.")
    engine: Literal["onnx", "tf"] = Field(description="Inference engine of the compiled path.")
    log_flush_s: float = Field(ge=0, description="Seconds between production-log flushes (0 = write every "
                               "prediction at once).")
    on_alias_missing: Literal["keep_serving", "stop"] = Field(
        description="When no version holds serve.model_alias any more: 'stop' answers 503 (alias_missing) "
                    "until a verified version holds it again; 'keep_serving' keeps answering with the last "
                    "verified version (/readyz still reports 503 alias_missing).")
    fhir_url: str | None = Field(description="FHIR R4 base URL the PACS results' DiagnosticReport bundles are "
                                 "POSTed to (transaction bundle); null = written to pacs.fhir_dir only.")


class PacsSection(_Section):
    """Results back to the hospital's PACS (`xrayops pacs process|listen`; the connection is data.dicomweb)."""

    state_dir: str | None = Field(description="Records, links and the listener cursor; null = "
                                  "<paths.home>/pacs.")
    fhir_dir: str | None = Field(description="Outbox of FHIR bundles (hospital-bound, files 0600); null = "
                                 "<pacs.state_dir>/fhir-outbox.")
    fhir_timeout_s: float = Field(gt=0, description="Seconds to wait for the FHIR server (serve.fhir_url).")
    secondary_capture: bool = Field(description="Also store the Grad-CAM overlay as a Secondary Capture "
                                    "image in the study (labelled not for diagnosis).")
    institution_name: str | None = Field(description="InstitutionName written into the reports.")
    organisation: str = Field(min_length=1, description="VerifyingOrganization of signed-off reports.")
    orthanc_url: str | None = Field(description="Orthanc REST root for the listener's change feed; null = "
                                    "the DICOMweb URL without its last path segment (…/dicom-web → …).")
    feed: Literal["orthanc", "qido"] = Field(description="How the listener finds stable studies: Orthanc's change "
                                             "feed, or QIDO-RS searches by StudyDate (any DICOMweb PACS).")
    qido_days: int = Field(ge=1, le=31, description="pacs.feed=qido: search studies dated within this many days "
                           "(today included).")
    qido_quiet_s: float = Field(ge=0, description="pacs.feed=qido: a study is stable once its instance count has "
                                "not changed for this long (0 = at first sight).")
    poll_s: float = Field(gt=0, description="Seconds between polls of the change feed.")
    changes_limit: int = Field(ge=1, le=10000, description="Changes read per request of the change feed.")
    start_at: Literal["latest", "beginning"] = Field(description="Where a listener without a cursor "
                                                     "starts: the feed's end (new studies only) or its beginning.")
    dispatch: Literal["flow", "direct", "deployment"] = Field(description="How the listener processes a "
                                                              "stable study: run the Prefect flow in its process, "
                                                              "call the library directly, or start a deployment run.")
    deployment: str | None = Field(description="FLOW/DEPLOYMENT of pacs_inference_flow, for "
                                   "pacs.dispatch=deployment.")


class UiSection(_Section):
    auth: Literal["auto", "local", "oidc", "none"] = Field(
        description="Sign-in of the clinician app: oidc = Streamlit's st.login with the [auth] block of "
        "secrets_file; local = users_file (`xrayops ui users add`); auto = oidc when secrets_file has an [auth] "
        "block, else local; none = no sign-in, refused on any non-loopback address.")
    users_file: str | None = Field(description="Local user file (scrypt-hashed passwords, roles; also the roles of "
                                   "OIDC users); null = <paths.home>/secrets/ui_users.json.")
    secrets_file: str | None = Field(description="Streamlit secrets TOML holding the OIDC [auth] block; null = "
                                     "<params.yaml folder>/.streamlit/secrets.toml.")
    max_failed_logins: int = Field(ge=1, description="Failed local sign-ins of one user name before it is locked.")
    lockout_s: float = Field(gt=0, description="Seconds a user name stays locked after max_failed_logins.")
    failed_login_delay_s: float = Field(ge=0, description="Pause after each failed local sign-in (slows guessing).")


class OrchestrateSection(_Section):
    timezone: str = Field(description="Timezone of schedules.")
    training_cron: str = Field(description="Cron schedule of the training deployment.")
    monitoring_cron: str = Field(description="Cron schedule of the monitoring deployment.")
    work_pool: str = Field(description="Prefect work pool the deployments run on.")
    concurrency_limit: int | None = Field(
        ge=1, description="Most runs of one deployment at a time (each flow applied by `xrayops deploy`); a run "
        "beyond it waits in the queue until one ends. null = no limit.")
    task_retries: int = Field(ge=0, description="Retries of I/O tasks.")
    task_retry_delay_s: float = Field(ge=0, description="First retry delay (doubles each retry).")
    task_timeout_s: float = Field(gt=0,
                                  description="Timeout of one attempt of an I/O task (DVC push, MLflow registry).")
    dask_address: str | None = Field(description="Dask scheduler for data tasks; 'local' = a local cluster.")


class Settings(_Section):
    """The whole of ``params.yaml``; ``root`` is the folder relative paths resolve against."""

    base: BaseSection
    paths: PathsSection
    data: DataSection
    validate_: ValidateSection = Field(alias="validate")
    split: SplitSection
    train: TrainSection
    evaluate: EvaluateSection
    promote: PromoteSection
    monitor: MonitorSection
    serve: ServeSection
    ui: UiSection
    orchestrate: OrchestrateSection
    pacs: PacsSection
    root: Path = Field(default=Path("."), exclude=True, description="Folder of params.yaml.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.validate_.min_rows > self.validate_.max_rows:
            raise ValueError("validate.min_rows must not exceed validate.max_rows")
        return self

    # ---------------------------------------------------------------- derived locations

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Resolve a configured path against the folder of ``params.yaml`` (never the cwd)."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def home(self) -> Path:
        return self.resolve(self.paths.home)

    @property
    def reports_dir(self) -> Path:
        return self.resolve(self.paths.reports_dir)

    @property
    def dataset_name(self) -> str:
        return self.data.name or self.data.source.replace(":", "-")

    @property
    def raw_dir(self) -> Path:
        return self.resolve(self.data.input or Path(self.paths.data_dir) / "raw" / self.dataset_name)

    @property
    def dataset_dir(self) -> Path:
        return self.resolve(self.data.dataset_dir or Path(self.paths.data_dir) / "datasets" / self.dataset_name)

    @property
    def model_dir(self) -> Path:
        """Training/evaluation outputs of this dataset (DVC stage outs)."""
        return self.resolve(Path(self.paths.models_dir) / self.dataset_name)

    @property
    def experiment_name(self) -> str:
        return f"{self.base.project}/{self.dataset_name}"

    @property
    def tracking_uri(self) -> str:
        if self.paths.mlflow_tracking_uri:
            return self.paths.mlflow_tracking_uri
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def registry_uri(self) -> str:
        return self.paths.mlflow_registry_uri or self.tracking_uri

    @property
    def artifact_root(self) -> str | None:
        """Artifact root of new experiments; None = the tracking server's default (proxied artifacts)."""
        if self.paths.mlflow_artifact_root:
            root = self.paths.mlflow_artifact_root
            return root if "://" in root else self.resolve(root).as_uri()
        if self.tracking_uri.startswith(("http://", "https://")):
            return None  # a team server stores artifacts itself (--artifacts-destination, e.g. S3/MinIO)
        return (self.home / "mlartifacts").as_uri()

    @property
    def prefect_home(self) -> Path:
        return self.resolve(self.paths.prefect_home or self.home / "prefect")

    @property
    def dvc_remote(self) -> str:
        remote = self.paths.dvc_remote
        if remote and "://" in remote:
            return remote
        return str(self.resolve(remote or self.home / "dvc-remote"))

    @property
    def production_log(self) -> Path:
        return self.resolve(self.paths.production_log or self.home / "production-log")

    @property
    def feedback_log(self) -> Path:
        return self.resolve(self.paths.feedback_log or self.home / "feedback")

    @property
    def ui_users_file(self) -> Path:
        return self.resolve(self.ui.users_file or self.home / "secrets" / "ui_users.json")

    @property
    def ui_secrets_file(self) -> Path:
        return self.resolve(self.ui.secrets_file or Path(".streamlit") / "secrets.toml")

    @property
    def simulation_log(self) -> Path:
        return self.resolve(self.paths.simulation_log or self.home / "simulation-log")

    @property
    def audit_log(self) -> Path:
        return self.resolve(self.paths.audit_log or self.home / "audit" / "audit.jsonl")

    @property
    def registered_model(self) -> str:
        return self.promote.registered_model or f"{self.base.project}-{self.dataset_name}"

    def section(self, name: str) -> BaseModel:
        """Return a section by its ``params.yaml`` name."""
        return getattr(self, "validate_" if name == "validate" else name)

    def to_params(self) -> dict[str, Any]:
        """The settings as a plain dict keyed like ``params.yaml``."""
        return self.model_dump(mode="json", by_alias=True)

    def flat_params(self) -> dict[str, Any]:
        """``section.field`` → value, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_params())
        return out


# --------------------------------------------------------------------------- loading


def find_params_file(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``params.yaml``: explicit path, ``$XRAYOPS_PARAMS``, the cwd, then the project checkout."""
    candidates: list[Path] = []
    if path:
        candidates.append(Path(path))
    elif os.environ.get(PARAMS_ENV):
        candidates.append(Path(os.environ[PARAMS_ENV]))
    else:
        candidates += [Path.cwd() / PARAMS_FILE, Path(__file__).resolve().parents[1] / PARAMS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"cannot find params.yaml (looked at: {', '.join(str(c) for c in candidates)}). "
        f"Run from the project folder, pass --params PATH, or set {PARAMS_ENV}."
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.field=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.field=value (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to a params dict (a new dict is returned)."""
    import copy

    result = copy.deepcopy(params)
    for text in overrides:
        keys, value = parse_override(text)
        _set_field(result, keys, value, f"override {text!r}")
    return result


def apply_values(params: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set typed values by ``section.field`` key on a params dict, as given: no YAML parsing of strings
    (a new dict is returned)."""
    import copy

    result = copy.deepcopy(params)
    for key, value in values.items():
        keys = str(key).strip().split(".")
        if any(not part for part in keys):
            raise ConfigError(f"setting {key!r} is not of the form section.field (e.g. data.input)")
        _set_field(result, keys, copy.deepcopy(value), f"setting {key!r}")
    return result


def _set_field(params: dict[str, Any], keys: list[str], value: Any, label: str) -> None:
    """Set ``params[k1][k2]…`` to ``value``; an unknown section or field is a ConfigError naming ``label``."""
    node = params
    for depth, k in enumerate(keys[:-1]):
        if not isinstance(node.get(k), dict):
            where = ".".join(keys[: depth + 1])
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ConfigError(f"{label}: unknown section '{where}' (known: {known})")
        node = node[k]
    if keys[-1] not in node:
        known = ", ".join(sorted(node))
        raise ConfigError(f"{label}: unknown field '{'.'.join(keys)}' (known here: {known})")
    node[keys[-1]] = value


def _explain(exc: ValidationError, origin: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate")
        if err["type"] == "missing":
            lines.append(f"{loc}: missing — add it to params.yaml or pass --set {loc}=VALUE")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field — remove it or check the spelling")
        else:
            got = err.get("input")
            lines.append(f"{loc}: {err['msg']} (got {got!r})")
    return ConfigError(f"invalid configuration in {origin}:\n  " + "\n  ".join(lines))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
) -> Settings:
    """Load ``params.yaml``, apply overrides and validate.

    Raises:
        ConfigError: the file is missing or malformed, or a field is missing, unknown or invalid.
    """
    params_path = find_params_file(path)
    try:
        params = yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{params_path} must hold a mapping of sections, found {type(params).__name__}")
    return settings_from_dict(params, [*env_overrides(), *(overrides or [])], root=params_path.parent,
                              origin=str(params_path))


def env_overrides() -> list[str]:
    """Overrides from ``$XRAYOPS_SET``: ``section.field=value`` items separated by ``;`` or newlines."""
    raw = os.environ.get(OVERRIDES_ENV, "")
    return [item.strip() for item in raw.replace("\n", ";").split(";") if item.strip()]


def settings_from_dict(
    params: dict[str, Any], overrides: list[str] | None = None, *, root: Path, origin: str = "params"
) -> Settings:
    """Validate a params dict (plus overrides) into :class:`Settings`."""
    merged = apply_overrides(params, overrides or [])
    try:
        return Settings.model_validate({**merged, "root": root})
    except ValidationError as exc:
        raise _explain(exc, origin) from None


def with_overrides(settings: Settings, overrides: list[str]) -> Settings:
    """Return a copy of ``settings`` with more overrides applied and validated."""
    if not overrides:
        return settings
    return settings_from_dict(settings.to_params(), overrides, root=settings.root, origin="overrides")


def with_values(settings: Settings, values: Mapping[str, Any]) -> Settings:
    """Return a copy of ``settings`` with typed values set by ``section.field`` key and validated.

    For values that are already typed (Prefect UI form fields, API payloads): a string stays the
    string it is (``/data/cxr #2``, ``1.10``), unlike ``section.field=value`` overrides, whose value
    is read as YAML. The pydantic models still validate every value.

    Raises:
        ConfigError: an unknown section or field, or a value the models reject.
    """
    if not values:
        return settings
    params = apply_values(settings.to_params(), values)
    try:
        return Settings.model_validate({**params, "root": settings.root})
    except ValidationError as exc:
        raise _explain(exc, "settings") from None
