"""The held-out images' frozen-encoder outputs, computed while the training stages leave a CPU core idle.

On a CPU-only machine the pipeline's evaluation encodes every image of its sample (`small`: 133 images of 267
rows, ~0.66 s each on one core, 2026-12-02), and a stage's start-up and end (worker imports, model load, the
export, MLflow) run on one core of two for ~25 s a stage. `start_prefetch` spawns a process that encodes those
images into the shared embedding cache (`EmbeddingCache`, the folder the eval actors read) one at a time, only
while at least `IDLE_CORES` of the machine's cores sat idle, and at the lowest scheduling priority
(`SCHED_IDLE`), so the training steps, which keep every core busy, do not wait for it. It builds the predictor
the eval actors build (`cpu_predictor`, one thread), so the outputs are the ones an actor computes; the pipeline
stops it before its evaluation starts, whatever it has left is encoded there as before.

    prefetch = start_prefetch(eval_cfg)  # an EvalConfig: the model whose encoder, the rows, the cache
    ...                                  # training stages
    stop_prefetch(prefetch)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any

from medplib.cpu import cpu_ticks
from workflows.eval.config import EvalConfig

logger = logging.getLogger(__name__)

IDLE_CORES = 0.8  # idle cores (averaged over `PROBE_S`) before an image is encoded: one core free of two
PROBE_S = 0.25  # how long the machine is watched before each image
WAIT_S = 0.5  # pause between probes while every core is busy


def idle_cores(seconds: float = PROBE_S) -> float:
    """Cores idle (or waiting for I/O) over the next `seconds` (`medplib.cpu.cpu_ticks`; start_prefetch checked
    that there is a /proc/stat)."""
    total0, idle0 = cpu_ticks()
    time.sleep(seconds)
    total1, idle1 = cpu_ticks()
    total = total1 - total0
    return (os.cpu_count() or 1) * (idle1 - idle0) / total if total else 0.0


def _prefetch(cfg: EvalConfig, stop: Any, ready: Any, min_idle_cores: float) -> None:
    """The child process: the images of `cfg`'s rows into `cfg.embedding_cache`, each when the machine idles."""
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # before the imports: they idle too
    import torch

    from medplib.allocator import tune_allocator
    from medplib.data.rows import row_to_encoded
    from workflows.eval.evaluate import cpu_predictor, evaluation_rows

    logging.basicConfig(level=logging.INFO)
    tune_allocator()  # as `init_ray` sets up the eval actors
    torch.set_num_threads(1)  # as an eval actor decodes and encodes
    began = time.perf_counter()
    predictor = cpu_predictor(cfg)
    size = predictor.cfg.vision.image_size_px
    first: dict[str, dict] = {}  # image path -> one row about it, in the order the evaluation reaches them
    for row in evaluation_rows(cfg):
        if row.get("image_path"):
            first.setdefault(str(row["image_path"]), row)
    cache = predictor.embedding_cache
    ready.set()  # from here on it stops at the next image when told
    encoded = 0
    for row in first.values():
        while not stop.is_set() and idle_cores() < min_idle_cores:
            stop.wait(WAIT_S)
        if stop.is_set():
            break
        misses = cache.misses
        cache.fill([row_to_encoded(row, size)])
        encoded += cache.misses - misses
    logger.info(
        "prefetch: %d of %d held-out images encoded in %.0f s (%d found cached)%s",
        encoded,
        len(first),
        time.perf_counter() - began,
        cache.hits,
        ", stopped" if stop.is_set() else "",
    )


@dataclass
class Prefetch:
    """A running prefetch: its process and the two events it shares with the pipeline."""

    process: Any
    stop: Any  # set by `stop_prefetch`: the process ends after the image it is encoding
    ready: Any  # set by the process once its model is loaded and its images are listed


def start_prefetch(cfg: EvalConfig, min_idle_cores: float = IDLE_CORES) -> Prefetch | None:
    """Start encoding `cfg`'s images in a background process, each once `min_idle_cores` cores idle (see the
    module docstring); None without a cache folder or off Linux (no /proc/stat). The process ends by itself
    when every image is in the cache; pass what this returns to `stop_prefetch`."""
    if cfg.embedding_cache is None or cpu_ticks() is None:
        return None
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the driver's Ray or MLflow
    stop, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=_prefetch, args=(cfg, stop, ready, min_idle_cores), name="medplib-eval-prefetch", daemon=True
    )
    proc.start()
    return Prefetch(proc, stop, ready)


def stop_prefetch(prefetch: Prefetch | None, timeout_s: float = 5.0) -> None:
    """Stop the prefetch after the image it is encoding; one still loading its model (nothing written yet) or
    not stopping within `timeout_s` is killed."""
    if prefetch is None:
        return
    prefetch.stop.set()
    if prefetch.ready.is_set():
        prefetch.process.join(timeout_s)
    if prefetch.process.is_alive():
        prefetch.process.terminate()
        prefetch.process.join()
