"""Streaming: time to the first streamed token against the time of the whole answer, over real HTTP.

    python -m bench.stream_latency                   # tiny preset, 64-token answers, about 30 s
    python -m bench.stream_latency --model small --tokens 64 --repeats 5

The API runs in this process over uvicorn (`serve.api.serve_in_thread`, no Ray: the replica's code path without
the proxy). The same chat request (an image, greedy, `max_tokens` = `--tokens`) is sent alternately without
streaming (the time until the whole answer has arrived) and with `stream: true` (the time until the first
content chunk has arrived), after one warm-up of each; medians over `--repeats`. Both answers must have
`--tokens` tokens (the tiny preset at seed 0 runs to the limit on this image).

Figures (the last line, one JSON array of {name, value, goal}):
* `first_token_over_full_answer`: median first-chunk time / median whole-answer time (goal < 1/3).
* `first_token_ms` and `full_answer_ms`: the two medians.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import time

import httpx
import numpy as np
import torch
from PIL import Image

from bench.common import print_figures


def _request(tokens: int, stream: bool) -> dict:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "stream": stream}


def full_answer_s(client: httpx.Client, tokens: int) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", json=_request(tokens, stream=False))
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    got = r.json()["usage"]["completion_tokens"]
    if got != tokens:
        raise SystemExit(f"the answer has {got} tokens, not {tokens}: pick another --model or --tokens")
    return elapsed


def first_token_s(client: httpx.Client, tokens: int) -> float:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=_request(tokens, stream=True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - t0  # the first piece of the answer itself
    if first is None:
        raise SystemExit("the stream carried no content")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    from serve.api import LocalBackend, serve_in_thread
    from serve.config import AppArgs
    from serve.service import MedPLIBService

    torch.manual_seed(0)
    service = MedPLIBService(AppArgs(model=args.model))
    url, stop = serve_in_thread(LocalBackend(service))
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            full_answer_s(client, args.tokens)  # warm-up of both paths
            first_token_s(client, args.tokens)
            full, first = [], []
            for _ in range(args.repeats):  # alternating, so drifting load on the machine hits both alike
                full.append(full_answer_s(client, args.tokens))
                first.append(first_token_s(client, args.tokens))
    finally:
        stop()
    full_ms, first_ms = 1000 * statistics.median(full), 1000 * statistics.median(first)
    print(
        f"{args.model}, {args.tokens}-token answers, n={args.repeats} each: first streamed token "
        f"{first_ms:.1f} ms, whole answer {full_ms:.1f} ms"
    )
    print_figures(
        [
            {
                "name": "first_token_over_full_answer",
                "value": round(first_ms / full_ms, 4),
                "goal": "< 0.333",
            },
            {"name": "first_token_ms", "value": round(first_ms, 2)},
            {"name": "full_answer_ms", "value": round(full_ms, 2)},
        ]
    )


if __name__ == "__main__":
    main()
