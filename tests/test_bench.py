"""Every bench script ends with one JSON line of {name, value, goal} figures (run here at toy sizes)."""

from __future__ import annotations

import json
import re
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


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    """MeCoVQA-mini: the folder $MEDPLIB_MINI names (`bench/gpu_stage.sh` sets it on a GPU machine, where the
    dataset's sources are not installed), else one built here from 60 rows."""
    import os

    if os.environ.get("MEDPLIB_MINI"):
        return Path(os.environ["MEDPLIB_MINI"])
    from medplib_datasets.mini.build import build_mini

    root = tmp_path_factory.mktemp("mini")
    build_mini(root, seed=0, max_samples=60, progress=False)
    return root


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gpu_stage_trains_a_stage_and_its_checkpoint_loads_back(device, mini_root):
    """bench.gpu_stage runs a stage's engine and micro-batch step (`setup_training`, `train_micro_batch`) in one
    process: DeepSpeed ZeRO-2 over gloo on CPU, NCCL and bf16 weights on a GPU; here on the tiny moe stage (all
    three tasks, MoE layers)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    argv = [
        "bench.gpu_stage",
        "--stage",
        "configs/stages/tiny/moe.yaml",
        "--device",
        device,
        "--data",
        str(mini_root),
    ]
    argv += ["--steps", "2", "--batch", "3", "--gen-rows", "3", "--max-new-tokens", "4"]
    out = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = {f["name"].split("[")[0]: f["value"] for f in json.loads(out.stdout.strip().splitlines()[-1])}
    assert figures["gpu_stage_step_s"] > 0 and figures["gpu_stage_rows_per_s"] > 0
    assert figures["gpu_stage_loss_rel_diff_bf16_vs_fp32"] < 1e-2
    # Loading the checkpoint undid the step taken after it was saved (a step that did change the loss).
    saved, later, loaded = map(
        float, re.search(r"saved (\S+), one step later (\S+), loaded (\S+)", out.stdout).groups()
    )
    assert (
        later != saved
        and figures["gpu_stage_checkpoint_loss_rel_diff"] < 1e-3
        and loaded == pytest.approx(saved)
    )
    assert 0 <= figures["gpu_stage_gen_identical_answers"] <= 1
    assert ("gpu_stage_train_peak_memory_gb" in figures) == (device == "cuda")
