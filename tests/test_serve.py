"""Serving: RLE against pycocotools, the config file, the API in-process (no Ray), then the real thing: the Serve
application on one local Ray cluster (module fixture, 2 CPUs, replicas at fractional CPUs) over HTTP with httpx
and the official `openai` client, error handling, the CLI client, and autoscaling up and back down.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from mlflow_servers import free_port
from PIL import Image

from medplib_client.masks import (
    MaskFormatError,
    MaskTooLarge,
    b64decode,
    decode_rle,
    encode_rle,
    png_decode,
    string_to_counts,
)
from serve.config import DEFAULT_CONFIG, GPU_CONFIG, ServeConfig

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


def test_rle_decode_is_chunked_and_checks_size_before_allocating(monkeypatch):
    import medplib_client.masks

    rng = np.random.default_rng(3)
    mask = rng.random((37, 41)) < 0.5  # many short runs: numbers cross every chunk boundary below
    mask[:, 20:] = False  # and long ones: multi-character numbers, negative deltas
    rle = encode_rle(mask)
    for chunk in (5, 13, 64):
        monkeypatch.setattr(medplib_client.masks, "_CHUNK_CHARS", chunk)
        assert np.array_equal(decode_rle(rle), mask)
        assert string_to_counts(rle["counts"]) == encode_rle(mask, compressed=False)["counts"]
    monkeypatch.undo()
    # The declared size is checked against the image and the pixel limit before a pixel is allocated.
    with pytest.raises(MaskFormatError, match=r"size \[20000, 20000\] does not match the image"):
        decode_rle({"size": [20000, 20000], "counts": "0"}, expected_hw=(37, 41))
    with pytest.raises(MaskTooLarge, match="at most 100") as err:
        decode_rle({"size": [10**30, 10**30], "counts": [1]}, max_pixels=100)
    assert err.value.limit == "pixels"
    with pytest.raises(MaskTooLarge, match="more than 1000 run lengths"):
        decode_rle({"size": [37, 41], "counts": "0" * 5000}, max_runs=1000)
    with pytest.raises(MaskTooLarge, match="5000 run lengths"):
        decode_rle({"size": [37, 41], "counts": [0] * 5000}, max_runs=1000)
    # A number with no end in sight (what made the old decoder quadratic) fails at its 13th character.
    with pytest.raises(MaskFormatError, match="number of 13 characters at position 1"):
        decode_rle({"size": [37, 41], "counts": "0" + "o" * 12 + "0"})
    with pytest.raises(MaskFormatError, match="number of 100001 characters at position 0"):
        decode_rle({"size": [37, 41], "counts": "o" * 100_000 + "0"})
    monkeypatch.setattr(medplib_client.masks, "_CHUNK_CHARS", 64)
    with pytest.raises(MaskFormatError, match="longer than 12 characters at position 0"):
        decode_rle({"size": [37, 41], "counts": "o" * 1000 + "0"})
    monkeypatch.undo()
    with pytest.raises(MaskFormatError, match="beyond"):
        decode_rle({"size": [2, 2], "counts": [1, 10**40]})
    with pytest.raises(MaskFormatError, match="'é' at position 2"):
        decode_rle({"size": [2, 2], "counts": "00é"})


def test_png_mask_size_is_checked_from_the_header(png_bomb):
    bomb = png_bomb(20000, 20000)  # 400 M pixels in a ~60 KB file: Pillow refuses it at open
    assert len(bomb) < 200_000
    with pytest.raises(MaskTooLarge, match="too large"):
        png_decode(bomb, expected_hw=(H, W))
    # Under Pillow's own limit, a mask of another size is refused before its pixels are decoded.
    with pytest.raises(MaskFormatError, match=f"9000x9000 \\(HxW\\), the image is {H}x{W}"):
        png_decode(png_bomb(9000, 9000), expected_hw=(H, W))
    region = np.zeros((H, W), bool)
    region[3:9, 4:7] = True
    assert np.array_equal(png_decode(base64.b64decode(_png_b64(region)), expected_hw=(H, W)), region)
    text = " \n".join(_png_b64(region)[i : i + 7] for i in range(0, 200, 7))  # whitespace anywhere is fine
    assert b64decode(text, "x") == base64.b64decode(text.replace(" ", "").replace("\n", ""))
    with pytest.raises(MaskFormatError, match="non-ASCII"):
        b64decode("QUJD\u00e9", "x")


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


# --- the API over real HTTP in one process (uvicorn thread, no Ray), with the official openai client ------------------
@pytest.fixture(scope="module")
def local_http():
    import torch

    from serve.api import LocalBackend, serve_in_thread
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    torch.manual_seed(0)  # a tiny model whose greedy answers run to max_tokens on the test image
    service = MedPLIBService(AppArgs(model="tiny"))
    url, stop = serve_in_thread(LocalBackend(service, api_key=API_KEY))
    yield url, service
    stop()


def _openai(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_openai_streaming_reads_tokens_before_the_last_is_generated(local_http, image, monkeypatch):
    """The model's last step waits until the client has read a piece of the answer: a server that sent the
    answer only after generating it would never get there (the wait would time out)."""
    url, service = local_http
    model = service.predictor.model
    generate = model.generate
    max_tokens, seen = 24, {"steps": 0, "released_in_time": None}
    client_read = threading.Event()

    def gated(batch, **kwargs):
        inner = kwargs["on_step"]

        def on_step(tokens):
            seen["steps"] += 1
            if seen["steps"] == max_tokens - 1:  # before the last token is generated
                seen["released_in_time"] = client_read.wait(timeout=30)
            return inner(tokens)

        return generate(batch, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(model, "generate", gated)
    body = _chat_body(image)
    stream = _openai(url).chat.completions.create(
        model="medplib-tiny",
        messages=body["messages"],
        max_tokens=max_tokens,
        stream=True,
        extra_body={"medplib": body["medplib"]},
    )
    pieces, final = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            client_read.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            final = chunk
    assert seen["steps"] == max_tokens and seen["released_in_time"] is True
    assert len(pieces) > 1 and final.choices[0].finish_reason == "length"
    assert final.model_extra["medplib"]["masks"][0]["size"] == [H, W]  # masks come in the final chunk
    monkeypatch.undo()
    whole = _openai(url).chat.completions.create(
        model="medplib-tiny",
        messages=body["messages"],
        max_tokens=max_tokens,
        extra_body={"medplib": body["medplib"]},
    )
    assert "".join(pieces) == whole.choices[0].message.content


def test_three_turn_conversation_keeps_the_first_image(local_http, image):
    """Turns 2 and 3 carry no image, yet the third answer is the model's answer to the whole conversation with the
    first turn's image in it (same tokens as `Predictor` on that conversation), and its mask is on that image."""
    url, service = local_http
    client = _openai(url)
    first = _chat_body(image)["messages"][0]
    first = {**first, "content": [{"type": "text", "text": "What is shown here?"}, first["content"][1]]}
    messages = [first]
    answers = []
    for question in ("Which modality is it?", "Please segment the abnormal region."):
        reply = client.chat.completions.create(model="medplib-tiny", messages=messages, max_tokens=6)
        answers.append(reply.choices[0].message.content)
        messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
    third = client.chat.completions.create(
        model="medplib-tiny", messages=messages, max_tokens=6, extra_body={"medplib": {"segment": True}}
    )
    history = [("What is shown here?", answers[0]), ("Which modality is it?", answers[1])]
    encoded = service.predictor.encode(image, "Please segment the abnormal region.", [], history)
    (expected,) = service.predictor.run([encoded], max_new_tokens=6, segment=True)
    assert third.choices[0].message.content == expected.text
    assert third.usage.prompt_tokens == len(encoded.input_ids)
    assert (
        third.usage.prompt_tokens > service.predictor.cfg.vision.grid**2
    )  # the image block is in the prompt
    (mask,) = third.model_extra["medplib"]["masks"]
    assert mask["size"] == [H, W] and np.array_equal(decode_rle(mask["rle"]), expected.masks[0])
    # Placeholder tokens a model generated into an earlier answer are not taken as region prompts.
    echoed = [*messages[:1], {"role": "assistant", "content": "<region><region_feat> here"}, messages[-1]]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": echoed, "max_tokens": 2}, headers=_auth())
    assert r.status_code == 200, r.text
    # The image belongs in the first user message; one elsewhere is refused, naming where it is.
    late = [
        {"role": "user", "content": "What is shown here?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, first["content"][1]]},
    ]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": late}, headers=_auth(), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[2].content[1]", r.text
    assert "in the first user message (messages[0])" in r.json()["error"]["message"]


def test_top_p_seed_and_stop_are_honoured(local_http, image):
    url, _ = local_http
    client = _openai(url)
    body = _chat_body(image)

    def ask(**options):
        return client.chat.completions.create(model="medplib-tiny", messages=body["messages"], **options)

    sampled = [
        ask(max_tokens=12, temperature=1.0, top_p=0.9, seed=s).choices[0].message.content for s in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    greedy = ask(max_tokens=12).choices[0].message.content
    # top_p keeps only the most likely tokens: a vanishing nucleus is greedy decoding.
    assert ask(max_tokens=12, temperature=1.0, top_p=1e-6, seed=1).choices[0].message.content == greedy
    stop = greedy[3:5]
    stopped = ask(max_tokens=12, stop=[stop])
    assert (
        stopped.choices[0].finish_reason == "stop"
        and stopped.choices[0].message.content == greedy[: greedy.index(stop)].strip()
    )
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={**body, "stop": ["a", "b", "c", "d", "e"]},
        headers=_auth(),
        timeout=60,
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "stop"


# --- no request of death: bounded time and memory for every input ------------------------------------------------
# Every bad request is answered within BAD_REQUEST_S, /healthz within HEALTHZ_S while one is being refused, and
# the serving process's peak RSS grows by less than PEAK_RSS_MB. The times guard against hangs (the old RLE decoder
# held a replica 82 s), not speed: on an oversubscribed machine they stretch by its load per core, and the work
# itself is bounded by the serving process's CPU time, which the load does not stretch.
BAD_REQUEST_S = 2.0
HEALTHZ_S = 1.0
PEAK_RSS_MB = 200


def _proc_kb(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0])


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU time of all threads of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _oversubscription() -> float:
    """Runnable tasks per core we may use (1 when the machine is not oversubscribed)."""
    return max(1.0, os.getloadavg()[0] / len(os.sched_getaffinity(0)))


def _descendants_named(root: int, title: bytes) -> list[int]:
    """Processes below `root` whose command line (Ray's process title) starts with `title`: this test's own
    replicas, never another Ray's on the same machine."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = (
                int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else -1
            )
        except OSError:  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(proc.name)) if ppid >= 0 else None
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                found.append(pid)
        except OSError:
            continue
    return found


def _chat_json(image: np.ndarray, text: str = "Segment <region>.", **medplib) -> bytes:
    body = _chat_body(image, **medplib)
    body["messages"][0]["content"][0]["text"] = text
    return json.dumps(body).encode()


def _attacks(image: np.ndarray, png_bomb) -> list[tuple[str, str, bytes, int, str, str]]:
    """(name, route, body, status, param, a piece of the message): inputs that once cost minutes, gigabytes or a
    500, each under the default 20 MiB body limit."""
    mask_of = {"boxes": []}
    big = 19_000_000
    content = _chat_body(image)["messages"][0]["content"]
    rle_list = [0] * 900_000 + [H * W]  # valid and empty, just under limits.max_json_values
    return [
        (
            "quadratic RLE",  # one number 19 M characters long: the old decoder took 0.7 s for 100 k, ~7 h for this
            "/v1/chat/completions",
            _chat_json(image, **mask_of, masks=[{"rle": {"size": [H, W], "counts": "o" * big + "0"}}]),
            422,
            "medplib.masks[0].rle",
            "longer than 12 characters at position 0",
        ),
        (
            "RLE of 19 M runs",  # every number valid: the runs cap stops it after a million
            "/v1/chat/completions",
            _chat_json(image, **mask_of, masks=[{"rle": {"size": [H, W], "counts": "0" * big}}]),
            413,
            "medplib.masks[0].rle",
            "limits.max_mask_runs",
        ),
        (
            "RLE list of 900 k runs",
            "/v1/chat/completions",
            _chat_json(image, **mask_of, masks=[{"rle": {"size": [H, W], "counts": rle_list}}]),
            400,
            "medplib.masks[0]",
            "empty",
        ),
        (
            "RLE size 20000 x 20000",  # 60 bytes that once allocated 763 MB
            "/v1/chat/completions",
            _chat_json(image, **mask_of, masks=[{"rle": {"size": [20000, 20000], "counts": "0"}}]),
            422,
            "medplib.masks[0].rle",
            f"does not match the image, which is [{H}, {W}]",
        ),
        (
            "RLE size 10^30",
            "/v1/chat/completions",
            _chat_json(image, **mask_of, masks=[{"rle": {"size": [10**30, 10**30], "counts": [1]}}]),
            422,
            "medplib.masks[0].rle",
            "does not match the image",
        ),
        (
            "PNG bomb mask",
            "/v1/chat/completions",
            _chat_json(
                image, **mask_of, masks=[{"png_base64": base64.b64encode(png_bomb(20000, 20000)).decode()}]
            ),
            413,
            "medplib.masks[0].png_base64",
            "limits.max_image_pixels",
        ),
        (
            "lone surrogate (chat)",
            "/v1/chat/completions",
            _chat_json(image, text="Segment \ud800 <region>."),
            422,
            "messages[0].content[0].text.text",
            "lone surrogate (U+D800) at character 8",
        ),
        (
            "lone surrogate (predict)",
            "/v1/predict",
            json.dumps({"image": _png_b64(image), "question": "what\udfff?"}).encode(),
            422,
            "question",
            "lone surrogate (U+DFFF)",
        ),
        (
            "seed 2^64",  # torch cannot take it: once a 400 that named no field
            "/v1/chat/completions",
            json.dumps({**_chat_body(image), "seed": 2**64}).encode(),
            422,
            "seed",
            "less than",
        ),
        (
            "1 MB question",
            "/v1/chat/completions",
            _chat_json(image, text="Segment <region>. " + "x" * 1_000_000),
            400,
            "messages[0].content",
            "context holds 512 tokens",
        ),
        (
            "question just past the context",  # tokenised, then refused: no silent cut
            "/v1/chat/completions",
            _chat_json(image, text="Segment <region>. " + "x" * 600),
            400,
            "messages[0].content",
            "holds 512 (max_length); shorten the conversation by at least",
        ),
        (
            "19 MB of empty arrays",  # 500+ MB once parsed
            "/v1/chat/completions",
            b'{"messages": [], "x": [' + b"[]," * (big // 3) + b"[]]}",
            413,
            "body",
            "limits.max_json_values",
        ),
        (
            "100 k deep JSON",
            "/v1/chat/completions",
            b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "body",
            "not usable JSON",
        ),
        (
            "data URL without a comma",
            "/v1/chat/completions",
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                content[0],
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "data:image/png" + ";a" * (big // 2)},
                                },
                            ],
                        }
                    ]
                }
            ).encode(),
            400,
            "messages[0].content[1].image_url.url",
            "not a data URL",
        ),
        (
            "base64 split into 4 M pieces",  # ''.join(text.split()) once made a list of them
            "/v1/predict",
            json.dumps({"image": "QUJD " * (big // 5), "question": "what?"}).encode(),
            400,
            "image",
            "not a readable image",
        ),
    ]


def _send_while_polling_health(
    url: str, route: str, body: bytes, pid: int
) -> tuple[httpx.Response, float, list]:
    """POST `body` while another client polls /healthz; -> (response, seconds, healthz (status, seconds) list).
    The serving process's peak RSS is reset first, so `_proc_kb(pid, "VmHWM")` afterwards is this request's."""
    health: list[tuple[int, float]] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                t0 = time.perf_counter()
                status = client.get(f"{url}/healthz").status_code
                health.append((status, time.perf_counter() - t0))
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    headers = {**_auth(), "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as client:
        client.get(f"{url}/healthz")  # connect before timing
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: peak RSS := current RSS
        poller.start()
        t0 = time.perf_counter()
        r = client.post(f"{url}{route}", content=body, headers=headers)
        elapsed = time.perf_counter() - t0
    done.set()
    poller.join(timeout=30)
    return r, elapsed, health


def _check_attacks(url: str, image: np.ndarray, png_bomb, pid: int) -> list[str]:
    """Every attack: its status, the field it names, the message, the time, /healthz meanwhile and the peak RSS of
    the serving process `pid`; returns what failed, and what was measured (logged)."""
    failures, measured = [], []
    for name, route, body, status, param, fragment in _attacks(image, png_bomb):
        gc.collect()
        rss_kb, cpu_s = _proc_kb(pid, "VmRSS"), _proc_cpu_s(pid)
        r, elapsed, health = _send_while_polling_health(url, route, body, pid)
        grew_mb = (_proc_kb(pid, "VmHWM") - rss_kb) / 1024
        cpu_s = _proc_cpu_s(pid) - cpu_s
        stretch = _oversubscription()
        error = (
            r.json().get("error", {})
            if r.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        slowest_health = max((s for _, s in health), default=0.0)
        measured.append(
            f"{name}: {r.status_code} in {elapsed:.2f} s ({cpu_s:.2f} s CPU), peak RSS +{grew_mb:.0f} MB, "
            f"healthz max {slowest_health:.2f} s over {len(health)}, load per core {stretch:.1f}"
        )
        if r.status_code != status or error.get("param") != param or fragment not in error.get("message", ""):
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
        if elapsed > BAD_REQUEST_S * stretch or cpu_s > BAD_REQUEST_S:
            failures.append(
                f"{name}: answered after {elapsed:.1f} s, {cpu_s:.1f} s CPU (load per core {stretch:.1f})"
            )
        if grew_mb >= PEAK_RSS_MB:
            failures.append(f"{name}: peak RSS grew by {grew_mb:.0f} MB")
        late = [(code, s) for code, s in health if code != 200 or s > HEALTHZ_S * stretch]
        if (elapsed > 0.5 * stretch and not health) or late:
            failures.append(f"{name}: /healthz {late or 'never answered'} (load per core {stretch:.1f})")
    logging.getLogger(__name__).warning("attacks:\n%s", "\n".join(measured))
    return failures


def test_bad_requests_are_refused_in_bounded_time_and_memory(local_http, image, png_bomb):
    """The attacks against the API over HTTP in this process, which is then the replica whose memory counts."""
    url, _ = local_http
    failures = _check_attacks(url, image, png_bomb, os.getpid())
    assert not failures, "\n".join(failures)
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat_body(image), headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text  # and the server still serves


def test_medplib_client_command_against_the_api(local_http, image, tmp_path, monkeypatch, caplog):
    """`medplib-client predict`, the command of the client distribution: the answer JSON with a mask PNG at the
    image's size; a region outside the image ends with one line naming the field and exit code 2."""
    from medplib_client.cli import main

    url, _ = local_http
    path = tmp_path / "scan.png"
    Image.fromarray(image).save(path)
    out = tmp_path / "out" / "result.json"
    monkeypatch.setenv("MEDPLIB_API_KEY", API_KEY)  # where the command reads the key
    ask = ["predict", "--endpoint", url, "--image", str(path), "--question", "Segment <region>."]
    assert main([*ask, "--box", "4,6,40,30", "--segment", "--max-new-tokens", "3", "--out", str(out)]) == 0
    mask = json.loads(out.read_text())["masks"][0]
    assert (mask["height"], mask["width"]) == (H, W)
    assert png_decode(Path(mask["png"]).read_bytes()).shape == (H, W)
    assert main([*ask, "--point", f"{W + 5},1", "--out", str(out)]) == 2
    assert "HTTP 400" in caplog.text and "regions[0]" in caplog.text, caplog.text


# --- the Serve application on a local Ray cluster -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(ray_local):
    """Serve on the session's Ray, on a free loopback port, for the whole module; replicas at fractional CPUs
    get the API key through their runtime env."""
    from ray import serve

    port = free_port()
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
    # The bearer scheme is declared, so /docs can send the key.
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the server's API key (MEDPLIB_API_KEY)",
    }
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


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
def test_serve_replica_refuses_bad_requests_in_bounded_time_and_memory(server, image, png_bomb):
    """The attacks again, through Ray Serve's proxy, measuring the replica process itself."""
    replicas = _descendants_named(os.getpid(), b"ray::ServeReplica:medplib:")
    assert len(replicas) == 1, replicas
    failures = _check_attacks(server, image, png_bomb, replicas[0])
    assert not failures, "\n".join(failures)
    _good_request(server, image)


@pytest.mark.slow
def test_client_and_cli_predict_against_endpoint(server, image, tmp_path, monkeypatch):
    from medplib_client import MedPLIBAPIError, MedPLIBClient, Prediction
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

    from medplib_client import MedPLIBClient
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
