"""The demo page (GET /demo) in headless Chromium from Debian, driven by Playwright's Python package (never its own
browser download): load the page, upload a PNG, draw a box, ask, and check the red overlay is the API's mask pixel
for pixel; a NIfTI volume's slices through /v1/preview. The API runs over real HTTP (uvicorn, no Ray)."""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from medplib_client.masks import decode_rle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "demo-key-51"
H, W = 48, 64
# Flags for a browser that touches no network and no profile but the fresh one it is given.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def demo_url():
    from serve.api import LocalBackend, serve_in_thread
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    torch.manual_seed(0)
    url, stop = serve_in_thread(LocalBackend(MedPLIBService(AppArgs(model="tiny")), api_key=KEY))
    yield url
    stop()


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 90, (H, W, 3), dtype=np.uint8)
    image[12:36, 16:48] += 120  # a bright "lesion"
    path = tmp_path_factory.mktemp("demo") / "scan.png"
    Image.fromarray(image).save(path)
    return path


def test_preview_reads_nifti_slices(demo_url, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = np.zeros((W, H, 5), np.int16)
    for k in range(5):
        volume[..., k] = 100 * k
    buf = io.BytesIO()
    buf.write(nibabel.Nifti1Image(volume, np.eye(4)).to_bytes())
    body = {"image": base64.b64encode(gzip.compress(buf.getvalue())).decode(), "slice_index": 4}
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{demo_url}/v1/preview", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["num_slices"] == 5 and out["slice_index"] == 4 and (out["width"], out["height"]) == (W, H)
    r = httpx.post(f"{demo_url}/v1/preview", json={**body, "slice_index": 9}, headers=headers, timeout=60)
    assert r.status_code == 400 and "out of range for 5 slices" in r.json()["error"]["message"]
    assert httpx.post(f"{demo_url}/v1/preview", json=body, timeout=60).status_code == 401


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make system-deps installs it from Debian)"
)
def test_demo_page_box_prompt_overlay_matches_the_api(demo_url, scan, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    box = (16, 12, 48, 36)  # x0, y0, x1, y1 in image pixels
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = context.new_page()
            page.goto(f"{demo_url}/demo")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.set_input_files("#file", str(scan))
            page.wait_for_selector("#ask:not([disabled])", timeout=60_000)
            # Drag a box on the drawing layer: CSS pixels -> image pixels, as the page maps them.
            rect = page.eval_on_selector("#drawing", "c => c.getBoundingClientRect().toJSON()")
            scale = rect["width"] / W
            page.mouse.move(rect["x"] + (box[0] + 0.5) * scale, rect["y"] + (box[1] + 0.5) * scale)
            page.mouse.down()
            page.mouse.move(rect["x"] + (box[2] - 0.5) * scale, rect["y"] + (box[3] - 0.5) * scale, steps=5)
            page.mouse.up()
            region = page.evaluate("() => state.region")
            assert region == {"kind": "box", "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]}
            page.fill("#question", "Please segment the region.")
            page.click("#ask")
            page.wait_for_selector("body[data-done='1']", timeout=120_000)
            answer = page.inner_text("#answer")
            width, height, alpha = page.evaluate(
                """() => { const c = document.getElementById('overlay');
                           const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                           const a = []; for (let i = 3; i < d.length; i += 4) a.push(d[i] > 0 ? 1 : 0);
                           return [c.width, c.height, a]; }"""
            )
            assert page.get_attribute("#download", "href").startswith("data:image/png;base64,")
            assert page.is_visible("#timings td")
            shot = Path(os.environ.get("MEDPLIB_DEMO_SCREENSHOT") or tmp_path / "demo.png")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    overlay = np.array(alpha, dtype=bool).reshape(height, width)
    # The same request through the API.
    body = {
        "image": base64.b64encode(scan.read_bytes()).decode(),
        "question": "Please segment the region.",
        "regions": [{"kind": "box", "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]}],
        "segment": True,
        "max_new_tokens": 32,
        "mask_encoding": "rle",
    }
    r = httpx.post(
        f"{demo_url}/v1/predict", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert r.status_code == 200, r.text
    mask = decode_rle(r.json()["masks"][0]["rle"])
    assert (width, height) == (W, H) and overlay.any()
    assert np.array_equal(overlay, mask)
    assert answer == (r.json()["answer"] or "(empty answer)")
