"""Preprocessing throughput: the Ray Data pipeline against a single-process loop doing the same work, and the
Ray driver's peak memory as the input grows.

Both engines run `workflows.data.preprocess.prepare` on the same synthetic rows (`medplib_datasets.synth`, shapes on
noise, all three tasks): the same driver scan, validation, image decode, `encode_sample` and Parquet write. The
single-process engine (`engine="local"`) runs the chunk function in this process one chunk after another; the
Ray engine runs it as Ray Data tasks on a local cluster of `--cpus` CPUs. Runs are interleaved (ray, local, ray,
local, ...) and the best of `--repeats` is kept for each, since the machine is shared; the load average is
printed. Before timing, a warm-up run lets each Ray worker import torch/transformers and build the tokenizer
once (what a long run amortises); the cold first run is printed as well. Goal: ratio >= 1.7 on 2 cores. Each
run also prints the CPU it used (this process and its Ray cluster, via psutil) and the cores other processes
kept busy meanwhile (/proc/stat): on a shared machine the ratio is only meaningful when the latter is near 0.

Ray workers run at nice 0 here, like the single-process engine (Ray's default is 15, which on a shared machine
gives the CPU to other users' processes first). Driver memory: a sampler thread reads this process's resident set size (/proc/self/statm) every 10 ms during a
Ray run at each of `--memory-rows` (default 1k and 10k rows); the figure is the peak during the run. The
driver keeps ids and chunk descriptions only, so the peak should stay flat (goal: 10k / 1k <= 1.10). This
process also imports torch for the single-process engine, which is part of both peaks.

    .venv/bin/python -m bench.preprocess [--rows 2000] [--memory-rows 1000,10000] [--image-px 256] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from bench.common import print_figures
from medplib_datasets.synth import build_synth
from workflows.data.preprocess import PrepareConfig, prepare


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak_mb` is the largest sample since start()."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:  # no procfs: the process-lifetime peak (KiB on Linux) is the best there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakRSS:
        self.start_rss = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat), 0 without procfs."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its descendants (the local Ray cluster: raylet, workers, ...)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a process that ended meanwhile
            pass
    return total


def timed_prepare(data: Path, out: Path, cfg: PrepareConfig, engine: str) -> tuple[float, int, float, float]:
    """(seconds, accepted rows, our CPU seconds, other processes' CPU seconds) of one forced run.

    The machine is shared: the CPU seconds other processes used during the run say how much of the machine the
    run actually had (on 2 cores, 1.0 core used by others halves what Ray can gain)."""
    busy0, own0 = machine_busy_s(), own_cpu_s()
    started = time.perf_counter()
    result = prepare(data, out, cfg, engine=engine, force=True)
    seconds = time.perf_counter() - started
    own = own_cpu_s() - own0
    return seconds, result.manifest["counts"]["accepted"], own, max(0.0, machine_busy_s() - busy0 - own)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000, help="rows of the throughput comparison")
    ap.add_argument(
        "--memory-rows", default="1000,10000", help="comma-separated row counts for the memory runs"
    )
    ap.add_argument("--image-px", type=int, default=256, help="side of the synthetic images")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per Ray task (PrepareConfig.batch_size)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per engine; the best is kept")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    memory_rows = [int(n) for n in args.memory_rows.split(",") if n]

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    sizes = sorted({args.rows, *memory_rows})
    for n in sizes:
        build_synth(work / f"synth-{n}", n, seed=0, image_px=args.image_px)
    build_synth(work / "warmup", 4 * args.cpus * 8, seed=1, image_px=args.image_px)
    cfg = PrepareConfig(batch_size=args.batch_size)

    started = time.perf_counter()
    # Ray starts its workers at nice 15 (RayConfig worker_niceness) so a busy node keeps its driver responsive.
    # On a shared machine that hands the CPU to everyone else's processes and not to the Ray workers, while the
    # single-process engine runs at nice 0: give both engines the same priority.
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": 0},
    )
    print(
        f"ray.init: {time.perf_counter() - started:.1f} s, {args.cpus} CPUs; load average {os.getloadavg()}"
    )
    ray.data.DataContext.get_current().enable_progress_bars = False  # bars would only add driver work here
    try:
        cold_s, *_ = timed_prepare(
            work / "warmup", work / "out-warmup", cfg.with_overrides(batch_size=8), "ray"
        )
        print(f"warm-up (cold workers, {4 * args.cpus * 8} rows): {cold_s:.1f} s")

        data = work / f"synth-{args.rows}"
        best = {"ray": float("inf"), "local": float("inf")}
        for i in range(args.repeats):
            for engine in ("ray", "local"):
                seconds, accepted, own, others = timed_prepare(data, work / f"out-{engine}", cfg, engine)
                assert accepted == args.rows, f"{engine}: {accepted} of {args.rows} rows accepted"
                best[engine] = min(best[engine], seconds)
                print(
                    f"run {i + 1} {engine:>5}: {args.rows} rows in {seconds:.2f} s = {args.rows / seconds:.0f} "
                    f"rows/s; CPU: ours {own:.1f} s ({own / seconds:.2f} cores), other processes "
                    f"{others / seconds:.2f} cores; load average {os.getloadavg()[0]:.1f}"
                )
        ray_rps, local_rps = args.rows / best["ray"], args.rows / best["local"]
        ratio = ray_rps / local_rps
        print(
            f"Ray Data {ray_rps:.0f} rows/s, single process {local_rps:.0f} rows/s: ratio {ratio:.2f} "
            f"(goal >= 1.7 on 2 cores)"
        )

        peaks: dict[int, float] = {}
        for n in memory_rows:
            with PeakRSS() as sampler:
                seconds, accepted, *_ = timed_prepare(work / f"synth-{n}", work / f"out-mem-{n}", cfg, "ray")
            peaks[n] = sampler.peak_mb
            print(
                f"driver RSS, Ray run of {n} rows ({accepted} accepted, {n / seconds:.0f} rows/s): "
                f"start {sampler.start_rss / 2**20:.0f} MB, peak {sampler.peak_mb:.0f} MB"
            )
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    figures = [
        {"name": "preprocess_ray_rows_per_s", "value": round(ray_rps, 1), "goal": None},
        {"name": "preprocess_single_process_rows_per_s", "value": round(local_rps, 1), "goal": None},
        {"name": "preprocess_ray_over_single_process_ratio", "value": round(ratio, 3), "goal": ">= 1.7"},
    ]
    for n, peak in peaks.items():
        figures.append(
            {"name": f"preprocess_driver_peak_rss_mb_{n}_rows", "value": round(peak, 1), "goal": None}
        )
    if len(memory_rows) >= 2:
        small, large = memory_rows[0], memory_rows[-1]
        figures.append(
            {
                "name": f"preprocess_driver_peak_rss_{large}_over_{small}_rows",
                "value": round(peaks[large] / peaks[small], 3),
                "goal": "<= 1.10",
            }
        )
    print_figures(figures)


if __name__ == "__main__":
    main()
