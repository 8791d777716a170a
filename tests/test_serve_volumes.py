"""The API with clinical inputs: volume jobs (POST, poll progress, NIfTI mask with the input's affine or RLE per
slice), every bad volume a 4xx naming the field while the next request is served, and bounded memory: a gzip bomb
NIfTI or a many-frame DICOM costs the serving process far less than it would inflate to."""

from __future__ import annotations

import base64
import gzip
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clinical_files import small_brain
from test_volumes import write_bad_volumes

API_KEY = "volume-key"


@pytest.fixture(scope="module")
def local_api():
    from fastapi.testclient import TestClient

    from serve.api import LocalBackend, create_api
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    service = MedPLIBService(AppArgs(model="tiny", batching={"max_batch_size": 8}))
    backend = LocalBackend(service, api_key=API_KEY)
    with TestClient(create_api(backend), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def _poll(client, job_id: str) -> dict:
    seen = []
    for _ in range(600):
        job = client.get(f"/v1/volumes/{job_id}").json()
        seen.append(job["slices_done"])
        if job["status"] in ("done", "failed"):
            assert seen == sorted(seen)  # progress never goes backwards
            return job
        time.sleep(0.1)
    raise AssertionError("volume job did not finish")


def test_volume_job_returns_the_mask_with_the_inputs_affine(local_api, tmp_path: Path) -> None:
    path = small_brain(tmp_path)
    body = {
        "image": base64.b64encode(path.read_bytes()).decode(),
        "question": "Segment the brain.",
        "axis": "coronal",
        "window": "0,200",
        "max_new_tokens": 1,
        "mask_format": "both",
    }
    r = local_api.post("/v1/volumes", json=body)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["status"] == "queued" and started["slices_total"] == nib.load(path).shape[1]
    job = _poll(local_api, started["id"])
    assert job["status"] == "done" and job["slices_done"] == job["slices_total"]
    result = job["result"]
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(result["mask_nifti_base64"])))
    source = nib.load(path)
    assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
    assert [m["slice"] for m in result["masks_rle"]] == result["mask_slices"]
    assert result["slices_read"] == list(range(source.shape[1]))
    assert local_api.get("/v1/volumes/vol-nope").status_code == 404


def test_every_model_call_runs_on_the_services_model_thread(tmp_path: Path, monkeypatch) -> None:
    """The load, request batches (the local API hands them to other threads), a stream and a volume job's slices:
    one thread runs the model, so torch keeps one OpenMP pool (`MedPLIBService.on_model_thread`)."""
    import threading

    from fastapi.testclient import TestClient

    from medplib.inference import Predictor
    from serve.api import LocalBackend, create_api
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    threads: list[int] = []
    load = Predictor.from_pretrained.__func__

    def recorded_load(cls, *args, **kwargs):
        threads.append(threading.get_ident())
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(recorded_load))
    service = MedPLIBService(AppArgs(model="tiny", batching={"max_batch_size": 8}))
    run = service.predictor.run

    def recorded_run(*args, **kwargs):
        threads.append(threading.get_ident())
        return run(*args, **kwargs)

    service.predictor.run = recorded_run
    image = base64.b64encode(small_brain(tmp_path).read_bytes()).decode()
    asked = {"image": image, "question": "What is this?", "max_new_tokens": 2}
    with TestClient(create_api(LocalBackend(service)), headers={"Authorization": "Bearer x"}) as client:
        assert client.post("/v1/predict", json=asked).status_code == 200
        chat = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": f"data:application/gzip;base64,{image}"}},
                    ],
                }
            ],
            "max_tokens": 2,
            "stream": True,
        }
        streamed = client.post("/v1/chat/completions", json=chat)
        assert (
            streamed.status_code == 200 and "data: [DONE]" in streamed.text and "error" not in streamed.text
        )
        r = client.post("/v1/volumes", json={**asked, "max_new_tokens": 1, "axis": "coronal"})
        assert r.status_code == 202, r.text
        assert _poll(client, r.json()["id"])["status"] == "done"
    model_thread = service.model_thread.submit(threading.get_ident).result()
    assert len(threads) > 3 and set(threads) == {model_thread}, threads


def test_view_picks_slice_axis_and_window_in_both_routes(local_api, tmp_path: Path) -> None:
    path = small_brain(tmp_path)
    data = base64.b64encode(path.read_bytes()).decode()
    view = {"axis": "coronal", "slice_index": 3, "window": "brain"}
    r = local_api.post(
        "/v1/predict",
        json={"image": data, "question": "Segment.", "segment": True, "max_new_tokens": 1, "view": view},
    )
    x, _, z = nib.load(path).shape
    assert r.status_code == 200 and r.json()["masks"][0]["size"] == [z, x]  # a coronal slice: S x R
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Segment."},
                    {"type": "image_url", "image_url": {"url": "data:application/gzip;base64," + data}},
                ],
            }
        ],
        "max_tokens": 1,
        "medplib": {"segment": True, "view": {**view, "slice_index": 99}},
    }
    r = local_api.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "slice_index 99 out of range" in r.json()["error"]["message"]
    chat["medplib"]["view"] = {"window": "spleen"}
    r = local_api.post("/v1/chat/completions", json=chat)
    assert r.status_code == 422 and "preset" in r.json()["error"]["message"]


def test_slice_index_and_view_meet_in_predict_and_preview(local_api, tmp_path: Path) -> None:
    """`slice_index` (the demo page's slider) and `view` (axis, window) name one picture; preview counts the slices
    along the view's axis, after reorientation."""
    path = small_brain(tmp_path)
    data = base64.b64encode(path.read_bytes()).decode()
    x, y, z = nib.load(path).shape
    for view, count in (({}, z), ({"axis": "coronal"}, y), ({"axis": "sagittal", "window": "brain"}, x)):
        r = local_api.post("/v1/preview", json={"image": data, "slice_index": 2, "view": view or None})
        assert r.status_code == 200, r.text
        assert (r.json()["num_slices"], r.json()["slice_index"]) == (count, 2), view
    body = {"image": data, "question": "Hi", "max_new_tokens": 1, "slice_index": 2, "view": {"axis": 1}}
    assert local_api.post("/v1/predict", json=body).status_code == 200
    r = local_api.post("/v1/predict", json={**body, "view": {"axis": 1, "slice_index": 3}})
    assert r.status_code == 422 and "give the slice once" in r.json()["error"]["message"]


def test_bad_volumes_get_4xx_naming_the_field(local_api, tmp_path: Path) -> None:
    bad = write_bad_volumes(tmp_path)
    zipped = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(zipped, "w") as archive:
        for file in sorted((tmp_path / "mixed").iterdir()):
            archive.write(file, file.name)
    uploads = {
        "dim[2] is 0": (tmp_path / bad["dim[2] is 0"]).read_bytes(),
        "truncated or corrupt gzip": (tmp_path / bad["truncated or corrupt gzip"]).read_bytes(),
        "mixes slice sizes": zipped.getvalue(),
        "points outside the archive": (tmp_path / bad["points outside the archive"]).read_bytes(),
    }
    good = {"image": base64.b64encode(small_brain(tmp_path).read_bytes()).decode(), "max_new_tokens": 1}
    for message, data in uploads.items():
        body = {"image": base64.b64encode(data).decode(), "question": "Segment the brain."}
        r = local_api.post("/v1/volumes", json=body)
        error = r.json()["error"]
        assert r.status_code == 400 and message in error["message"] and error["param"] == "image", r.text
        if message in ("dim[2] is 0", "truncated or corrupt gzip"):  # the same file as a 2-D request
            r = local_api.post("/v1/predict", json={**body, "max_new_tokens": 1})
            assert r.status_code == 400 and message in r.json()["error"]["message"]
        # nothing else is lost: the next request is served
        assert local_api.post("/v1/predict", json={**good, "question": "What is this?"}).status_code == 200
    r = local_api.post("/v1/volumes", json={**good, "question": "Hi", "answer_slices": "7:x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "answer_slices"


BOMB_SERVER = r"""
import base64, gzip, io, json, resource, sys, time
import nibabel as nib, numpy as np
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import RLELossless
sys.path.insert(0, sys.argv[1])
from clinical_files import dicom_dataset
from serve.api import LocalBackend, create_api
from serve.config import AppArgs
from serve.service import MedPLIBService

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def gzipped_nifti(shape):  # a header declaring `shape` (uint8), then 512 MiB of zeros: ~0.5 MB gzipped
    header = nib.Nifti1Header(); header.set_data_shape(shape); header.set_data_dtype(np.uint8)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as f:
        f.write(header.binaryblock + bytes(4))
        for _ in range(512):
            f.write(bytes(1024 * 1024))
    return out.getvalue()

def many_frames(count):  # RLE frames of 512x512: 0.5 MiB each decoded, 8 KB each on the wire
    ds = dicom_dataset(np.zeros((512, 512)), NumberOfFrames=count)
    frame = np.full((512, 512), 1000, dtype=np.int16)
    opts = dict(rows=512, columns=512, samples_per_pixel=1, bits_allocated=16, bits_stored=16,
                pixel_representation=1, photometric_interpretation="MONOCHROME2", number_of_frames=1)
    ds.PixelData = encapsulate([RLELosslessEncoder.encode(frame, **opts)] * count, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    buf = io.BytesIO(); ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()

bodies = {name: base64.b64encode(make()).decode() for name, make in
          # the bomb declares all 512 MiB; the liar declares 64x64x8 and is inflated no further than that
          (("nifti_bomb", lambda: gzipped_nifti((1024, 1024, 512))), ("liar", lambda: gzipped_nifti((64, 64, 8))), ("frames_1000", lambda: many_frames(1000)),
           ("frames_200", lambda: many_frames(200)))}
service = MedPLIBService(AppArgs(model="tiny"))
client = TestClient(create_api(LocalBackend(service)))
good = base64.b64encode(service_png := __import__("medplib_client.masks", fromlist=["png_encode"]).png_encode(
    np.random.default_rng(0).random((64, 64)) > 0.5)).decode()
assert client.post("/v1/predict", json={"image": good, "question": "Hi", "max_new_tokens": 1}).status_code == 200
out = {}
for name, body in bodies.items():
    before = rss_mb()
    for route in ("/v1/predict", "/v1/volumes"):
        r = client.post(route, json={"image": body, "question": "Segment.", "max_new_tokens": 1})
        out[f"{name} {route}"] = [r.status_code, (r.json().get("error") or {}).get("message", r.json().get("id", "")),
                                  rss_mb() - before]
        if r.status_code == 202:  # let the job finish before the process exits
            while client.get(f"/v1/volumes/{r.json()['id']}").json()["status"] in ("queued", "running"):
                time.sleep(0.1)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_compressed_bombs_cost_the_server_little_memory(tmp_path: Path) -> None:
    """Each request runs in a fresh serving process's lifetime, measured by its peak RSS (issue 16)."""
    script = tmp_path / "bomb_server.py"
    script.write_text(BOMB_SERVER)
    tests = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, str(script), str(tests)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tests.parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (status, message, grown_mb) in out.items():
        assert grown_mb < 200, (name, grown_mb)
        if "volumes" in name and name.startswith("frames"):
            assert status == 400 and "send the series as a zip" in message, (name, message)
        elif name.startswith(("nifti_bomb", "frames_1000")):  # 512 MiB declared: refused from the header
            assert status == 413 and "limits.max_volume_bytes" in message, (name, message)
        elif name.startswith("frames_200"):  # 100 MiB declared, one frame decoded
            assert status == 200, (name, status, message)
        else:  # the liar is read as the 64x64x8 it declares
            assert status in (200, 202), (name, status, message)
