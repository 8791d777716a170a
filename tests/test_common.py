"""workflows.common.init_ray: a local cluster it starts hands its settings (the allocator's on a machine without
a CUDA GPU, Ray Train's for one node everywhere) to every process of the cluster, and a setting the user made is
kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from medplib.allocator import ALLOCATOR_ENV
from workflows.common import LOCAL_CLUSTER_ENV

ROOT = Path(__file__).parents[1]


def test_a_local_ray_cluster_started_by_init_ray_hands_the_settings_to_its_workers() -> None:
    allocator = {key: None for key in ALLOCATOR_ENV} if torch.cuda.is_available() else ALLOCATOR_ENV
    settings = allocator | LOCAL_CLUSTER_ENV
    code = (
        "import json, os, ray\n"
        "from workflows.common import init_ray\n"
        "init_ray()\n"
        f"env = ray.get(ray.remote(lambda keys: {{k: os.environ.get(k) for k in keys}}).remote({list(settings)}))\n"
        "ray.shutdown()\n"
        "print(json.dumps(env))\n"
    )
    mine = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
    clean = {k: v for k, v in os.environ.items() if k not in settings and k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT, env=clean | mine
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == settings | mine
