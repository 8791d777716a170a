"""What this machine's CPU can do that changes how the model runs on it, and how busy it is."""

from __future__ import annotations

import functools


@functools.cache  # a property of the machine, asked on hot paths (`packed_linear`)
def has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels here (AVX-512 BW/VL/DQ or AVX-NE-CONVERT), so bf16 matrix products run
    ~4x faster than fp32 (stack.md: 838 vs 198 GFLOP/s on 2 threads). Without them (AVX2 only, e.g. an AMD EPYC
    of 2026-12-01) oneDNN's bf16 convolutions refuse to run and PyTorch's bf16 fallback is far slower than fp32
    (one `small` training step: over 10 minutes), so everything runs in fp32 there."""
    import torch  # here: `cpu_ticks`'s readers (a SCHED_IDLE process before its imports, benches) need no torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_ticks() -> tuple[int, int] | None:
    """The machine's CPU time since boot from /proc/stat, in clock ticks summed over cores: (all, idle + iowait);
    None without procfs. Guest time is part of user time there, so it is not counted twice."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    return sum(ticks), ticks[3] + ticks[4]
