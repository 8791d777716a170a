"""What several jobs need alike: files written atomically, the Ray connection of a run, the GPU decision."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp sibling, then rename it over `path`: a reader sees the old file or the new one,
    never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")  # unique per writer, thread or process
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# Ray Train's settings for a one-node cluster of this machine: no node of it is ever drained, so the preemption
# watcher (an actor a stage, ~2 CPU-s to start, an ERROR line in the log about its constructor arguments) only
# costs; and the controller polls its workers every 2 s, which a stage waits out at each change of state (a
# 1-step `small` stage shorter at 0.5 s in each of 6 interleaved pairs, typically by 2-5 s, 2 cores, 2026-12-03).
# Ray Train hands both from the driver's environment to its controller and workers.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def use_local_cluster_settings() -> None:
    """Set `LOCAL_CLUSTER_ENV` in this process's environment, before it starts a local cluster; a variable the user
    set is kept."""
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, *, ray_train: bool = False, **options: Any) -> None:
    """Connect this process to Ray, once: `address`, else the cluster in $RAY_ADDRESS (a Ray Job's driver gets
    it), else a new local cluster on this machine's CPUs. `options` go to `ray.init`: sizes such as `num_cpus`
    apply to a new local cluster only, so a caller that passes them also passes `address="local"` (Ray refuses
    them when it connects to a running cluster). `ray_train`: the caller runs Ray Train, so a new local cluster
    gets the dashboard (where installed): Ray Train's placement-group cleaner polls its State API and logs a
    failed query every few seconds without it. A job of tasks and actors does without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    from medplib.allocator import tune_allocator

    tune_allocator()  # before a local cluster starts: its raylet and workers inherit the settings
    # "local", not None: a plain ray.init() would join any `ray start` cluster recorded in /tmp/ray.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        use_local_cluster_settings()
    ray.init(
        address=address,
        include_dashboard=None if ray_train else False,  # None: Ray's default, the dashboard where installed
        **options,
    )
    log.debug("Ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster."""
    import ray

    return ray.cluster_resources().get("GPU", 0)


def decide_gpu(setting: str, gpus: float, where: str = "the Ray cluster") -> bool:
    """`setting` auto/yes/no against the GPUs there are: a GPU request (a Train worker with use_gpu, an actor with
    num_gpus) where there is none would wait forever, so `yes` without GPUs is an error."""
    if setting == "yes" and gpus < 1:
        raise ValueError(f"use_gpu: yes, but {where} has no GPU (a GPU request would wait forever)")
    return setting != "no" and gpus >= 1
