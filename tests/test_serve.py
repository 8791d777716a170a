"""Serving: RLE against pycocotools, the config file, the API in-process (no Ray), then the real thing: the Serve
application on one local Ray cluster (module fixture, 2 CPUs, replicas at fractional CPUs) over HTTP with httpx
and the official `openai` client, error handling, the CLI client, and autoscaling up and back down.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from serve.config import DEFAULT_CONFIG, GPU_CONFIG, ServeConfig
from serve.masks import MaskFormatError, decode_rle, encode_rle, png_decode, string_to_counts

API_KEY = "test-key-7c1d"
H, W = 48, 64


def _png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, (H, W, 3), dtype=np.uint8)


def _chat_body(image: np.ndarray, **medplib) -> dict:
    return {
        "model": "medplib-tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Please segment the region."},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_b64(image)}},
                ],
            }
        ],
        "max_tokens": 4,
        "medplib": {
            "boxes": [{"x0": 4, "y0": 6, "x1": 40, "y1": 30}],
            "segment": True,
            "return_masks": True,
            **medplib,
        },
    }


# --- masks ---------------------------------------------------------------------------------------------------------
def test_rle_matches_pycocotools():
    coco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((h, w)) < rng.random()
        if trial % 4 == 0:
            mask = np.zeros((h, w), bool)
            mask[h // 3 :, : w // 2] = True
        ref = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = encode_rle(mask)
        assert ours["counts"] == ref["counts"].decode() and ours["size"] == [h, w]
        assert np.array_equal(decode_rle(ours), mask)
        assert np.array_equal(decode_rle(encode_rle(mask, compressed=False)), mask)
        assert np.array_equal(
            decode_rle({"size": [h, w], "counts": ref["counts"].decode()}), coco.decode(ref) > 0
        )
    big = np.zeros((600, 700), bool)
    big[50:550, 3:690] = True  # long runs: multi-character numbers, negative deltas
    assert (
        encode_rle(big)["counts"] == coco.encode(np.asfortranarray(big.astype(np.uint8)))["counts"].decode()
    )


def test_rle_rejects_malformed():
    with pytest.raises(MaskFormatError, match="sum to 6"):
        decode_rle({"size": [4, 4], "counts": [1, 2, 3]})
    with pytest.raises(MaskFormatError, match="position 0"):
        string_to_counts("~~")
    with pytest.raises(MaskFormatError, match="middle of a number"):
        string_to_counts("0P")  # 'P' has the continuation bit and nothing follows
    with pytest.raises(MaskFormatError, match="size"):
        decode_rle({"size": [4], "counts": [16]})
    with pytest.raises(MaskFormatError, match="negative"):
        decode_rle({"size": [2, 2], "counts": [5, -1]})
    with pytest.raises(MaskFormatError, match="PNG"):
        png_decode(b"not a png")


# --- config --------------------------------------------------------------------------------------------------------
def test_config_files_are_valid_ray_serve_configs():
    from ray.serve.schema import ServeDeploySchema

    for path in (DEFAULT_CONFIG, GPU_CONFIG):
        raw = yaml.safe_load(path.read_text())
        ServeDeploySchema.model_validate(raw)  # what `serve deploy` checks
        cfg = ServeConfig.from_yaml(path)
        assert ServeConfig.from_serve_dict(cfg.to_serve_dict()) == cfg
        assert cfg.http.host == "127.0.0.1" and cfg.deployment.autoscaling_config.look_back_period_s > 10
    gpu = ServeConfig.from_yaml(GPU_CONFIG)
    assert (
        gpu.deployment.ray_actor_options.num_gpus == 1 and gpu.deployment.autoscaling_config.min_replicas == 1
    )


def test_config_names_the_bad_field(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["applications"][0]["deployments"][0]["autoscaling_config"]["look_back_period_s"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="look_back_period_s"):
        ServeConfig.from_yaml(bad)
    cfg = ServeConfig.from_yaml(DEFAULT_CONFIG)
    with pytest.raises(ValueError, match="unknown config key"):
        cfg.override({"args.limits.max_tokenz": 3})
    assert (
        cfg.override({"deployment.ray_actor_options.num_gpus": 1}).deployment.ray_actor_options.num_gpus == 1
    )


def test_client_imports_without_torch():
    """The client returns medplib's `Prediction`, yet a client-only install needs no torch at import."""
    code = "import sys, serve.client; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


# --- the API in one process (no Ray) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_api():
    from fastapi.testclient import TestClient

    from serve.api import LocalBackend, create_api
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    service = MedPLIBService(AppArgs(model="tiny"))
    backend = LocalBackend(service, api_key=API_KEY)
    with TestClient(create_api(backend), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client, backend


def test_local_native_predict_with_mask_prompt(local_api, image):
    client, _ = local_api
    region = np.zeros((H, W), bool)
    region[10:20, 5:25] = True
    body = {
        "image": _png_b64(image),
        "question": "What is in <region>?",
        "max_new_tokens": 3,
        "segment": True,
        "regions": [{"kind": "mask", "rle": encode_rle(region)}],
    }
    r = client.post("/v1/predict", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["answer"], str) and out["num_generated_tokens"] <= 3
    assert decode_rle(out["masks"][0]["rle"]).shape == (H, W) and out["masks"][0]["size"] == [H, W]
    assert out["timings"]["batch_size"] == 1 and out["prompt_tokens"] > 16
    r = client.post("/v1/predict", json={**body, "question": "<region> vs <region>"})
    assert r.status_code == 400 and "2 <region> markers but 1 region" in r.json()["error"]["message"]


def test_local_replica_error_is_500_with_logged_id(local_api, image, monkeypatch):
    client, backend = local_api
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("ray.serve.medplib")
    log.addHandler(handler)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(backend.service.predictor, "run", broken)
    try:
        r = client.post("/v1/chat/completions", json=_chat_body(image))
        with pytest.raises(RuntimeError, match="CUDA error"):
            backend.service.probe()  # what check_health runs: the replica would be replaced
        assert backend.service.needs_probe()
    finally:
        log.removeHandler(handler)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["code"] == "internal_error" and "CUDA" not in error["message"]
    assert any(error["error_id"] in rec.getMessage() and rec.exc_info for rec in records)
    monkeypatch.undo()
    backend.service.probe()
    assert not backend.service.needs_probe()
    assert client.post("/v1/chat/completions", json=_chat_body(image)).status_code == 200


def test_local_limits_and_timeout(local_api, image, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.api import create_api

    client, backend = local_api
    limits = backend.service.args.limits
    monkeypatch.setattr(limits, "max_image_pixels", H * W - 1)
    r = client.post("/v1/chat/completions", json=_chat_body(image))
    assert r.status_code == 413 and "limits.max_image_pixels" in r.json()["error"]["message"]
    monkeypatch.undo()
    many = [{"x": 1 + i, "y": 1 + i} for i in range(backend.service.max_regions + 1)]
    r = client.post("/v1/chat/completions", json=_chat_body(image, points=many))
    assert r.status_code == 400 and r.json()["error"]["param"] == "medplib"
    assert f"at most {backend.service.max_regions}" in r.json()["error"]["message"]

    async def slow(job):
        await asyncio.sleep(0.5)
        return await type(backend).generate(backend, job)

    monkeypatch.setattr(limits, "request_timeout_s", 0.1)
    monkeypatch.setattr(backend, "generate", slow)
    with TestClient(create_api(backend), headers={"Authorization": f"Bearer {API_KEY}"}) as quick:
        r = quick.post("/v1/chat/completions", json=_chat_body(image))
    assert r.status_code == 504 and "limits.request_timeout_s" in r.json()["error"]["message"]


# --- the Serve application on a local Ray cluster -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(ray_local):
    """Serve on the session's Ray, on a free loopback port, for the whole module; replicas at fractional CPUs
    get the API key through their runtime env."""
    from ray import serve

    port = _free_port()
    base = ServeConfig.from_yaml(DEFAULT_CONFIG).override(
        {
            "http.port": port,
            "args.model": "tiny",
            "deployment.ray_actor_options.num_cpus": 0.5,
            "deployment.ray_actor_options.runtime_env": {"env_vars": {"MEDPLIB_API_KEY": API_KEY}},
            "deployment.autoscaling_config.max_replicas": 1,
            "deployment.graceful_shutdown_timeout_s": 5,
        }
    )
    metrics_port = ray_local.nodes()[0]["MetricsExportPort"]
    try:
        yield base, metrics_port
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def server(cluster) -> str:
    from serve.app import run

    return run(cluster[0])


def _auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _good_request(url: str, image: np.ndarray) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat_body(image), headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["medplib"]["masks"][0]["size"] == [H, W]


@pytest.mark.slow
def test_chat_completion_with_box_returns_mask(server, image):
    r = httpx.post(f"{server}/v1/chat/completions", json=_chat_body(image), headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "medplib-tiny"
    assert isinstance(out["choices"][0]["message"]["content"], str)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert (
        usage["completion_tokens"] <= 4
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    (mask,) = out["medplib"]["masks"]
    assert mask["size"] == [H, W]
    from_rle = decode_rle(mask["rle"])
    from_png = png_decode(base64.b64decode(mask["png_base64"]))
    assert (
        from_rle.shape == (H, W)
        and np.array_equal(from_rle, from_png)
        and mask["area"] == int(from_rle.sum())
    )


@pytest.mark.slow
def test_openai_client_plain_and_streaming(server, image):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    body = _chat_body(image)
    assert [m.id for m in client.models.list().data] == ["medplib-tiny"]
    resp = client.chat.completions.create(
        model="medplib-tiny", messages=body["messages"], max_tokens=4, extra_body={"medplib": body["medplib"]}
    )
    assert isinstance(resp.choices[0].message.content, str) and resp.usage.completion_tokens <= 4
    masks = resp.model_extra["medplib"]["masks"]
    assert decode_rle(masks[0]["rle"]).shape == (H, W)

    stream = client.chat.completions.create(
        model="medplib-tiny",
        messages=body["messages"],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"medplib": body["medplib"]},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["medplib"]["masks"][0]["size"] == [H, W]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4
    assert text == resp.choices[0].message.content  # greedy: same answer streamed or not

    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, headers=_auth(), timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


@pytest.mark.slow
def test_models_health_and_openapi(server):
    models = httpx.get(f"{server}/v1/models", headers=_auth(), timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "medplib-tiny"
    assert httpx.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"  # no key needed
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    assert {"/v1/chat/completions", "/v1/predict", "/v1/models", "/healthz"} <= set(schema["paths"])
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def _bad_cases(image: np.ndarray) -> list[tuple[str, dict, int, str]]:
    """(name, httpx.post kwargs, expected status, a piece of the message)."""
    good = _chat_body(image)
    text_only = {**good, "messages": [{"role": "user", "content": "What is this?"}]}
    not_image = json.loads(json.dumps(good))
    not_image["messages"][0]["content"][1]["image_url"]["url"] = (
        "data:image/png;base64,"
        + base64.b64encode(b"GIF? no: just some text pretending to be an image").decode()
    )
    remote = json.loads(json.dumps(good))
    remote["messages"][0]["content"][1]["image_url"]["url"] = "https://example.org/scan.png"
    audio = json.loads(json.dumps(good))
    audio["messages"][0]["content"].append(
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    )
    big = b'{"messages": [' + b" " * (50 * 1024 * 1024) + b"]}"
    return [
        ("no image", {"json": text_only, "headers": _auth()}, 400, "no image"),
        ("not an image", {"json": not_image, "headers": _auth()}, 400, "not a readable image"),
        ("remote URL", {"json": remote, "headers": _auth()}, 400, "only data URLs"),
        (
            "50 MB body",
            {"content": big, "headers": {**_auth(), "Content-Type": "application/json"}},
            413,
            "limits.max_request_bytes",
        ),
        (
            "box outside",
            {
                "json": _chat_body(image, boxes=[{"x0": 10, "y0": 10, "x1": W + 20, "y1": 30}]),
                "headers": _auth(),
            },
            400,
            "medplib.boxes[0]: box",
        ),
        (
            "malformed RLE",
            {
                "json": _chat_body(image, boxes=[], masks=[{"rle": {"size": [H, W], "counts": [5, 7]}}]),
                "headers": _auth(),
            },
            422,
            "medplib.masks[0].rle",
        ),
        ("unknown content part", {"json": audio, "headers": _auth()}, 422, "'input_audio'"),
        ("wrong API key", {"json": good, "headers": _auth("nope")}, 401, "invalid API key"),
        ("no API key", {"json": good}, 401, "missing API key"),
        (
            "not JSON",
            {"content": b"{oops", "headers": {**_auth(), "Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        (
            "text/plain",
            {"content": b"{}", "headers": {**_auth(), "Content-Type": "text/plain"}},
            415,
            "Content-Type",
        ),
        ("too many tokens", {"json": {**good, "max_tokens": 100000}, "headers": _auth()}, 400, "max_tokens"),
    ]


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_app_keeps_serving(server, image):
    failures = []
    for name, kwargs, status, fragment in _bad_cases(image):
        try:
            r = httpx.post(f"{server}/v1/chat/completions", timeout=60, **kwargs)
            error = r.json().get("error", {})
            if r.status_code != status or fragment not in error.get("message", ""):
                failures.append(f"{name}: {r.status_code} {r.text[:300]}")
        except httpx.HTTPError as err:  # e.g. the connection dropped mid-upload
            failures.append(f"{name}: {type(err).__name__}: {err}")
        _good_request(server, image)  # the next good request is served
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_client_and_cli_predict_against_endpoint(server, image, tmp_path, monkeypatch):
    from medplib.prediction import Prediction
    from serve.client import MedPLIBAPIError, MedPLIBClient
    from workflows.cli import main

    path = tmp_path / "scan.png"
    Image.fromarray(image).save(path)
    region = np.zeros((H, W), bool)
    region[5:15, 5:15] = True
    with MedPLIBClient(server, api_key=API_KEY) as client:
        assert client.models() == ["medplib-tiny"]
        result = client.predict(
            path,
            "Where is <region> and <region>?",
            point=(10, 12),
            mask=region,
            max_new_tokens=3,
            segment=True,
        )
        assert isinstance(result, Prediction) and isinstance(result.text, str)
        assert result.masks[0].shape == (H, W) and result.masks[0].dtype == bool
        saved = result.save_masks(tmp_path / "pred")
        assert png_decode(saved[0].read_bytes()).shape == (H, W)
        with pytest.raises(MedPLIBAPIError) as err:
            client.predict(path, "hi", point=(W + 5, 1))
        assert err.value.status == 400 and err.value.param == "regions[0]"

    out = tmp_path / "cli" / "result.json"
    monkeypatch.setenv("MEDPLIB_API_KEY", API_KEY)  # where `medplib predict --endpoint` reads the key
    rc = main(
        [
            "predict",
            "--endpoint",
            server,
            "--image",
            str(path),
            "--question",
            "Segment <region>.",
            "--box",
            "4,6,40,30",
            "--segment",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    written = json.loads(out.read_text())
    assert written["masks"][0]["height"] == H and Path(written["masks"][0]["png"]).exists()
    assert png_decode(Path(written["masks"][0]["png"]).read_bytes()).shape == (H, W)


@pytest.mark.slow
def test_volume_job_over_http_and_the_cli(server, tmp_path, monkeypatch):
    """A NIfTI volume as a job on the Serve app (progress through the named actor), by the client and the CLI."""
    import nibabel as nib
    from clinical_files import small_brain

    from serve.client import MedPLIBClient
    from workflows.cli import main

    path = small_brain(tmp_path)
    source = nib.load(path)
    with MedPLIBClient(server, api_key=API_KEY) as client:
        pred = client.predict_volume(
            path, "Segment the brain.", axis="sagittal", max_new_tokens=1, poll_s=0.2
        )
    assert pred.mask.shape == source.shape and pred.slices_read == list(range(source.shape[0]))
    monkeypatch.setenv("MEDPLIB_API_KEY", API_KEY)
    out = tmp_path / "cli" / "result.json"
    argv = ["predict", "--endpoint", server, "--image", str(path), "--question", "Segment the brain."]
    assert main([*argv, "--segment", "--max-new-tokens", "1", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    mask = nib.load(written["mask_nifti"])
    assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
    r = httpx.post(
        f"{server}/v1/volumes",
        json={"image": base64.b64encode(b"PK\x03\x04broken").decode(), "question": "Segment."},
        headers=_auth(),
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


@pytest.mark.slow
def test_autoscaling_up_under_load_and_back_down(cluster, server, image):
    """A second application with 1..2 replicas at 0.25 CPU, target 1 ongoing request, batching off and short
    delays: 6 concurrent clients push it to 2 replicas; after the load it returns to 1."""
    from ray import serve

    from serve.app import replica_counts, run

    cfg = cluster[0].override(
        {
            "name": "scale",
            "route_prefix": "/scale",
            "args.batching.max_batch_size": 1,
            "deployment.ray_actor_options.num_cpus": 0.25,
            "deployment.autoscaling_config.min_replicas": 1,
            "deployment.autoscaling_config.max_replicas": 2,
            "deployment.autoscaling_config.target_ongoing_requests": 1,
            "deployment.autoscaling_config.upscale_delay_s": 1,
            "deployment.autoscaling_config.downscale_delay_s": 3,
            "deployment.autoscaling_config.look_back_period_s": 11,
        }
    )
    url = run(cfg)
    body = {"image": _png_b64(image), "question": "Describe it.", "max_new_tokens": 24}
    stop = threading.Event()
    served = []

    def client_loop() -> None:
        with httpx.Client(timeout=60, headers=_auth()) as http:
            while not stop.is_set():
                r = http.post(f"{url}/v1/predict", json=body)
                served.append(r.status_code)

    def others(counts: dict[str, int]) -> int:
        return sum(v for k, v in counts.items() if k != "RUNNING")

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    peak, deadline = 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            counts = replica_counts("scale")
            peak = max(peak, counts.get("RUNNING", 0))
            if peak >= 2:
                break
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert peak >= 2, f"never scaled above min_replicas=1 under load: {replica_counts('scale')}"
    assert served and set(served) == {200}, set(served)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = replica_counts("scale")
        if counts.get("RUNNING", 0) == 1 and others(counts) == 0:
            break
        time.sleep(1)
    assert counts.get("RUNNING", 0) == 1 and others(counts) == 0, f"did not scale back to 1: {counts}"
    serve.delete("scale")


@pytest.mark.slow
def test_custom_metrics_on_prometheus_endpoint(cluster, server, image):
    httpx.post(f"{server}/v1/chat/completions", json=_chat_body(image), headers=_auth(), timeout=60)
    httpx.post(f"{server}/v1/chat/completions", json={"messages": []}, headers=_auth(), timeout=60)
    wanted = {
        "ray_medplib_requests",
        "ray_medplib_request_latency_s_bucket",
        "ray_medplib_generated_tokens",
        "ray_medplib_masks_returned",
        "ray_medplib_errors",
        "ray_medplib_batch_size_bucket",
    }
    found: set[str] = set()
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and not wanted <= found:
        text = httpx.get(f"http://127.0.0.1:{cluster[1]}/metrics", timeout=10).text
        found = {
            line.split("{")[0].removesuffix("_total")
            for line in text.splitlines()
            if line.startswith("ray_medplib_")
        }
        time.sleep(2)
    assert wanted <= found, f"missing {sorted(wanted - found)}"
