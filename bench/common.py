"""Helpers every bench script shares: a timing loop, its files' folder and the closing JSON line(s)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def work_dir(keep: str | None, prefix: str) -> Path:
    """`keep` where the user named a folder (the files stay), else a temp folder removed when the bench exits
    (a stage bench writes ~2.6 GB: models, checkpoints, exports)."""
    if keep:
        return Path(keep)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # Registered before Ray starts, so it runs after Ray's own exit handler has stopped the workers using it.
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def print_figures(figures: list[dict]) -> None:
    """The closing line: one JSON array of {name, value, goal} (goal None where there is none), so runs can
    be compared by reading the last line of any bench script."""
    print(
        json.dumps([{"name": f["name"], "value": f["value"], "goal": f.get("goal")} for f in figures]),
        flush=True,
    )


def stage_config(preset: str, stage: str):
    """A stage as the preset's pipeline runs it: `configs/stages/<preset>/<stage>.yaml`, validated."""
    from medplib.model.config import configs_dir
    from workflows.train.config import load_stage_config

    return load_stage_config(configs_dir() / "stages" / preset / f"{stage}.yaml")


def start_process_group(device_type: str = "cpu") -> None:
    """A one-process torch.distributed group on 127.0.0.1, for a DeepSpeed engine outside Ray Train (a Ray Train
    worker gets its group from Ray), and the launcher's variables DeepSpeed reads. Start it once a process: DeepSpeed
    keeps the group it first sees, so a group destroyed and started again fails its next engine ("not
    registered"). A Ray cluster started later inherits the variables; Ray Train sets its own in its workers."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=0, world_size=1)
