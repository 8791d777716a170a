"""examples/ as a user runs them, against the tiny model served over real HTTP (uvicorn, no Ray); the MLflow
example runs in tests/test_pipeline.py, where a pipeline run exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64


@pytest.fixture(scope="module")
def base_url():
    from serve.api import LocalBackend, serve_in_thread
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    torch.manual_seed(0)
    url, stop = serve_in_thread(LocalBackend(MedPLIBService(AppArgs(model="tiny"))))
    yield url
    stop()


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "scan.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def _run(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_openai_client_example(base_url, scan, tmp_path):
    pytest.importorskip("openai")
    script = ROOT / "examples" / "openai_client.py"
    out = _run([sys.executable, str(script), "--base-url", base_url, "--image", str(scan)], tmp_path)
    assert "answer:" in out and "streamed:" in out and "follow-up:" in out
    assert Image.open(tmp_path / "mask.png").size == (W, H)


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("curl", "jq", "base64")), reason="needs curl, jq and base64"
)
def test_curl_example(base_url, scan, tmp_path):
    out = _run(["bash", str(ROOT / "examples" / "curl.sh"), str(scan), base_url], tmp_path)
    assert '"answer"' in out and "data: " in out
    assert Image.open(tmp_path / "mask.png").size == (W, H)


def test_predictor_example(scan, tmp_path):
    out = _run([sys.executable, str(ROOT / "examples" / "predictor.py"), "--image", str(scan)], tmp_path)
    assert "answer:" in out and (tmp_path / "prediction_mask0.png").is_file()
