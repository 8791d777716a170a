"""One training stage = one Ray Train V2 `TorchTrainer` run (DeepSpeed ZeRO on every worker).

Supported, per stage (`StageConfig`, `configs/stages/<preset>/<stage>.yaml`):

* stages `vl` (VQA + region-VQA rows; the region adapter trains here), `grounding` (grounding rows, starting from
  the `vl` export) and `moe` (all rows; the `vl` model with MoE FFNs whose experts are the `grounding` and `vl`
  FFNs, `build_moe_init`);
* LoRA on the LLM + fully trained `sft_modules` (`medplib.model.lora`); LoRA merged into the weights at export;
* DeepSpeed ZeRO-2 (configurable 0-3), AdamW (a torch optimiser, see below) with a learning rate per module
  (`lr_groups`), warm-up + linear decay, gradient clipping, gradient accumulation, bf16 on GPUs and bf16
  autocast on CPUs that have bf16 instructions (`precision`), optional gradient checkpointing;
* data: each worker reads its shard of the Ray Dataset (`ray.train.get_dataset_shard`), in a deterministic order
  (the seeded order `prepare` wrote, or for a balanced stage each row's copies spread over the epoch and sorted
  by position (`select_rows`), a `preserve_order` split and a seeded per-epoch window shuffle), so a resume can skip exactly the rows already
  consumed in the epoch instead of replaying them; the frozen image encoder's outputs come from the pipeline's
  per-image cache (`medplib.model.embedding_cache`) and are computed only for images it has not seen;
* checkpoints every `checkpoint_every_steps` and at the end: every worker saves its DeepSpeed shard, the
  directory is renamed into place (atomic), then `ray.train.report` (a barrier) registers it; they hold the
  trainable parameters (LoRA + sft modules; frozen weights come from the stage's `init_model/`), the optimiser
  and scheduler state, the step and the data position;
* fault tolerance: `FailureConfig(max_failures)` restarts the worker group from the last checkpoint
  (`ray.train.get_checkpoint()`), and a run launched again with the same `RunConfig(name, storage_path)` resumes;
* per step, rank 0 logs to MLflow: loss and its parts, lr, grad norm, tokens/s, samples/s, MFU and the step
  time (one point per step, sent in batches every few seconds and at every checkpoint).

CPU workers run the same loop with DeepSpeed (gloo backend, fp32 by default, bf16 allowed; fp16 is refused on
CPU). Why DeepSpeed rather than DDP on CPU: the GPU path is DeepSpeed ZeRO-2, and running the identical engine on
CPU means the tests exercise what a GPU run does (ZeRO partitioned optimiser state, its checkpoint layout, the
fp32 consolidation at export, gradient accumulation boundaries). Its cost on CPU: ~2 s per `deepspeed.initialize`
(DeepSpeed's shared-memory comm op is switched off there: see `_without_cpu_shm_comm`). We pass a torch AdamW,
not a DeepSpeed-config optimiser, so no fused/cpu Adam op is built; `zero_allow_untested_optimizer` allows that.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from workflows.common import write_json_atomic
from workflows.data.prepared import RowInfo
from workflows.train.config import StageConfig
from workflows.train.flops import FlopsModel, matmul_dtype, measure_matmul_peak

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DS_TAG = "state"  # DeepSpeed checkpoint tag: one per Ray checkpoint directory
EPOCH_POSITION = "epoch_position"  # the column a balanced stage's rows are ordered by (`copy_positions`)
SORT_ROWS_PER_PARTITION = 2048  # rows per block of that sort (each a few tens of kB of PNG bytes)
# A stage training on at most this many row copies reads them on the driver (`select_rows`).
GATHER_ROWS = 4096
FAIL_HOOK_ENV = "MEDPLIB_TEST_FAIL"  # "<stage>:<steps>", see StagePlan.fail_after_steps
LOSS_TERMS = (
    "loss",
    "ce",
    "bce",
    "dice",
    "focal",
    "iou",
    "box",
    "moe_aux",
    "moe_route",
)  # logged per step, each its curve
METRICS_FLUSH_S = (
    5.0  # rank 0 sends buffered per-step metrics to MLflow at least this often (and at checkpoints)
)


class StagePlan(BaseModel):
    """Everything a worker needs, resolved on the driver before `fit()` (passed as `train_loop_config`)."""

    model_config = ConfigDict(extra="forbid")

    stage: StageConfig
    fingerprint: str
    init_dir: str
    stage_dir: str
    rows: int
    rows_per_worker: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    world_size: int
    use_gpu: bool
    precision: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    embedding_cache: str | None = None
    """Folder of the frozen image encoder's outputs (`medplib.model.embedding_cache`), shared by the stages and
    the evaluation of one pipeline; None computes them in every step."""
    torch_threads: int | None = None
    """Torch threads per worker; None keeps Ray's (the worker's CPU reservation)."""
    report_every_step: bool = False
    """Also `ray.train.report` the metrics (without a checkpoint) after every step: sweeps need them in Tune."""
    fail_after_steps: int | None = None
    """TEST HOOK (env MEDPLIB_TEST_FAIL="<stage>:<steps>"): raise after this many steps, once checkpointed.
    Kept out of the fingerprint, so a rerun without the variable resumes the failed run."""


class TrainState(BaseModel):
    """What a checkpoint records besides the DeepSpeed state: where training stands."""

    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    rows_consumed_in_epoch: int = 0
    fingerprint: str = ""
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------------------------------------- schedule, config


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Upstream WarmupDecayLR: linear 0 -> 1 over `warmup_steps`, then linear 1 -> 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def deepspeed_config(stage: StageConfig, precision: str, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a stage (upstream builds the same in Python: ZeRO-2, bf16, clip 1.0)."""
    zero: dict[str, Any] = {"stage": stage.zero_stage}
    if stage.zero_stage in (1, 2):
        zero.update(
            # The contiguous buffer spares a GPU's caching allocator fragmentation; on CPU it is one more copy of
            # every gradient (tiny: 2 ms of a 72 ms step, the same weights to the bit, 2026-12-01).
            contiguous_gradients=use_gpu,
            overlap_comm=use_gpu,
            reduce_scatter=True,
            reduce_bucket_size=int(5e8),
            allgather_bucket_size=int(5e8),
        )
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no JIT-built DeepSpeed optimiser op
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def resolve_precision(stage: StageConfig, use_gpu: bool) -> str:
    from medplib.cpu import has_bf16_kernels

    native_bf16 = use_gpu or has_bf16_kernels()
    if stage.precision != "auto":
        if stage.precision != "fp32" and not native_bf16:
            log.warning(
                "precision %s on a CPU without bf16 kernels (no AVX-512 or AVX-NE-CONVERT) runs far slower "
                "than fp32 (`medplib.cpu.has_bf16_kernels`); precision: auto picks fp32 here",
                stage.precision,
            )
        return stage.precision
    if use_gpu:
        return "bf16"
    return "bf16-mixed" if native_bf16 else "fp32"


def fail_hook_steps(stage: str) -> int | None:
    """Steps after which the test hook makes `stage` fail, from env MEDPLIB_TEST_FAIL="<stage>:<steps>"."""
    value = os.environ.get(FAIL_HOOK_ENV, "")
    if not value:
        return None
    name, _, steps = value.partition(":")
    if not steps.isdigit():
        raise ValueError(f"{FAIL_HOOK_ENV}={value!r}: expected <stage>:<steps>, e.g. moe:3")
    return int(steps) if name == stage else None


# ---------------------------------------------------------------------------------------------- data order


def window_shuffle(rows, seed: int, epoch: int, window: int):
    """Shuffle within consecutive windows of `window` rows, with a generator seeded by (seed, epoch, window
    index): the same input order gives the same output order on every attempt."""
    buf: list = []
    index = 0
    for row in rows:
        buf.append(row)
        if len(buf) == window:
            yield from _permuted(buf, seed, epoch, index)
            buf, index = [], index + 1
    if buf:
        yield from _permuted(buf, seed, epoch, index)


def _permuted(buf: list, seed: int, epoch: int, index: int):
    order = np.random.default_rng([seed, epoch, index]).permutation(len(buf))
    for i in order:
        yield buf[i]


def plain_row(row: dict) -> dict:
    """A row as `rows.row_to_encoded` expects it (Ray Data may hand list columns over as numpy arrays)."""
    row = dict(row)
    masks = row.get("target_masks_png")
    row["target_masks_png"] = [] if masks is None else list(masks)
    return row


# ---------------------------------------------------------------------------------------------- model building


def build_moe_init(vl_dir: str | Path, grounding_dir: str | Path, stage: StageConfig):
    """The moe stage's starting model (upstream stage 3): `medplib.model.moe.init_experts_from_stages` of the
    `vl` and `grounding` exports, expert i from `stage.expert_sources[i]`, the router as `stage.moe.router_init`
    says (drawn with the stage seed when random)."""
    import torch

    from medplib.model.medplib import MedPLIB
    from medplib.model.moe import init_experts_from_stages

    sources = {"vl": MedPLIB.from_pretrained(vl_dir), "grounding": MedPLIB.from_pretrained(grounding_dir)}
    for name, m in sources.items():
        if m.cfg.moe.enabled:
            raise ValueError(
                f"the {name} model at {vl_dir if name == 'vl' else grounding_dir} already has MoE layers"
            )
    torch.manual_seed(stage.seed)
    return init_experts_from_stages(sources["vl"], sources["grounding"], stage.moe, stage.expert_sources)


def save_model_atomic(model, out_dir: str | Path) -> Path:
    """`save_pretrained` into a temp sibling, then rename: `out_dir` either is complete or does not exist."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- the worker loop


def param_groups(model, stage: StageConfig) -> list[dict]:
    """AdamW parameter groups: one per `lr_groups` entry that matches a trainable parameter (first match wins),
    then the rest at `stage.lr`; the order of parameters inside each group is the model's."""
    groups: dict[str, list] = {pattern: [] for pattern in stage.lr_groups}
    rest = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            match = next((p for p in stage.lr_groups if p in name), None)
            (groups[match] if match else rest).append(param)
    unused = [p for p, members in groups.items() if not members]
    if unused:
        raise ValueError(f"stage {stage.stage}: lr_groups {unused} match no trainable parameter")
    out = [{"params": members, "lr": stage.lr_groups[p], "name": p} for p, members in groups.items()]
    return out + ([{"params": rest, "lr": stage.lr, "name": "default"}] if rest else [])


def parameter_anchor(params: list):
    """0 x one element of every trainable parameter; build it BEFORE the forward pass and add it to the loss.

    A micro-batch need not use every trainable module (an expert that got no token, the region adapter without
    region rows, the mask decoder without grounding rows). DeepSpeed ZeRO-2 reduces gradients in the order its
    per-parameter hooks fire, and assumes that order is the same on every rank; an unused parameter gets no
    gradient at all. Either way the ranks' gradient buckets differ and the all-reduce fails ("Received data size
    doesn't match") or, worse, sums different parameters. With the anchor every parameter gets a (zero)
    gradient, and because the anchor's nodes are older than the forward's, autograd runs them last: every
    parameter's hook fires after the whole forward graph, in the anchor's (parameter list) order, on every rank
    alike (tests/test_train_config.py checks the order). Cost: no overlap of the reduction with the backward."""
    import torch

    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


def _without_cpu_shm_comm() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory allreduce op (g++ -fopenmp, ~35 s on 2 cores) behind a lock
    file in ~/.cache/torch_extensions. A worker killed while it compiles (a failed or stopped stage, a Tune trial
    ASHA ends, a test that kills a worker) leaves that lock behind, and every later stage on the machine then waits
    on it forever. gloo's allreduce serves CPU scale, so the op is marked incompatible before DeepSpeed probes its
    op table; that also skips the probe's compiler runs. On GPU the op does not exist and nothing changes."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


# DeepSpeed's ZeRO check imports its Muon optimiser to add it to the supported list, and that module runs
# `torch.compile` on its kernels at import, which loads TorchDynamo and Inductor: 2.1 s of a `small` stage's
# 3.5-s DeepSpeed set-up on 2 CPU cores (2026-12-02), in every stage. The stages train AdamW, listed anyway.
_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextlib.contextmanager
def _without_muon_import():
    """While DeepSpeed sets up, importing its Muon optimiser raises ImportError (a None in `sys.modules`), which
    DeepSpeed's check takes as "Muon not installed"; afterwards the module imports as usual."""
    if _MUON_MODULE in sys.modules:
        yield
        return
    sys.modules[_MUON_MODULE] = None
    try:
        yield
    finally:
        if sys.modules.get(_MUON_MODULE, False) is None:
            del sys.modules[_MUON_MODULE]


@dataclass
class TrainingSetup:
    """A stage's model made trainable and wrapped in its DeepSpeed engine (`setup_training`)."""

    engine: Any
    scheduler: Any
    groups: list[dict]
    params: list
    counts: dict[str, int]
    autocast: bool
    """bf16-mixed: fp32 weights and optimiser, the forward pass under bf16 autocast (the backward follows it)."""


def setup_training(
    model,
    stage: StageConfig,
    precision: str,
    use_gpu: bool,
    total_steps: int,
    warmup_steps: int,
    rank: int = 0,
) -> TrainingSetup:
    """LoRA + `sft_modules` made trainable, AdamW with the stage's lr groups and schedule, and DeepSpeed on the
    process group already up (Ray Train's on a worker; `bench.gpu_stage` starts its own). Call it with the
    stage's seed set: the LoRA init draws from it, then the seed moves on per rank (dropout differs per rank)."""
    import deepspeed
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from medplib.model.lora import frozen_linears_to_bf16, prepare_trainable

    model.gradient_checkpointing = stage.gradient_checkpointing
    counts = prepare_trainable(model, stage.lora, stage.sft_modules)
    if precision == "bf16-mixed" and not use_gpu:
        # Same products as autocast's casts, without them (measured on CPU only).
        frozen_linears_to_bf16(model)
    torch.manual_seed(stage.seed + 1000 * rank)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, stage)
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    if not use_gpu:
        _without_cpu_shm_comm()
    with _without_muon_import():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(stage, precision, use_gpu),
        )
    return TrainingSetup(engine, scheduler, groups, params, counts, autocast=precision == "bf16-mixed")


def train_micro_batch(setup: TrainingSetup, batch: dict, loss_weights) -> dict:
    """Forward, backward and `engine.step()` (the optimiser and scheduler step only at accumulation boundaries)
    of one micro-batch; returns the model's outputs (the loss and its parts)."""
    import torch

    anchor = parameter_anchor(setup.params)  # before the forward: see its docstring
    with torch.autocast(setup.engine.device.type, dtype=torch.bfloat16, enabled=setup.autocast):
        out = setup.engine(batch, loss_weights)
    setup.engine.backward(out["loss"] + anchor)
    setup.engine.step()
    return out


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; `config["plan"]` is a `StagePlan`."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from medplib.constants import IGNORE_INDEX
    from medplib.data.batch import collate
    from medplib.data.rows import row_to_encoded
    from medplib.model.medplib import MedPLIB

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = StagePlan.model_validate(config["plan"])
    stage = plan.stage
    # Ray Train touch point: rank, world size and device of this worker (Ray set up the process group).
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    stage_dir = Path(plan.stage_dir)

    began = time.perf_counter()
    if plan.torch_threads:
        # Ray sets OMP_NUM_THREADS to the worker's CPU reservation; a lone worker on a small machine may use more
        # (its reservation stays fractional so that Ray Data keeps a CPU to read with).
        torch.set_num_threads(plan.torch_threads)
    torch.manual_seed(stage.seed)  # identical LoRA init on every rank
    model = MedPLIB.from_pretrained(plan.init_dir)
    model_s = time.perf_counter() - began
    setup = setup_training(
        model, stage, plan.precision, plan.use_gpu, plan.total_steps, plan.warmup_steps, rank
    )
    engine, scheduler, groups, counts = setup.engine, setup.scheduler, setup.groups, setup.counts
    deepspeed_s = time.perf_counter() - began - model_s
    flops_model = FlopsModel.of(model)
    peak = measure_matmul_peak(device, matmul_dtype(plan.precision))
    cache = None
    if plan.embedding_cache:
        from medplib.model.embedding_cache import EmbeddingCache

        cache = EmbeddingCache(plan.embedding_cache, model, autocast=setup.autocast)

    state = TrainState(fingerprint=plan.fingerprint, mlflow_run_id=plan.mlflow_run_id)
    # Ray Train touch point: the latest registered checkpoint of this run (after a worker failure, or when a run
    # with the same name is launched again); None on a fresh start.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = TrainState.model_validate_json((Path(ckpt_dir) / STATE_FILE).read_text())
            if state.fingerprint != plan.fingerprint:
                raise ValueError(
                    f"checkpoint {checkpoint.path} belongs to fingerprint {state.fingerprint[:12]}, "
                    f"this run is {plan.fingerprint[:12]}"
                )
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=False)
        log.info(
            "%s rank %d: resumed at step %d (epoch %d, %d rows of the epoch already consumed)",
            stage.stage,
            rank,
            state.step,
            state.epoch,
            state.rows_consumed_in_epoch,
        )
    resumed_from = state.step

    tracker = None
    if rank == 0 and plan.tracking_uri and plan.mlflow_run_id:
        from mlflow import MlflowClient

        tracker = MlflowClient(plan.tracking_uri)
    if rank == 0:
        log.info(
            "%s: %d workers, %d rows (%d per worker), %d steps (%d per epoch), trainable %d of %d params, "
            "%s, %d torch threads, matmul peak %.1f GFLOP/s per worker; start-up: model %.1f s, LoRA+DeepSpeed %.1f s",
            stage.stage,
            world,
            plan.rows,
            plan.rows_per_worker,
            plan.total_steps,
            plan.steps_per_epoch,
            counts["trainable"],
            counts["total"],
            plan.precision,
            torch.get_num_threads(),
            peak / 1e9,
            model_s,
            deepspeed_s,
        )
    progress_dir = stage_dir / "progress"
    progress_dir.mkdir(parents=True, exist_ok=True)

    def progress(step: int) -> None:
        # For operators (and the worker-kill test): which process is this rank, and how far it got.
        write_json_atomic(
            progress_dir / f"rank{rank}.json",
            {"pid": os.getpid(), "step": step, "resumed_from": resumed_from, "time": time.time()},
        )

    def save_and_report(metrics: dict[str, float]) -> None:
        local = Path(tempfile.mkdtemp(prefix=f"medplib-{stage.stage}-r{rank}-"))
        partial, final = local / f"step_{state.step:08d}.partial", local / f"step_{state.step:08d}"
        # Every rank writes its ZeRO shard (rank 0 also the trainable module weights and the scheduler).
        engine.save_checkpoint(
            str(partial),
            tag=DS_TAG,
            client_state={"trainer_state": state.model_dump()},
            exclude_frozen_parameters=True,
        )
        write_json_atomic(partial / STATE_FILE, state.model_dump())
        os.replace(partial, final)  # atomic: a half-written directory is never reported
        # Ray Train touch point: a barrier across workers; Ray copies each worker's files into
        # <storage>/<name>/checkpoint_<step>/ and registers the checkpoint once every worker has reported.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(final)),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
        )
        shutil.rmtree(local, ignore_errors=True)

    # Per-step metrics (one point per step) are sent to MLflow in batches: one SQLite write costs ~6 ms of the
    # worker's CPU, a large share of a small model's step.
    unflushed: list = []
    last_flush = [time.monotonic()]

    def flush_metrics() -> None:
        if tracker is not None and unflushed:
            for i in range(0, len(unflushed), 1000):  # log_batch takes at most 1000 metrics
                tracker.log_batch(plan.mlflow_run_id, metrics=unflushed[i : i + 1000])
            unflushed.clear()
        last_flush[0] = time.monotonic()

    progress(state.step)
    # Ray Train touch point: this worker's shard of the "train" dataset (split with preserve_order, so the
    # same rows reach the same rank in the same order on every attempt).
    shard = ray.train.get_dataset_shard("train")
    engine.train()
    vision_size = model.cfg.vision.image_size_px
    mb, ga = stage.micro_batch_size, stage.grad_accum
    micro_per_epoch = plan.steps_per_epoch * ga
    while state.step < plan.total_steps:
        epoch = state.step // plan.steps_per_epoch
        if epoch != state.epoch:
            state.epoch, state.micro_batches_in_epoch, state.rows_consumed_in_epoch = epoch, 0, 0
        skip_rows = state.rows_consumed_in_epoch
        rows = window_shuffle(shard.iter_rows(), stage.seed, epoch, stage.shuffle_window_rows)
        pending: list[dict] = []
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        seq_lens: list[int] = []
        image_rows = encoded_images = supervised = shared = 0
        step_started = time.perf_counter()
        for index, row in enumerate(rows):
            if index < skip_rows:
                continue  # consumed before the checkpoint we resumed from: read, not decoded, not trained on
            pending.append(row)
            if len(pending) < mb:
                continue
            encoded = [row_to_encoded(plain_row(r), vision_size) for r in pending]
            if cache is not None:
                cache.fill(encoded)
            batch = collate(encoded, model.cfg, model.ids.pad)
            # The frozen encoder runs (and costs FLOPs) only for images the cache did not hold.
            image_rows += int(batch["has_image"].sum())
            encoded_images += int(batch["has_image"].sum()) - len(batch["sam_embeddings"])
            supervised += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            pending = []
            out = train_micro_batch(setup, batch, stage.loss_weights)
            shared += int(out["shared_tokens"])
            for k in sums:
                sums[k] += float(out[k].detach())
            seq_lens += batch["attention_mask"].sum(1).tolist()
            state.micro_batches_in_epoch += 1
            state.rows_consumed_in_epoch += mb
            if state.micro_batches_in_epoch % ga:
                continue
            # ---- one optimiser step done
            state.step += 1
            now = time.perf_counter()
            # Wall time since the previous step ended: data, forward/backward/update, and this loop's own
            # bookkeeping of the previous step (metric logging, checkpoints), so the bench sees every overhead.
            elapsed, step_started = now - step_started, now
            stats = torch.tensor(
                [sums[k] / ga for k in sums] + [float(sum(seq_lens)), float(mb * ga)],
                dtype=torch.float64,
                device=device,
            )
            dist.all_reduce(stats)  # mean losses, total tokens and samples over the workers
            values = stats.tolist()
            metrics = {k: values[i] / world for i, k in enumerate(sums)}
            flops = flops_model.step_flops(seq_lens, supervised, image_rows, encoded_images, shared)
            grad_norm = engine.get_global_grad_norm()
            metrics.update(
                lr=scheduler.get_last_lr()[-1],  # the default group's (LoRA); each group's below
                **{f"lr/{g['name']}": lr for g, lr in zip(groups, scheduler.get_last_lr(), strict=True)},
                epoch=float(epoch),
                step_time_s=elapsed,
                tokens_per_s=values[-2] / elapsed,
                samples_per_s=values[-1] / elapsed,
                mfu=flops / (elapsed * peak),
            )
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            progress(state.step)
            if tracker is not None:  # rank 0 only; the driver created the run and passed its id
                from mlflow.entities import Metric

                ts = int(time.time() * 1000)
                unflushed.extend(Metric(k, float(v), ts, state.step) for k, v in metrics.items())
                if time.monotonic() - last_flush[0] >= METRICS_FLUSH_S:
                    flush_metrics()
            if rank == 0:
                log.info(
                    "%s step %d/%d loss %.4f lr %.2e %.0f tok/s %.2f samples/s mfu %.3f",
                    stage.stage,
                    state.step,
                    plan.total_steps,
                    metrics["loss"],
                    metrics["lr"],
                    metrics["tokens_per_s"],
                    metrics["samples_per_s"],
                    metrics["mfu"],
                )
            hook = plan.fail_after_steps is not None and state.step >= plan.fail_after_steps
            last = state.step >= plan.total_steps or state.micro_batches_in_epoch >= micro_per_epoch
            if state.step % stage.checkpoint_every_steps == 0 or state.step >= plan.total_steps or hook:
                flush_metrics()  # the metrics of every checkpointed step are in the store
                save_and_report({"step": state.step, **metrics})
            elif plan.report_every_step:
                ray.train.report({"step": state.step, **metrics})  # a barrier too: every rank calls it
            if hook:
                raise RuntimeError(f"{FAIL_HOOK_ENV}: {stage.stage} fails on purpose after step {state.step}")
            sums = dict.fromkeys(sums, 0.0)
            seq_lens, image_rows, encoded_images, supervised, shared = [], 0, 0, 0, 0
            if last:
                break
        if (
            state.step < plan.total_steps
            and state.epoch == epoch
            and state.micro_batches_in_epoch < micro_per_epoch
        ):
            raise RuntimeError(
                f"{stage.stage} rank {rank}: the shard ran out after {state.micro_batches_in_epoch} "
                f"micro-batches of epoch {epoch}, expected {micro_per_epoch}"
            )
        # next epoch: reset the in-epoch position
        state.epoch, state.micro_batches_in_epoch, state.rows_consumed_in_epoch = epoch + 1, 0, 0


# ---------------------------------------------------------------------------------------------- the driver


@dataclass
class StageRun:
    """What `fit_stage` returns: the final checkpoint directory and the metrics reported with it."""

    checkpoint_dir: Path
    metrics: dict[str, Any]


def group_factors(stage: StageConfig, rows: list[RowInfo]) -> dict[str, float] | None:
    """Repeat factor per `balance_by` group of the stage's rows: a group of n rows gets a share of the epoch
    proportional to n ** balance_alpha (temperature sampling, as multilingual LMs balance languages), so a kind with
    60 rows is not drowned by one with 3,900. None when the stage does not balance."""
    if stage.balance_by is None:
        return None
    counts = Counter(str(getattr(r, stage.balance_by)) for r in _stage_candidates(stage, rows))
    total = sum(counts.values())
    weights = {g: n**stage.balance_alpha for g, n in counts.items()}
    norm = sum(weights.values())
    return {g: weights[g] / norm * total / n for g, n in counts.items()}


def copy_positions(sample_id: str, factor: float) -> list[float]:
    """Where a row's copies sit in the balanced epoch, as fractions of it in [0, 1): (j + u) / factor for every
    j that lands before 1, u a hash of the id. A row repeated 86 times has its copies evenly spread (not 86 in a
    row), a row of a group with factor 0.2 appears once with probability 0.2, and any prefix of the epoch holds
    every group in its share: a stage capped at 100 steps sees the rare kinds' distinct rows, not the first two
    repeated. Deterministic, so a resume and every worker agree."""
    u = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) / 2**32
    return [(j + u) / factor for j in range(math.ceil(factor - u))] if factor > 0 else []


def repeat_count(sample_id: str, factor: float) -> int:
    """How often a row appears in the balanced epoch: floor(factor), plus one more for a fraction of the rows
    (`copy_positions`)."""
    return len(copy_positions(sample_id, factor))


def epoch_cutoff(
    stage: StageConfig, rows: list[RowInfo], factors: dict[str, float], needed: int
) -> float | None:
    """The epoch position below which the first `needed` rows of the balanced epoch lie (`copy_positions`), or
    None when the stage reads the whole epoch: a stage capped below one epoch then filters and orders only the
    rows it trains on."""
    positions = sorted(
        p
        for r in _stage_candidates(stage, rows)
        for p in copy_positions(r.sample_id, factors[str(getattr(r, stage.balance_by))])
    )
    return positions[needed] if needed < len(positions) else None


def _stage_candidates(stage: StageConfig, rows: list[RowInfo]) -> list[RowInfo]:
    candidates = [r for r in rows if r.task in stage.tasks and r.length <= stage.max_length]
    if stage.image_pool is None:
        return candidates
    pool = image_pool(
        candidates, stage.image_pool, stage.balance_by or "task", stage.image_pool_min_per_group
    )
    return [r for r in candidates if r.image is None or r.image in pool]


def _image_rank(image: str) -> str:
    return hashlib.sha1(image.encode()).hexdigest()


def image_pool(rows: list[RowInfo], size: int, group_by: str, min_per_group: int) -> set[str]:
    """The images a stage with `image_pool: size` trains on: for each group (`group_by` of `RowInfo`) its
    `min_per_group` first images by `_image_rank`, then the first images by rank until `size`. Ranking by a hash
    of the path (not by stage or seed) gives stages with the same pool size the same images, so the encoder runs
    once per image for all of them."""
    images_of: dict[str, set[str]] = {}
    for r in rows:
        if r.image is not None:
            images_of.setdefault(str(getattr(r, group_by)), set()).add(r.image)
    pool: set[str] = set()
    for images in images_of.values():
        pool.update(sorted(images, key=_image_rank)[:min_per_group])
    for image in sorted(set().union(*images_of.values()), key=_image_rank):
        if len(pool) >= size:
            break
        pool.add(image)
    return pool


def plan_steps(stage: StageConfig, rows: list[RowInfo], world: int, max_steps: int | None) -> dict[str, int]:
    """The step arithmetic of a stage from its rows (`RowInfo`); errors name the config fields."""
    tasks, max_len = set(stage.tasks), stage.max_length
    too_long = sum(1 for r in rows if r.task in tasks and r.length > max_len)
    if too_long:
        log.warning(
            "%s: %d rows longer than max_length=%d tokens are left out", stage.stage, too_long, max_len
        )
    factors = group_factors(stage, rows)
    candidates = _stage_candidates(stage, rows)
    if factors is None:
        count = len(candidates)
    else:
        count = sum(repeat_count(r.sample_id, factors[str(getattr(r, stage.balance_by))]) for r in candidates)
    per_worker = count // world
    steps_per_epoch = per_worker // stage.micro_batch_size // stage.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"stage {stage.stage}: {count} rows of tasks {sorted(tasks)} give {per_worker} per worker, fewer than "
            f"one optimiser step of micro_batch_size x grad_accum = {stage.micro_batch_size * stage.grad_accum}"
        )
    total = steps_per_epoch * stage.epochs
    for cap in (max_steps, stage.max_steps):
        if cap is not None:
            total = min(total, cap)
    return {
        "rows": count,
        "rows_per_worker": per_worker,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        # upstream: int(0.01 * steps_per_epoch); a capped quick run warms up over its own length
        "warmup_steps": int(stage.warmup_ratio * min(steps_per_epoch, total)),
    }


def select_rows(
    stage: StageConfig, prepared: str | Path, split: str, rows: list[RowInfo], world: int, total_steps: int
):
    """The rows a stage trains on, as a Ray Dataset of the prepared split (`rows` is its `row_index`): its tasks,
    at most `max_length` tokens, in the prepared order. When the stage balances (`group_factors`, which
    `plan_steps` reads too), each row's `repeat_count` copies ordered by their `copy_positions`, and only the
    positions that `total_steps` steps on `world` workers reach (`epoch_cutoff`).

    The choice is made here from `rows`: `positions` maps each chosen row to its copies' epoch positions. A stage
    of at most `GATHER_ROWS` copies (a capped run) has them read on the driver with pyarrow and handed over as one
    in-memory dataset: its first row reached the worker after ~1.5 s, against ~9 s for a distributed read and
    sort of MeCoVQA-mini's train split on 2 cores (2026-11-29). A larger one is read and sorted by Ray Data."""
    import pyarrow as pa
    import ray

    factors = group_factors(stage, rows)
    candidates = _stage_candidates(stage, rows)
    cutoff = trained = None
    if factors is None:  # each candidate once, at no position: the split's own order
        positions: dict[str, list] = {r.sample_id: [None] for r in candidates}
    else:
        trained = total_steps * stage.micro_batch_size * stage.grad_accum * world
        cutoff = epoch_cutoff(stage, rows, factors, trained)
        last = math.inf if cutoff is None else cutoff
        positions = {}
        for r in candidates:
            kept = [
                p
                for p in copy_positions(r.sample_id, factors[str(getattr(r, stage.balance_by))])
                if p <= last
            ]
            if kept:
                positions[r.sample_id] = kept

    def copies(batch: pa.Table) -> pa.Table:
        ids = batch.column("sample_id").to_pylist()
        taken = batch.take(pa.array([i for i, s in enumerate(ids) for _ in positions.get(s, ())], pa.int64()))
        if factors is None:
            return taken
        at = [p for s in ids for p in positions.get(s, ())]
        return taken.append_column(EPOCH_POSITION, pa.array(at, pa.float64()))

    if sum(map(len, positions.values())) <= GATHER_ROWS:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from medplib.data.prepared import shard_files

        wanted = pc.field("sample_id").isin(list(positions))
        table = copies(
            pa.concat_tables(pq.read_table(f, filters=wanted) for f in shard_files(prepared, split))
        )
        # Ray Data touch-point: the chosen rows as one in-memory dataset, already in training order.
        return ray.data.from_arrow(table if factors is None else table.sort_by(EPOCH_POSITION))
    from workflows.data.prepared import load_prepared

    # Ray Data touch-point: the split read in parallel, in file order whoever consumes it, each block cut to the
    # chosen copies with Arrow (a row-wise filter would turn every row, PNG bytes included, into a Python dict).
    selected = load_prepared(prepared, split, preserve_order=True).map_batches(copies, batch_format="pyarrow")
    if factors is None:
        return selected
    # Ray Data touch-point: a global sort by position (all-to-all). The positions are uniform on [0, top), so fixed
    # boundaries give even partitions without Ray's sampling pass; a balanced epoch is about as long as the
    # split's own.
    top, expected = (1.0, len(rows)) if cutoff is None else (cutoff, trained + 1)
    parts = max(2, math.ceil(expected / SORT_ROWS_PER_PARTITION))
    return selected.sort(EPOCH_POSITION, boundaries=[top * k / parts for k in range(1, parts)])


def fit_stage(
    plan: StagePlan,
    train_dataset,
    *,
    name: str,
    storage_path: str,
    cpus_per_worker: float,
    max_failures: int,
    callbacks: list | None = None,
) -> StageRun:
    """Run the stage's `TorchTrainer`; `storage_path/name` is the stage's Ray run directory (checkpoints)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan.model_dump(mode="json")},
        # Ray Train touch point: one worker per GPU, or fractional CPUs so Ray Data keeps CPU to feed them.
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.world_size, use_gpu=plan.use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        # Ray Train touch point: the run's identity. The same name + storage_path resumes from its checkpoints.
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=plan.stage.keep_checkpoints),
            callbacks=callbacks,  # e.g. Tune's TuneReportCallback in a sweep trial
        ),
        # Ray Data touch point: each worker gets an equal shard, in a deterministic order (preserve_order).
        datasets={"train": train_dataset},
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options=ExecutionOptions(preserve_order=True),
            enable_shard_locality=False,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(
            f"stage {plan.stage.stage}: training ended without a checkpoint in {storage_path}/{name}"
        )
    return StageRun(Path(result.checkpoint.path), dict(result.metrics or {}))


def export_stage_model(plan: StagePlan, checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """The stage's output model: the starting model + the trained weights (fp32, consolidated from the ZeRO
    shards), LoRA merged, written with `save_pretrained` (atomically) for the next stage and the registry."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from medplib.model.lora import merge_lora, prepare_trainable
    from medplib.model.medplib import MedPLIB

    stage = plan.stage
    torch.manual_seed(stage.seed)
    model = MedPLIB.from_pretrained(plan.init_dir)
    prepare_trainable(model, stage.lora, stage.sft_modules)
    trained = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint_dir), tag=DS_TAG, exclude_frozen_parameters=True
    )
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(trained))
    unexpected = sorted(set(trained) - set(model.state_dict()))  # state_dict keeps tied names (lm_head)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint_dir} does not match stage {stage.stage}'s trainable parameters: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(trained, strict=False)
    merge_lora(model)
    model.requires_grad_(False)
    return save_model_atomic(model.eval(), out_dir)
