"""glibc malloc settings for tensor work on CPU, for this process (`mallopt`) and the ones it starts (environment).

glibc maps a block above its mmap threshold (128 KiB, rising to 32 MiB at most as such blocks are freed; in a
thread's arena also any block over 64 MiB) fresh and unmaps it when freed, so a tensor of that size allocated
again next step page-faults in and zeroes every 4 KiB page once more. A training step of `small` did that
~149,000 times (~0.6 GB, 0.28 s of kernel time in a 1.4 s step). With mmap off, freed blocks stay in the
process's heap for the next step. Measured 2026-11-30 on the 2-core box, each pair in one sitting:
`bench.eval_throughput --rows 16` (the untrained `small` preset, bf16) 2.95 -> 5.28 rows/s at batch 16, its CPU
134 -> 99 s (kernel time 24 -> 1.4 s: batched decoding grows its KV cache a token at a time), peak memory +4%;
16 replayed vl steps 1.37 -> 1.26 s a step, peak memory 2.5 -> 3.1 GB. One arena: Ray Train runs the training
loop in a thread, whose own arena still maps every block over 64 MiB (the vocabulary-sized matrices); in the vl
stage's Ray Train worker the page faults went 87,000 -> 25,000 a second.

The price is memory: a block is reused only once a free hole fits it, so the heap grows before it settles (a
96 MiB tensor made and freed in a loop: 8 holes, 990 MiB, before the faults stopped). On a machine with a CUDA
GPU nothing is changed: the tensors live on the device, and a model loaded on the host and moved over could
leave its whole size behind in the heap.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# variable -> (value, its mallopt(3) parameter number from malloc.h)
_SETTINGS = {
    "MALLOC_MMAP_MAX_": ("0", -4),
    "MALLOC_TRIM_THRESHOLD_": (str(1 << 30), -1),
    "MALLOC_ARENA_MAX": ("1", -8),
}
# glibc reads these when a process starts; `tune_allocator` applies them to the process already running too.
ALLOCATOR_ENV = {key: value for key, (value, _) in _SETTINGS.items()}


def tune_allocator() -> bool:
    """On a machine without a CUDA GPU: set `ALLOCATOR_ENV` for the processes this one starts (a local Ray
    cluster's raylet and workers inherit it) and apply it here with mallopt, which covers what this process's
    main thread allocates (a thread started already may keep an arena of its own). A variable the user set is
    kept, and applied as they set it. Returns whether the settings were applied (False with a GPU, or where the
    C library has no mallopt)."""
    import torch

    if torch.cuda.is_available():
        return False
    for key, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        log.debug("no mallopt in this C library: allocator settings left to the environment")
        return False
    for key, (_, param) in _SETTINGS.items():
        try:
            value = int(os.environ[key])
        except ValueError:
            log.warning("%s=%r is not an integer; left as glibc has it", key, os.environ[key])
            continue
        if not libc.mallopt(param, value):
            log.warning("mallopt refused %s=%d", key, value)
    return True
