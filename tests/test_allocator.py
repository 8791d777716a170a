"""medplib.allocator: a large tensor allocated again reuses the heap instead of page-faulting in fresh memory, in
the process that tunes itself and in a process started with its settings, with the loop in a thread as Ray Train
runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medplib.allocator import ALLOCATOR_ENV

ROOT = Path(__file__).parents[1]
PAGES = 96 * 2**20 // 4096
# 96 MiB: over glibc's largest mmap threshold (32 MiB) and its thread-arena heaps (64 MiB), so untuned it is
# mapped and unmapped each time; ones() touches every page. Tuned, the heap grows a few holes before a freed one
# fits the next block (see medplib.allocator), so the last rounds are the ones compared. argv: tune|none,
# main|thread.
PROBE = """
import json, os, resource, subprocess, sys, threading
import torch
from medplib.allocator import ALLOCATOR_ENV, tune_allocator

tuned = tune_allocator() if sys.argv[1] == "tune" else None
faults = []

def work():
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(96 * 2**20 // 4)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

if sys.argv[2] == "thread":
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
else:
    work()
child = subprocess.run(
    [sys.executable, "-c", "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % list(ALLOCATOR_ENV)],
    capture_output=True, text=True, check=True,
).stdout
print(json.dumps({"tuned": tuned, "faults": faults, "child_env": json.loads(child)}))
"""


def probe(tune: str, where: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, tune, where],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**clean, **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


# The CPU-only machine `make test` runs on; with a CUDA GPU tune_allocator leaves the allocator alone.
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or torch.cuda.is_available(),
    reason="glibc's mallopt, on a CPU machine",
)


@linux_only
def test_large_blocks_are_reused_where_the_settings_reach() -> None:
    # Untuned, every allocation after the first faults its 24,576 pages in again.
    plain = probe("none", "thread")
    assert min(plain["faults"][-4:]) > 0.9 * PAGES, plain
    assert plain["child_env"] == dict.fromkeys(ALLOCATOR_ENV)
    # A process that tunes itself (the CLI, the pipeline's driver), and the processes it starts.
    tuned = probe("tune", "main")
    assert tuned["tuned"] is True
    assert max(tuned["faults"][-4:]) < 0.05 * PAGES, tuned
    assert tuned["child_env"] == ALLOCATOR_ENV
    # A process started with the settings (a Ray worker), its loop in a thread as Ray Train runs it.
    worker = probe("none", "thread", **ALLOCATOR_ENV)
    assert max(worker["faults"][-4:]) < 0.05 * PAGES, worker


@linux_only
def test_a_setting_the_user_made_is_kept() -> None:
    mine = probe("tune", "main", MALLOC_MMAP_MAX_="65536")
    # mmap allowed again: the block is mapped and unmapped each time, and the faults come back.
    assert min(mine["faults"][-4:]) > 0.9 * PAGES, mine
    assert mine["child_env"] == {**ALLOCATOR_ENV, "MALLOC_MMAP_MAX_": "65536"}


IN_PROCESS = {
    # `medplib predict --model`: the model runs in the CLI's own process.
    "predict": "from workflows.predict import local_predictor\nlocal_predictor('tiny')\n",
    # `medplib eval --engine local`: the evaluation decodes in this process.
    "eval": (
        "import tempfile\n"
        "from medplib_datasets.toy import write_toy_prepared\n"
        "from workflows.eval.evaluate import evaluate\n"
        "work = tempfile.mkdtemp()\n"
        "data = write_toy_prepared(work + '/prepared', 'tiny', {'val': 2})\n"
        "evaluate(model='tiny', data=data, splits=['val'], out=work + '/eval', engine='local', max_new_tokens=2)\n"
    ),
}


@linux_only
@pytest.mark.parametrize("path", sorted(IN_PROCESS))
def test_the_clis_in_process_model_paths_run_with_the_settings(path: str) -> None:
    code = (
        IN_PROCESS[path]
        + f"import json, os\nprint(json.dumps({{k: os.environ.get(k) for k in {list(ALLOCATOR_ENV)}}}))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT, env=clean
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == ALLOCATOR_ENV
