"""Forward-time cost of the top-1, 2-expert MoE LLM against the same LLM with one dense FFN.

Both models share every weight (the MoE experts are copies of the dense FFN) and see the same inputs; the runs
are interleaved so machine noise hits both alike. The width is one where the FFN dominates the layer, as at 7B
(hidden >= 1024, FFN 4x), because at toy widths the router's fixed cost is all one sees.
Goal: ratio <= 1.10 ("the inference cost of a single expert").

    .venv/bin/python bench/moe_cost.py [--hidden 1024] [--tokens 512]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import print_figures
from medplib.model.config import MoEConfig
from medplib.model.moe import convert_to_moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="a training micro-batch worth (e.g. 2 x 1024)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    dense = LlamaForCausalLM(cfg).model.eval()
    moe = copy.deepcopy(dense)
    convert_to_moe(moe.layers, args.hidden, MoEConfig(enabled=True, num_experts=2, top_k=1, layers="dense"))
    moe.eval()
    x = torch.randn(1, args.tokens, args.hidden)
    times = {"dense": [], "moe": []}
    for _ in range(2):  # warm-up
        dense(inputs_embeds=x)
        moe(inputs_embeds=x)
    for _ in range(args.repeats):
        for name, model in (("dense", dense), ("moe", moe)):
            t0 = time.perf_counter()
            model(inputs_embeds=x)
            times[name].append(time.perf_counter() - t0)
    # The minimum over interleaved repeats: the machine is shared, and interference only ever adds time.
    d, m = min(times["dense"]), min(times["moe"])
    counts = [int(layer.mlp.expert_counts.sum()) for layer in moe.layers]
    print(f"hidden {args.hidden}, FFN {4 * args.hidden}, {args.layers} layers, {args.tokens} tokens")
    print(
        f"dense forward {d * 1e3:.1f} ms, top-1 MoE forward {m * 1e3:.1f} ms (tokens per layer run: {counts})"
    )
    print_figures(
        [
            {"name": "moe_dense_forward_ms", "value": round(d * 1e3, 2), "goal": None},
            {"name": "moe_top1_forward_ms", "value": round(m * 1e3, 2), "goal": None},
            {"name": "moe_over_dense_forward_ratio", "value": round(m / d, 3), "goal": "<= 1.10"},
        ]
    )


if __name__ == "__main__":
    main()
