"""Evaluation throughput of the `small` preset: rows/s through `Predictor.run` one row at a time vs 8 rows a call
(one batched generation with a KV cache: left-aligned prompts, finished rows padded), measured in one run.

Rows are VQA prompts on real ICBM152 slices (8 slices x the same questions MeCoVQA-mini asks); greedy decoding.
The frozen image encoder's outputs come from an embedding cache filled before timing, on both sides, as in the
pipeline's eval (the cache the training stages filled): the encoder is per-image work that batching cannot share
(~0.6 s an image, more than a row's 32 decoding steps), and the figure is about generation.
Figures: the batch-8 / batch-1 rows/s ratio (goal >= 3) and the share of answers identical between the two
(goal 1.0: batching must not change what the model says), timed under the Predictor's bf16 autocast and checked
again in fp32: bf16 rounds differently with the batch's shape (left padding, other matmul shapes), which can flip
a near-tie of the untrained model's logits; fp32 tells a batching bug from that. `--model` takes a model directory
as well, e.g. a pipeline's moe export: a trained model's logits have fewer near-ties.

    .venv/bin/python -m bench.eval_throughput [--rows 8] [--max-new-tokens 32] [--model small|DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from bench.common import print_figures, work_dir
from medplib.allocator import tune_allocator
from medplib.data.image import load_image
from medplib.inference import Predictor

QUESTIONS = (
    "Which imaging modality is shown here?",
    "In which plane is this slice: axial, coronal or sagittal?",
    "Is the left putamen visible in this slice?",
    "What can you see in this image?",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--model",
        default="small",
        help="preset (untrained) or a model directory, e.g. a pipeline's moe export",
    )
    args = ap.parse_args()
    tune_allocator()  # as the pipeline's eval actors run: they start with these allocator settings
    torch.set_num_threads(2)
    torch.manual_seed(0)
    predictor = Predictor.from_pretrained(args.model)
    label = (
        args.model
        if args.model == predictor.model.cfg.name
        else f"{predictor.model.cfg.name}, {Path(args.model).name}"
    )
    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    volume = data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    encoded = [
        predictor.encode(load_image(volume, slice_index=60 + 6 * i, axis=2), QUESTIONS[i % len(QUESTIONS)])
        for i in range(args.rows)
    ]
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    predictor.use_embedding_cache(work_dir(None, "medplib-bench-")).fill(encoded)
    predictor.run(encoded[:1], **kwargs)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    single = [predictor.run([e], **kwargs)[0] for e in encoded]
    t1 = time.perf_counter()
    batched = predictor.run(encoded, **kwargs)
    t2 = time.perf_counter()
    same = sum(a.token_ids == b.token_ids for a, b in zip(single, batched, strict=True)) / len(encoded)
    fp32 = Predictor(predictor.model, autocast=False)
    fp32_single = [fp32.run([e], **kwargs)[0] for e in encoded]
    fp32_batched = fp32.run(encoded, **kwargs)
    same_fp32 = sum(a.token_ids == b.token_ids for a, b in zip(fp32_single, fp32_batched, strict=True)) / len(
        encoded
    )
    rows_1, rows_8 = len(encoded) / (t1 - t0), len(encoded) / (t2 - t1)
    tokens = sum(p.num_generated_tokens for p in batched)
    print(
        f"batch 1: {rows_1:.2f} rows/s; batch {len(encoded)}: {rows_8:.2f} rows/s ({tokens} tokens generated)"
    )
    for q, a, b in zip(QUESTIONS, single, batched, strict=False):
        print(f"  {q!r}: {a.text!r}" + ("" if a.token_ids == b.token_ids else f" | batched: {b.text!r}"))
    print_figures(
        [
            {
                "name": f"eval_rows_per_s_batch8_vs_batch1[{label}]",
                "value": round(rows_8 / rows_1, 2),
                "goal": ">= 3",
            },
            {
                "name": f"eval_identical_answers_batch8_vs_batch1[{label}]",
                "value": round(same, 3),
                "goal": "1.0",
            },
            {
                "name": f"eval_identical_answers_batch8_vs_batch1_fp32[{label}]",
                "value": round(same_fp32, 3),
                "goal": "1.0",
            },
            {"name": f"eval_rows_per_s_batch8[{label}]", "value": round(rows_8, 2), "goal": None},
        ]
    )


if __name__ == "__main__":
    main()
