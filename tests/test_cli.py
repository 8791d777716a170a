"""`medplib predict` and `medplib model summary` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def _medplib(*args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "workflows.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_predict_writes_answer_and_mask_png(tmp_path):
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90), dtype=np.uint8)).save(image)
    out = tmp_path / "out" / "result.json"
    r = _medplib("predict", "--model", "tiny", "--image", str(image), "--question", "What is in <region>?",
                 "--box", "10,10,40,30", "--segment", "--max-new-tokens", "4", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert isinstance(result["answer"], str) and result["timings"]["total_s"] > 0
    (mask,) = result["masks"]
    assert (mask["height"], mask["width"]) == (50, 90)
    assert Image.open(mask["png"]).size == (90, 50)
    assert "wrote" in r.stdout


def test_predict_reports_bad_input_in_one_line(tmp_path):
    image = tmp_path / "scan.png"
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(image)
    r = _medplib("predict", "--model", "tiny", "--image", str(image), "--question", "?", "--box", "0,0,50,50")
    assert r.returncode == 2 and "outside the 20x20 image" in r.stderr and "Traceback" not in r.stderr
    r = _medplib("predict", "--model", "nonexistent", "--image", str(image), "--question", "?")
    assert r.returncode == 2 and "unknown model preset 'nonexistent'" in r.stderr


def test_model_summary_counts_components():
    r = _medplib("model", "summary", "--preset", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = dict(line.rsplit(None, 1) for line in r.stdout.strip().splitlines())
    total = int(rows["total"].replace(",", ""))
    parts = ["llm (all)", "vision_tower", "mm_projector", "region_fea_adapter", "text_hidden_fcs",
             "sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder"]  # fmt: skip
    assert sum(int(rows[p].replace(",", "")) for p in parts) == total
