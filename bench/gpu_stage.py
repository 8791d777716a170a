"""A training stage on a GPU at its own settings (DeepSpeed ZeRO-2 over NCCL, bf16), at the preset's full shapes.

CPU runs (the tests, `make run`) train with gloo and bf16 autocast; a GPU stage runs DeepSpeed's bf16 engine
with NCCL, which only a GPU can check. This runs what a Ray Train worker runs (`setup_training`, then
`train_micro_batch` per micro-batch, `workflows.train.stage`) in one process on one device, on real
MeCoVQA-mini rows of the stage's tasks, and what the evaluation runs (`MedPLIB.generate`, batched). The `7b`
preset is random-init at LLaVA-1.5-7B + CLIP ViT-L/14-336 + SAM-Med2D shapes (11.7 B parameters with the moe
stage's two experts), so the figures are about speed and numerics, not answers. Measured in one run:

* the loss of one batch in fp32 and in bf16 (the same weights, cast), relative difference (goal < 1e-2);
* batched greedy generation of the same rows' questions: rows/s at batch 8 / batch 1 (goal >= 3) and the share
  of identical answers, on a GPU in fp32 as well (bf16 rounding differs with the batch's shapes and can flip
  near-ties, which a random model is full of; fp32 tells a batching bug from that, as `bench.eval_throughput`);
* training steps at the stage's micro-batch (its YAML, or --batch): seconds a step, rows/s, tokens/s, MFU (the
  FLOPs the stages count, `FlopsModel`) against a matmul peak measured in the same process in the stage's dtype
  (bf16; fp32 on a CPU without bf16 kernels), the peak device memory of the steps; the frozen encoders'
  outputs come from an `EmbeddingCache`, as in the pipeline;
* the stage's checkpoint (its ZeRO shard without frozen weights) saved, one more step taken, and loaded back:
  the loss of a fixed batch afterwards equals the loss at the save (goal: relative difference < 1e-3).

    bench/gpu_stage.sh [MINI_DIR]        # on a GPU machine: the 7b grounding and moe stages, then the gpu tests
    python -m bench.gpu_stage --stage configs/stages/7b/grounding.yaml --data work/mecovqa-mini
    python -m bench.gpu_stage --stage configs/stages/tiny/grounding.yaml --device cpu --steps 1 --batch 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import print_figures, start_process_group, work_dir
from medplib.constants import IGNORE_INDEX
from medplib.data.batch import Encoded, collate, encode_sample
from medplib.data.image import load_image, load_mask
from medplib.data.parse import parse_row
from medplib.model.config import dense, load_model_config
from medplib.model.embedding_cache import EmbeddingCache
from medplib.model.medplib import MedPLIB
from workflows.train.config import load_stage_config
from workflows.train.flops import FlopsModel, matmul_dtype, measure_matmul_peak
from workflows.train.stage import DS_TAG, resolve_precision, setup_training, train_micro_batch


def stage_samples(annotations: Path, tasks: list[str], n: int) -> list:
    """The first rows of each of the stage's tasks in file order, taken in turn (a moe batch mixes them)."""
    per_task: dict[str, list] = {t: [] for t in tasks}
    for i, row in enumerate(json.loads(annotations.read_text())):
        sample = parse_row(row, source=annotations, index=i)
        if sample.task in per_task and len(per_task[sample.task]) < n:
            per_task[sample.task].append(sample)
    missing = [t for t, rows in per_task.items() if not rows]
    if missing:
        raise ValueError(f"{annotations}: no rows of task(s) {missing}")
    interleaved = [s for group in zip(*per_task.values(), strict=False) for s in group]
    return interleaved[:n]


def encode(samples: list, model: MedPLIB, root: Path, for_generation: bool = False) -> list[Encoded]:
    out = []
    for s in samples:
        image = load_image(root / s.image, view=s.view) if s.image else None
        masks = [] if for_generation else [load_mask(root / m) for m in s.masks]
        if for_generation:  # the question alone: the model answers it
            s = s.model_copy(update={"turns": s.turns[:1]})
        out.append(
            encode_sample(
                s,
                image,
                model.tokenizer,
                model.cfg,
                target_masks=masks,
                data_root=root,
                for_generation=for_generation,
            )
        )
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unmemoised(batch: dict) -> dict:
    """`batch` with its own copy of the encoder outputs the model memoises in it, so no call reuses another's."""
    return dict(batch, sam_embeddings=dict(batch["sam_embeddings"]))


def batch_loss(
    model: MedPLIB, batch: dict, loss_weights, device: torch.device, autocast: bool = False
) -> float:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return float(model(unmemoised(batch), loss_weights)["loss"])


def generation(
    model: MedPLIB, rows: list[Encoded], batch: int, max_new_tokens: int, device
) -> tuple[float, list]:
    """Seconds and token ids of greedy answers for `rows`, `batch` rows a call."""
    answers = []
    sync(device)
    began = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = collate(rows[i : i + batch], model.cfg, model.ids.pad)
        answers += [g.token_ids for g in model.generate(part, max_new_tokens=max_new_tokens)]
    sync(device)
    return time.perf_counter() - began, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stage", default="configs/stages/7b/grounding.yaml", help="stage YAML (its preset and settings)"
    )
    ap.add_argument(
        "--data", default="work/mecovqa-mini", help="MeCoVQA-mini folder (`medplib data build-mini`)"
    )
    ap.add_argument("--split", default="train")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=None, help="rows a micro-batch (default: the stage's)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    ap.add_argument("--gen-rows", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)
    # Every timed step one micro-batch and one optimiser update (the stage's accumulation would hide updates).
    stage = load_stage_config(args.stage).model_copy(update={"grad_accum": 1})
    use_gpu = device.type == "cuda"
    precision = resolve_precision(stage, use_gpu)
    mb = args.batch or stage.micro_batch_size
    # The dense model vl and grounding train, or the moe stage's MoE layout; built in fp32 for the parity check.
    cfg = dense(load_model_config(stage.preset))
    cfg = cfg.model_copy(update={"moe": stage.moe or cfg.moe, "dtype": "float32"})
    if use_gpu:
        # The fp32 sides of the checks are fp32, not TF32.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start_process_group(device.type)
    times: dict[str, float] = {}
    began = time.perf_counter()
    torch.manual_seed(stage.seed)
    with device:
        model = MedPLIB(cfg)
    model.eval()
    sync(device)
    times["build_s"] = time.perf_counter() - began
    root = Path(args.data)
    samples = stage_samples(
        root / f"MeCoVQA-mini_{args.split}.json", list(stage.tasks), max(mb, args.gen_rows)
    )
    rows = encode(samples[:mb], model, root)
    fixed = collate(rows, model.cfg, model.ids.pad)
    loss_fp32 = batch_loss(model, fixed, stage.loss_weights, device)
    questions = encode(samples[: args.gen_rows], model, root, for_generation=True)

    def same_answers() -> tuple[float, float, float]:
        """Seconds one row a call, seconds in batches, and the share of answers the two agree on."""
        for batch in (1, args.gen_rows):  # warm-up of both shapes: kernels, their plans, the attention switch
            generation(model, questions[:batch], batch, 2, device)
        one_s, one = generation(model, questions, 1, args.max_new_tokens, device)
        many_s, many = generation(model, questions, args.gen_rows, args.max_new_tokens, device)
        return one_s, many_s, sum(a == b for a, b in zip(one, many, strict=True)) / len(one)

    # In fp32 too where the stage runs bf16 weights: a batching bug changes fp32 answers, bf16 rounding does not.
    identical_fp32 = same_answers()[2] if precision == "bf16" else None
    if precision == "bf16":  # DeepSpeed's bf16 engine: bf16 weights (fp32 master copies of the trained ones)
        model.to(torch.bfloat16)
    # bf16-mixed (a CPU with bf16 instructions): fp32 weights, the forward pass under autocast.
    loss_bf16 = batch_loss(model, fixed, stage.loss_weights, device, autocast=precision != "bf16")
    one_s, many_s, identical = same_answers()

    total_steps = args.steps + 2
    began = time.perf_counter()
    setup = setup_training(model, stage, precision, use_gpu, total_steps, warmup_steps=0)
    sync(device)
    times["setup_s"] = time.perf_counter() - began
    cache_dir = work_dir(None, "gpu-stage-emb-")
    EmbeddingCache(cache_dir, model, autocast=setup.autocast).fill(rows)
    batch = collate(rows, model.cfg, model.ids.pad)
    engine = setup.engine
    engine.train()
    if use_gpu:  # the training peak, not the fp32 copy built for the parity check
        torch.cuda.reset_peak_memory_stats()
    step_s, losses = [], []
    for _ in range(args.steps + 1):  # the first is the warm-up
        sync(device)
        t0 = time.perf_counter()
        out = train_micro_batch(setup, unmemoised(batch), stage.loss_weights)
        losses.append(float(out["loss"].detach()))
        sync(device)
        step_s.append(time.perf_counter() - t0)
    step = min(step_s[1:])
    train_peak_gb = torch.cuda.max_memory_allocated() / 1e9 if use_gpu else None
    seq_lens = batch["attention_mask"].sum(1).tolist()
    flops = FlopsModel.of(model).step_flops(
        seq_lens,
        int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        int(batch["has_image"].sum()),
        0,
        int(out["shared_tokens"]),
    )
    # In the dtype the stage computes in: a CPU without bf16 kernels trains in fp32, and its bf16 matmul (a
    # fallback at ~1 GFLOP/s on an AVX2 EPYC) took 80 s to time and is no one's peak.
    peak_dtype = matmul_dtype(precision)
    peak = measure_matmul_peak(device, peak_dtype)
    peak_name = "fp32" if peak_dtype == torch.float32 else "bf16"

    ckpt = work_dir(None, "gpu-stage-ckpt-")
    engine.eval()
    saved_loss = batch_loss(engine.module, fixed, stage.loss_weights, device, setup.autocast)
    sync(device)
    t0 = time.perf_counter()
    engine.save_checkpoint(str(ckpt), tag=DS_TAG, exclude_frozen_parameters=True)
    sync(device)
    times["save_s"] = time.perf_counter() - t0
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    engine.train()
    train_micro_batch(setup, unmemoised(batch), stage.loss_weights)
    engine.eval()
    moved_loss = batch_loss(engine.module, fixed, stage.loss_weights, device, setup.autocast)
    t0 = time.perf_counter()
    engine.load_checkpoint(str(ckpt), tag=DS_TAG, load_module_strict=False)
    sync(device)
    times["load_s"] = time.perf_counter() - t0
    loaded_loss = batch_loss(engine.module, fixed, stage.loss_weights, device, setup.autocast)

    name = f"{stage.preset}/{stage.stage}"
    print(
        f"{name} on {torch.cuda.get_device_name() if use_gpu else 'cpu'}, {precision}, ZeRO-{stage.zero_stage}: "
        f"{setup.counts['trainable'] / 1e6:.1f} M of {setup.counts['total'] / 1e6:.0f} M parameters trained"
    )
    print(
        f"micro-batch {mb} rows, {sum(seq_lens)} tokens; steps {[round(s, 2) for s in step_s]} s, losses {losses}"
    )
    print(f"loss fp32 {loss_fp32:.5f} bf16 {loss_bf16:.5f}; checkpoint {ckpt_bytes / 1e9:.2f} GB")
    print(
        f"checkpoint loss: saved {saved_loss:.5f}, one step later {moved_loss:.5f}, loaded {loaded_loss:.5f}"
    )
    print(f"generation of {len(questions)} rows: {one_s:.2f} s one a call, {many_s:.2f} s in one call")
    print(
        f"{peak_name} matmul peak {peak / 1e12:.2f} TFLOP/s; "
        + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
    )
    memory = (
        [
            {
                "name": f"gpu_stage_train_peak_memory_gb[{name}]",
                "value": round(train_peak_gb, 1),
            }
        ]
        if use_gpu
        else []
    )
    print_figures(
        memory
        + [
            {"name": f"gpu_stage_step_s[{name}]", "value": round(step, 3), "goal": None},
            {"name": f"gpu_stage_rows_per_s[{name}]", "value": round(mb / step, 2), "goal": None},
            {"name": f"gpu_stage_tokens_per_s[{name}]", "value": round(sum(seq_lens) / step), "goal": None},
            {
                "name": f"gpu_stage_mfu_{peak_name}_peak[{name}]",
                "value": round(flops / step / peak, 4),
                "goal": None,
            },
            {
                "name": f"gpu_stage_loss_rel_diff_bf16_vs_fp32[{name}]",
                "value": round(abs(loss_bf16 - loss_fp32) / abs(loss_fp32), 5),
                "goal": "< 0.01",
            },
            {
                "name": f"gpu_stage_checkpoint_loss_rel_diff[{name}]",
                "value": round(abs(loaded_loss - saved_loss) / abs(saved_loss), 6),
                "goal": "< 0.001",
            },
            {
                "name": f"gpu_stage_gen_batched_vs_one[{name}]",
                "value": round(one_s / many_s, 2),
                "goal": ">= 3",
            },
            {"name": f"gpu_stage_gen_identical_answers[{name}]", "value": round(identical, 3), "goal": 1.0},
        ]
        + (
            []
            if identical_fp32 is None
            else [
                {
                    "name": f"gpu_stage_gen_identical_answers_fp32[{name}]",
                    "value": identical_fp32,
                    "goal": 1.0,
                }
            ]
        )
    )


if __name__ == "__main__":
    main()
