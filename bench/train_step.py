"""Training-step throughput of the `small` preset on real MRI rows, the speed work side by side in one run.

One step = forward + backward (no optimiser update, so every variant sees the same weights) on a batch of
grounding rows (a real ICBM152 slice, a question, a `<SEG>` answer and its target mask), training what the
grounding stage trains, read from its config (`configs/stages/small/grounding.yaml`: FFN LoRA of the last 8
layers without dropout, the added tokens' embedding rows, the `<SEG>` head, the mask decoder). Before
2026-12-02 the bench trained LoRA with peft's default dropout 0.05, which no stage draws: its fp32 step took 2.07
s against 1.64 s without (a Zen 4 instance), so bf16 / fp32 read 2.29 where the stages see 1.61-1.84. Measured
in one process, alternating, so a noisy machine hits every variant:

* before: fp32, gradient checkpointing, the frozen image encoder run in every step (the recipe before the
  speed work, but with the stage's LoRA as it is now: without the dropout that recipe drew);
* fp32: fp32 without checkpointing, encoder outputs cached (what `EmbeddingCache` gives the stages);
* after: the same with bf16 autocast and the frozen LLM linears stored in bf16 (the stages' `precision: auto`
  on a CPU with bf16 instructions; a copy of the model, so the fp32 variants keep fp32 weights).

Figures: rows/s after / before (goal >= 3), bf16 / fp32 rows/s (goal >= 2), the relative difference of the loss
on the same batch (goal < 1e-2), and MFU of the after variant against a bf16 matmul peak measured now (the FLOPs
the stages count, `workflows.train.flops.FlopsModel`: the backward stops at the lowest LoRA layer, the vocabulary
projection runs at the supervised positions only, the cached encoder not at all).

On a CPU without bf16 instructions (no AVX-512 or AVX-NE-CONVERT: oneDNN has no bf16 kernels, PyTorch's fallback
took over 10 minutes for one `small` step on an AVX2 EPYC, 2026-12-01) the stages' `precision: auto` is fp32, so
the after variant is the fp32 one: the figures are rows/s fp32 / before and MFU against the fp32 peak.

    .venv/bin/python -m bench.train_step [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
from pathlib import Path

import torch

from bench.common import median_seconds, print_figures, stage_config, work_dir
from medplib.allocator import tune_allocator
from medplib.constants import IGNORE_INDEX
from medplib.cpu import has_bf16_kernels
from medplib.data.batch import collate, encode_sample
from medplib.data.image import load_image
from medplib.data.schema import Turn
from medplib.model.config import load_model_config
from medplib.model.embedding_cache import EmbeddingCache
from medplib.model.lora import frozen_linears_to_bf16, prepare_trainable
from medplib.model.medplib import MedPLIB
from workflows.train.flops import FlopsModel, measure_matmul_peak


def mri_rows(model: MedPLIB, n: int) -> list:
    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    path = data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    rows = []
    for i in range(n):
        image = load_image(path, slice_index=70 + 8 * i, axis=2)
        turns = [
            Turn(role="human", text="<image>\nPlease segment the brain."),
            Turn(role="gpt", text="Sure, it is <SEG>."),
        ]
        rows.append(
            encode_sample(turns, image, model.tokenizer, model.cfg, target_masks=[image[..., 0] > 51])
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tune_allocator()  # as the stages' Ray Train workers run: they start with these allocator settings
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MedPLIB(load_model_config("small"))
    stage = stage_config("small", "grounding")
    prepare_trainable(model, stage.lora, stage.sft_modules)
    native_bf16 = has_bf16_kernels()
    fast = copy.deepcopy(model) if native_bf16 else model
    if native_bf16:
        frozen_linears_to_bf16(fast)
    rows = mri_rows(model, args.batch)
    cached = [dataclasses.replace(r) for r in rows]
    EmbeddingCache(work_dir(None, "bench-emb-"), model, autocast=native_bf16).fill(cached)
    batches = {
        "uncached": collate(rows, model.cfg, model.ids.pad),
        "cached": collate(cached, model.cfg, model.ids.pad),
    }
    variants = {  # name: (model, batch, checkpointing, autocast)
        "before": (model, "uncached", True, False),
        "fp32": (model, "cached", False, False),
        "after": (fast, "cached", False, True),
    }
    if not native_bf16:
        del variants["after"]
        print("no bf16 instructions on this CPU: the stages train in fp32, so fp32 is the after variant")
    losses: dict[str, float] = {}
    shared: dict[str, int] = {}

    def step(name: str) -> None:
        net, key, checkpointing, autocast = variants[name]
        if checkpointing:
            net.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.llm.gradient_checkpointing_disable()
        batch = dict(
            batches[key], sam_embeddings=dict(batches[key]["sam_embeddings"])
        )  # no memo across steps
        net.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = net(batch)
        out["loss"].backward()
        losses[name] = float(out["loss"])
        shared[name] = int(out["shared_tokens"])
        # No optimiser update: every variant sees the same weights, so the losses compare on the same batch.

    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load spikes hit every variant alike
        for name in variants:
            seconds[name].append(median_seconds(lambda name=name: step(name), 1, warmup=0))
    best = {name: min(times) for name, times in seconds.items()}
    rows_per_s = {name: args.batch / s for name, s in best.items()}
    cached_batch = batches["cached"]
    tokens = int(cached_batch["attention_mask"].sum())
    flops = FlopsModel.of(fast).step_flops(
        cached_batch["attention_mask"].sum(1).tolist(),
        int((cached_batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        int(cached_batch["has_image"].sum()),
        0,
        shared["fp32"],
    )
    after = "after" if native_bf16 else "fp32"
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    peak = measure_matmul_peak(torch.device("cpu"), dtype, 2048)
    for name in variants:
        print(
            f"{name:<7} {rows_per_s[name]:.2f} rows/s ({1e3 * best[name]:.0f} ms a step), loss {losses[name]:.4f}"
        )
    print(f"{str(dtype).removeprefix('torch.')} matmul peak {peak / 1e9:.0f} GFLOP/s, {tokens} tokens a step")
    figures = [
        {
            "name": "train_step_rows_per_s_after_vs_before[small]",
            "value": round(rows_per_s[after] / rows_per_s["before"], 2),
            "goal": ">= 3",
        },
        {"name": "train_step_rows_per_s[small]", "value": round(rows_per_s[after], 2), "goal": None},
    ]
    if native_bf16:
        figures += [
            {
                "name": "train_step_bf16_vs_fp32[small]",
                "value": round(rows_per_s["after"] / rows_per_s["fp32"], 2),
                "goal": ">= 2",
            },
            {
                "name": "train_step_loss_rel_diff_bf16_vs_fp32[small]",
                "value": round(abs(losses["after"] - losses["fp32"]) / abs(losses["fp32"]), 5),
                "goal": "< 0.01",
            },
        ]
    figures.append(
        {
            "name": f"train_step_mfu_{'bf16' if native_bf16 else 'fp32'}_peak[small]",
            "value": round(flops / best[after] / peak, 4),
            "goal": None,
        }
    )
    print_figures(figures)


if __name__ == "__main__":
    main()
