"""Helpers every bench script shares: a timing loop and the closing JSON line(s)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
