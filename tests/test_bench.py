"""Every bench script ends with one JSON line of {name, value, goal} figures (run here at toy sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench.moe_cost", "--hidden", "64", "--layers", "1", "--tokens", "32", "--repeats", "1"],
        ["bench.train_step", "--batch", "1", "--repeats", "1"],  # the small preset: real weights
        ["bench.stream_latency", "--tokens", "16", "--repeats", "1"],
        [
            "bench.volume_throughput",
            "--slices",
            "2",
            "--batch",
            "2",
            "--max-new-tokens",
            "1",
            "--repeats",
            "1",
        ],
    ],
)
def test_bench_prints_figures_last_as_one_json_line(argv):
    out = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures and all(set(f) == {"name", "value", "goal"} for f in figures)
    assert all(isinstance(f["value"], (int, float)) and f["value"] > 0 for f in figures)
