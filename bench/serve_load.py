"""Serving under load: latency and throughput with `@serve.batch` on and off, and the serving overhead.

    python -m bench.serve_load                      # tiny preset on a local Ray (2 CPUs), about 2-3 minutes
    python -m bench.serve_load --model models:/medplib@champion --num-gpus 1 --num-cpus 4

One local Ray cluster runs two applications side by side, each one replica with the same resources:
`batched` (max_batch_size 32) and `unbatched` (max_batch_size 1). For each, at concurrency 1, 8 and 32 (a fixed
number of requests each, after a warm-up burst), async httpx clients POST the same `/v1/predict` request (a box
prompt, `segment: true`, RLE mask back) and we record p50/p99 latency and requests/s.

Figures (the last line, one JSON array of {name, value, goal}):
* `batching_speedup_c32`: batched / unbatched requests/s at concurrency 32 (goal >= 2).
* `serve_overhead_p50_ms`: p50 of one HTTP request at concurrency 1 (batched app, so it includes the batch wait)
  minus p50 of `Predictor.predict` on the same input in this process (goal <= 15 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import math
import os
import socket
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from bench.common import print_figures

LEVELS = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _load(url: str, body: dict, concurrency: int, total: int) -> dict[str, float]:
    """`total` requests from `concurrency` clients: latency percentiles, requests/s, and from the responses the
    mean batch size and the median time spent on the replica."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    server_s: list[float] = []
    remaining = total
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/predict", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
                timings = r.json()["timings"]
                batch_sizes.append(timings["batch_size"])
                server_s.append(timings["server_s"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "rps": len(latencies) / wall,
        "mean_batch": statistics.mean(batch_sizes),
        "server_p50_ms": 1000 * statistics.median(server_s),
    }


def _overhead(url: str, body: dict, direct_call, rounds: int) -> tuple[float, float]:
    """p50 of HTTP requests and of direct calls, interleaved one by one so both see the same machine load."""
    http_s, direct_s = [], []
    with httpx.Client(timeout=120) as http:
        for i in range(rounds + 5):
            t0 = time.perf_counter()
            direct_call()
            t1 = time.perf_counter()
            r = http.post(f"{url}/v1/predict", json=body)
            t2 = time.perf_counter()
            assert r.status_code == 200, r.text[:300]
            if i >= 5:  # warm-up
                direct_s.append(t1 - t0)
                http_s.append(t2 - t1)
    return 1000 * statistics.median(http_s), 1000 * statistics.median(direct_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="preset, model directory or MLflow model URI")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (each app has one)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--requests", type=int, default=4, help="requests per client at each level (x concurrency)"
    )
    parser.add_argument("--image-px", type=int, default=96)
    parser.add_argument("--overhead-rounds", type=int, default=40, help="interleaved direct/HTTP pairs")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from medplib.data.schema import Box
    from medplib.inference import Predictor, resolve_model_source
    from serve.app import run
    from serve.config import DEFAULT_CONFIG, ServeConfig
    from workflows.common import init_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("MEDPLIB_API_KEY", None)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (args.image_px, args.image_px, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    box = {"x0": 8, "y0": 8, "x1": args.image_px // 2, "y1": args.image_px // 2}
    body = {
        "image": base64.b64encode(buf.getvalue()).decode(),
        "question": "Segment <region>.",
        "regions": [{"kind": "box", **box}],
        "max_new_tokens": args.max_new_tokens,
        "segment": True,
        "mask_encoding": "rle",
    }

    # Ray: one local cluster with room for both apps' replicas (logical CPUs; the machine may have fewer).
    init_ray(
        "local",
        num_cpus=max(2, math.ceil(2 * args.num_cpus)),
        log_to_driver=False,
    )
    base = ServeConfig.from_yaml(DEFAULT_CONFIG).override(
        {
            "http.port": _free_port(),
            "args.model": args.model,
            "deployment.max_ongoing_requests": 64,
            "deployment.ray_actor_options.num_cpus": args.num_cpus,
            "deployment.ray_actor_options.num_gpus": args.num_gpus,
            "deployment.autoscaling_config.min_replicas": 1,
            "deployment.autoscaling_config.max_replicas": 1,
        }
    )
    urls = {}
    for name, batch in (("batched", 32), ("unbatched", 1)):
        cfg = base.override({"name": name, "route_prefix": f"/{name}", "args.batching.max_batch_size": batch})
        urls[name] = run(cfg)

    # The direct call: same input, same torch thread count as a replica, in this process.
    import torch

    torch.set_num_threads(max(1, int(args.num_cpus)))
    predictor = Predictor.from_pretrained(
        resolve_model_source(args.model), device="cuda" if args.num_gpus else None
    )

    def direct_call() -> None:
        predictor.predict(
            image, body["question"], [Box(**box)], max_new_tokens=args.max_new_tokens, segment=True
        )

    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        http_p50, direct_p50 = _overhead(urls["batched"], body, direct_call, args.overhead_rounds)
        http_p50_unbatched, direct_p50_2 = _overhead(
            urls["unbatched"], body, direct_call, args.overhead_rounds
        )
        for url in urls.values():
            for c in (32, 8):  # warm-up: a new batch shape is slow the first time
                asyncio.run(_load(url, body, c, 2 * c))
        for c in LEVELS:  # the two apps alternate, so both see the same background load
            for name, url in urls.items():
                results[(name, c)] = r = asyncio.run(_load(url, body, c, max(24, args.requests * c)))
                print(
                    f"{name:>9} c={c:<2}  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                    f"{r['rps']:6.1f} req/s  (mean batch {r['mean_batch']:4.1f}, "
                    f"on replica p50 {r['server_p50_ms']:6.1f} ms)",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()

    speedup = results[("batched", 32)]["rps"] / results[("unbatched", 32)]["rps"]
    overhead = http_p50 - direct_p50
    overhead_unbatched = http_p50_unbatched - direct_p50_2
    print(
        f"direct Predictor.predict p50 {direct_p50:.1f} ms, HTTP p50 {http_p50:.1f} ms (batched app) -> overhead "
        f"{overhead:.1f} ms; unbatched app: {http_p50_unbatched:.1f} - {direct_p50_2:.1f} = "
        f"{overhead_unbatched:.1f} ms",
        flush=True,
    )
    print(f"batching speedup at concurrency 32: {speedup:.2f}x", flush=True)
    figures = [
        {"name": f"{name}_c{c}_{key}", "value": round(r[key], 2), "goal": None}
        for (name, c), r in results.items()
        for key in ("p50_ms", "p99_ms", "rps")
    ]
    figures += [
        {"name": "direct_predict_p50_ms", "value": round(direct_p50, 2), "goal": None},
        {"name": "serve_overhead_unbatched_p50_ms", "value": round(overhead_unbatched, 2), "goal": None},
        {"name": "batching_speedup_c32", "value": round(speedup, 2), "goal": 2.0},
        {"name": "serve_overhead_p50_ms", "value": round(overhead, 2), "goal": 15.0},
    ]
    print_figures(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
