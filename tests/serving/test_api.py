"""The real API under uvicorn on a loopback port: auth, predictions, limits, rejections, logging,
concurrency, alias moves and the OpenAPI document. The model is a tiny trained champion."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline.config import Settings, with_overrides
from pipeline.serving import production_log
from tests.data.helpers import PHI, dicom_bytes
from tests.serving.helpers import colour_png, encode, gated_copy, png, restore_champion, running_server, xray01

pytestmark = pytest.mark.slow

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def api(champion_project: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    import os

    from pipeline.serving.app import create_app

    log_dir = tmp_path_factory.mktemp("api-log")
    settings = with_overrides(champion_project, [f"paths.production_log={log_dir}", "serve.log_flush_s=0.1",
                                                 "serve.max_upload_bytes=300000", "serve.max_pixels=1000000",
                                                 "serve.workers=4", "serve.alias_poll_s=3600"])
    os.environ[settings.serve.api_key_env] = KEY
    try:
        with running_server(create_app(settings)) as url:
            yield url, settings
    finally:
        os.environ.pop(settings.serve.api_key_env, None)


def post(url: str, data: bytes, *, key: str | None = KEY, name: str = "upload.bin", form: dict[str, str] | None = None,
         **params: str) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.post(f"{url}/v1/predict", files={"file": (name, data)}, data=form, headers=headers, params=params,
                      timeout=60)


def wait_rows(log_dir: Path, n: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := production_log.count_rows(log_dir)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def test_probes_auth_and_model_info(api: tuple[str, Settings]) -> None:
    url, settings = api
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["ready"] and ready["version"] == "1" and ready["engine"] == "onnx"
    missing = httpx.get(f"{url}/v1/model")
    assert missing.status_code == 401 and missing.json()["error"]["reason"] == "missing_api_key"
    wrong = httpx.get(f"{url}/v1/model", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["reason"] == "invalid_api_key"
    assert post(url, png(1), key=None).status_code == 401
    info = httpx.get(f"{url}/v1/model", headers={"X-API-Key": KEY}).json()
    from pipeline.registry.read import get_alias

    champion = get_alias(settings, "champion")
    assert (info["name"], info["version"], info["alias"]) == (settings.registered_model, "1", "champion")
    assert info["threshold"] == pytest.approx(float(champion.tags["operating_threshold"]))
    assert info["embedding_components"] == settings.monitor.embedding_components
    assert "auc" in info["metrics"] and len(info["metrics"]["auc"]["ci"]) == 2


def test_predictions_match_the_model_and_the_locked_threshold(api: tuple[str, Settings]) -> None:
    url, settings = api
    from pipeline.registry.read import get_alias, load_version_model
    from pipeline.serving.predictor import Predictor

    champion = get_alias(settings, "champion")
    reference = Predictor.from_version(load_version_model(settings, champion), champion, settings.registered_model)
    for i, data in enumerate([png(10), encode(xray01(11, side=96), "JPEG", quality=95),
                              dicom_bytes(xray01(12, side=80), patient_id="MRN-LEAK-77", phi=PHI, view="AP")]):
        r = post(url, data, name=f"scan{i}.dat")
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["X-Request-ID"] == body["request_id"] and len(body["request_id"]) == 32
        from pipeline.data.imaging import decode_bytes

        expected = reference.predict_batch(reference.preprocess(decode_bytes(data, max_pixels=10**8))[None])[0]
        assert body["probability"] == pytest.approx(expected, abs=1e-4), "ONNX engine = Keras model"
        assert body["label"] == ("PNEUMONIA" if body["probability"] >= body["threshold"] else "NORMAL")
        assert body["model"] == {"name": settings.registered_model, "version": "1", "alias": "champion"}
        assert sum(body["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(("data", "status", "reason"), [
    (b"just some text, named .png by the client", 415, "not_an_image"),
    (colour_png(), 422, "colour_photograph"),
    (png(20, side=48), 422, "too_small"),
    (encode(np.full((64, 300), 0.5)), 422, "implausible_geometry"),
    (png(21)[:300], 422, "corrupt"),
    (encode(np.full((1200, 1200), 0.3)), 413, "too_many_pixels"),
    (b"\x89PNG\r\n\x1a\n" + bytes(400_000), 413, "too_large"),
    (dicom_bytes(xray01(22, side=80), patient_id="P", modality="CT"), 422, "out_of_policy"),  # data.admission
    (dicom_bytes(xray01(23, side=80), patient_id="P", view="LL"), 422, "out_of_policy"),
])
def test_rejections_are_4xx_with_a_reason(api: tuple[str, Settings], data: bytes, status: int, reason: str) -> None:
    url, _ = api
    r = post(url, data, name="scan.png")
    assert r.status_code == status, r.text
    assert r.json()["error"]["reason"] == reason and r.json()["error"]["detail"]


def test_every_outcome_is_logged_without_pixels_or_phi(api: tuple[str, Settings]) -> None:
    url, settings = api
    log_dir = settings.production_log
    before = production_log.count_rows(log_dir)
    dicom = dicom_bytes(xray01(30, side=80), patient_id="MRN-LEAK-99", phi=PHI, view="AP")
    assert post(url, dicom).status_code == 200
    assert post(url, png(31), form={"view_position": "pa"}).status_code == 200
    assert post(url, colour_png()).status_code == 422
    lateral = post(url, png(32), form={"view_position": "ll"})  # a declared lateral: not what the model learned
    assert lateral.status_code == 422 and lateral.json()["error"]["reason"] == "out_of_policy"
    assert wait_rows(log_dir, before + 2) == before + 2
    rows = production_log.read(log_dir)
    last = rows.tail(2)
    assert sorted(last["view_position"]) == ["AP", "PA"]
    assert {"mean", "entropy", "sharpness", "emb_pc1", "emb_pc4", "probability", "model_version"} <= set(rows.columns)
    assert rows["emb_pc1"].notna().all() and (rows["model_version"] == "1").all()
    text = rows.to_csv()
    assert not any(token in text for token in [*PHI.values(), "MRN-LEAK-99"])
    assert not any(rows[c].dtype == object and rows[c].astype(str).str.len().max() > 64 for c in rows.columns)
    time.sleep(0.3)
    rejected = production_log.read(log_dir / production_log.REJECTED_DIR)
    assert {"colour_photograph", "out_of_policy"} <= set(rejected["reason"]) and "mean" not in rejected.columns


def test_bounded_concurrent_load_has_no_errors(api: tuple[str, Settings]) -> None:
    url, settings = api
    before = production_log.count_rows(settings.production_log)
    images = [png(100 + i) for i in range(8)]
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: client.post(f"{url}/v1/predict", headers={"X-API-Key": KEY},
                                                        files={"file": ("x.png", images[i % 8])}), range(40)))
    assert [r.status_code for r in responses] == [200] * 40
    assert len({r.json()["request_id"] for r in responses}) == 40
    same = {round(r.json()["probability"], 6) for r in responses[::8]}
    assert len(same) == 1, "the same image gets the same answer under concurrency"
    assert wait_rows(settings.production_log, before + 40) == before + 40


def test_explain_returns_a_grad_cam_overlay_or_a_clear_501(api: tuple[str, Settings]) -> None:
    url, _ = api
    r = post(url, png(40), explain="true")
    try:
        import pipeline.evaluation.explain  # noqa: F401
    except ImportError:
        assert r.status_code == 501 and r.json()["error"]["reason"] == "explain_unavailable"
        return
    assert r.status_code == 200, r.text
    overlay = base64.b64decode(r.json()["explanation"]["overlay_png_base64"])
    assert overlay.startswith(b"\x89PNG")


def test_explain_chooses_the_method_and_refuses_an_unknown_one_with_the_list(api: tuple[str, Settings]) -> None:
    url, settings = api
    before = production_log.count_rows(settings.production_log)
    r = post(url, png(41), explain="integrated_gradients")
    assert r.status_code == 200, r.text
    body = r.json()["explanation"]
    assert body["method"] == "integrated_gradients"
    assert base64.b64decode(body["overlay_png_base64"]).startswith(b"\x89PNG")
    assert post(url, png(41), explain="true").json()["explanation"]["method"] == "gradcam"
    assert post(url, png(41), explain="false").json()["explanation"] is None
    bad = post(url, png(41), explain="lime")
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "unknown_explain_method"
    assert all(m in bad.json()["error"]["detail"] for m in ("gradcam", "integrated_gradients", "smoothgrad"))
    assert wait_rows(settings.production_log, before + 3) == before + 3, "the refused request is not scored"
    spec = httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/predict"]["post"]
    assert "unknown_explain_method" in spec["responses"]["400"]["description"]
    param = next(p for p in spec["parameters"] if p["name"] == "explain")
    assert "integrated_gradients" in param["examples"] and "smoothgrad" in param["description"]


def test_alias_move_is_picked_up_without_restart(api: tuple[str, Settings]) -> None:
    url, settings = api
    from pipeline.registry.read import get_alias
    from pipeline.registry.write import move_champion

    v1 = get_alias(settings, "champion")
    v2 = gated_copy(settings, v1)
    move_champion(settings, v2.version, reason="test alias move")
    try:
        r = httpx.post(f"{url}/v1/model/refresh", headers={"X-API-Key": KEY}, timeout=60).json()
        assert r["changed"] and r["model"]["version"] == str(v2.version)
        assert post(url, png(50)).json()["model"]["version"] == str(v2.version)
    finally:
        restore_champion(settings, v1.version)
        httpx.post(f"{url}/v1/model/refresh", headers={"X-API-Key": KEY}, timeout=60)


def test_openapi_documents_models_errors_and_auth(api: tuple[str, Settings]) -> None:
    url, _ = api
    doc = httpx.get(f"{url}/openapi.json").json()
    predict = doc["paths"]["/v1/predict"]["post"]
    assert {"200", "401", "413", "415", "422", "503"} <= set(predict["responses"])
    examples = predict["responses"]["422"]["content"]["application/json"]["examples"]
    assert {"colour_photograph", "too_small", "implausible_geometry", "corrupt", "invalid_request"} <= set(examples)
    assert {"PredictionOut", "ModelInfo", "ErrorOut"} <= set(doc["components"]["schemas"])
    assert doc["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert {"/healthz", "/readyz", "/v1/model", "/v1/model/refresh"} <= set(doc["paths"])
    assert json.dumps(doc)  # serialisable


def test_chunked_upload_over_the_limit_is_refused_before_parsing(api: tuple[str, Settings]) -> None:
    url, _ = api

    def body() -> Iterator[bytes]:
        yield b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(50):
            yield bytes(16_384)
        yield b"\r\n--xx--\r\n"

    r = httpx.post(f"{url}/v1/predict", content=body(), timeout=60,
                   headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 413 and r.json()["error"]["reason"] == "too_large"


def test_store_polls_the_alias_and_keeps_serving_when_a_load_fails(champion_project: Settings) -> None:
    from types import SimpleNamespace

    from pipeline.registry.read import get_alias
    from pipeline.registry.write import move_champion
    from pipeline.serving.model_store import ModelStore
    from pipeline.tracking import configure_mlflow

    settings = with_overrides(champion_project, ["serve.alias_poll_s=0.2"])

    def loader(_: Settings, version: object, alias: str) -> SimpleNamespace:
        if getattr(version, "tags", {}).get("broken") == "yes":
            raise RuntimeError("cannot load this one")
        return SimpleNamespace(version=str(version.version), model_name="m", engine=None)  # type: ignore[attr-defined]

    client = configure_mlflow(settings)
    v1 = get_alias(settings, "champion")
    store = ModelStore(settings, loader=loader).start()  # type: ignore[arg-type]
    try:
        assert store.current.version == str(v1.version)
        v_ok = gated_copy(settings, v1)
        move_champion(settings, v_ok.version, reason="poll test")
        deadline = time.monotonic() + 10
        while store.current.version != str(v_ok.version) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.current.version == str(v_ok.version), "the poller picked up the alias move"
        v_bad = gated_copy(settings, v1)
        client.set_model_version_tag(settings.registered_model, v_bad.version, "broken", "yes")
        move_champion(settings, v_bad.version, reason="poll test")
        deadline = time.monotonic() + 10
        while store.reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.current.version == str(v_ok.version) and store.reason == "model_load_failed"
        assert "cannot load" not in store.detail, "no internal exception text in the reported detail"
    finally:
        store.stop()
        restore_champion(settings, v1.version)
