"""Typed configuration of the training stages (`configs/stages/<preset>/<stage>.yaml`) and of a pipeline run
(`configs/pipeline/<preset>.yaml`).

A stage config is the upstream MedPLIB stage table as data: which rows,
which parameters train (LoRA rank/targets + fully trained modules), loss weights, optimiser, batch arithmetic.
A pipeline config names the data, the three stage configs, where everything is written, how many Ray Train
workers run, and the MLflow store. Both validate on load and errors name the file and the field.

Fingerprints: `fingerprint(obj)` is a SHA-256 of the canonical JSON of validated configs and input ids; the
pipeline keys every step's output (stage directory, Ray run name, registered model version tag) by it, so the
same inputs and config are recognised as done, and any change runs the step again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medplib.model.config import LoraSettings, LossWeights, MoEConfig, configs_dir
from workflows.eval.config import EvalConfig

StageName = Literal["align", "vl", "grounding", "moe"]
STAGES: tuple[StageName, ...] = ("align", "vl", "grounding", "moe")
# `align` (upstream stage I: the projector alone, on image-text rows) is optional; the other three are not.
REQUIRED_STAGES: tuple[StageName, ...] = ("vl", "grounding", "moe")
Task = Literal["vqa", "region_vqa", "grounding"]
# The registered MLflow model of each stage's output.
REGISTERED_MODEL = {
    "align": "medplib-align",
    "vl": "medplib-vl",
    "grounding": "medplib-grounding",
    "moe": "medplib",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class StageConfig(_Strict):
    """One training stage: a single Ray Train `TorchTrainer` run. Batch arithmetic: the global batch is
    `micro_batch_size * grad_accum * num_workers` samples per optimiser step."""

    stage: StageName
    """Which stage this is: align (the projector alone, optional), vl (VQA + region-VQA expert), grounding
    (pixel-grounding expert), moe (MoE fine-tune)."""
    preset: str
    """Model preset (`configs/model/<preset>.yaml`). `vl` builds its starting model from it; `grounding` and `moe`
    start from the previous stages' registered models, which were built from the same preset."""
    tasks: list[Task]
    """Rows (by their `task` column) that train this stage."""
    lora: LoraSettings | None
    """LoRA on the LLM's linear layers (null = none). Merged into the weights when the stage ends."""
    sft_modules: list[str] = Field(default_factory=list)
    """Name substrings of parameters trained in full (upstream `--sft_modules`; `router` is upstream `wg`)."""
    loss_weights: LossWeights
    """Weight of each loss term (ce, bce, dice, focal, iou, box, moe_aux, moe_route)."""
    lr: float = Field(gt=0)
    """Peak learning rate of AdamW for every trainable parameter `lr_groups` does not name (LoRA, ...)."""
    lr_groups: dict[str, float] = Field(default_factory=dict)
    """Peak learning rates by parameter-name substring, first match wins, e.g. `{text_hidden_fcs: 1.0e-3,
    mask_decoder: 5.0e-5}`: a head that starts at random init learns fast, a pretrained decoder slowly."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on this stage's optimiser steps (the pipeline's `max_steps` caps every stage as well)."""
    balance_by: Literal["question_type", "task", "modality"] | None = None
    """Resample the stage's rows by this column so rare kinds are seen (null: the data's own mix)."""
    balance_alpha: float = Field(0.5, ge=0, le=1)
    """With `balance_by`: a group of n rows gets a share proportional to n ** alpha (1 = the data's mix,
    0 = every group alike). Rows of a group are repeated (or thinned) deterministically to that share; the epoch
    keeps its length."""
    image_pool: int | None = Field(None, ge=1)
    """Train on the rows of at most this many images of the split (null: all). Every image costs one pass of the
    frozen image encoder (~0.55 s on 2 CPU cores) and MeCoVQA rows share images (~38 rows each), so a capped run
    that draws its rows from a pool spends its time on steps rather than encoding. The pool is the same for every
    stage with the same value (images ranked by a hash of their path), widened so that each `balance_by` group (or
    task) keeps rows of at least `image_pool_min_per_group` images."""
    image_pool_min_per_group: int = Field(8, ge=1)
    """With `image_pool`: the fewest images a group keeps (all of them when it has fewer). With 4 and a pool of 64
    the `small` model saw 4 nuclei images and its largest-nucleus Dice fell from 0.35 to 0.05 (2026-11-29)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (upstream 0.0)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (upstream (0.9, 0.95))."""
    warmup_ratio: float = Field(0.01, ge=0, le=1)
    """Linear warm-up over `int(warmup_ratio * steps_per_epoch)` steps, then linear decay to 0 (upstream
    WarmupDecayLR)."""
    epochs: int = Field(ge=1)
    """Passes over this stage's rows."""
    micro_batch_size: int = Field(ge=1)
    """Samples per worker per forward/backward (upstream `--batch_size`, per GPU)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimiser step (upstream `--grad_accumulation_steps`)."""
    max_length: int = Field(ge=16)
    """Token budget per row, image tokens included. Longer rows are left out of this stage (the count is
    logged); rows are tokenised once by `medplib data prepare`, so they are not re-truncated here."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient clipping by global norm."""
    precision: Literal["auto", "bf16", "bf16-mixed", "fp32"] = "auto"
    """bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy); bf16-mixed: fp32 weights, forward under bf16
    autocast; auto = bf16 on GPUs, bf16-mixed on CPUs with bf16 matrix instructions (~4x their fp32 matmul),
    else fp32. fp16 never works on CPU, so it is not offered."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (upstream 2; ZeRO-3 is known not to work with MoE, MoE-LLaVA #20)."""
    gradient_checkpointing: bool = True
    """Recompute LLM activations in the backward pass (upstream: always on)."""
    checkpoint_every_steps: int = Field(ge=1)
    """Optimiser steps between checkpoints (upstream `--save_steps`). The last step always checkpoints."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept in the stage's storage directory (Ray deletes older ones)."""
    shuffle_window_rows: int = Field(256, ge=1)
    """Rows shuffled together per window in each worker, with a seed fixed per epoch (so a resume sees the
    same order and skips exactly the consumed rows)."""
    seed: int = 42
    """Seeds LoRA/router init, dropout and the shuffle."""
    moe: MoEConfig | None = None
    """moe stage only: the MoE layout (upstream: dense, 2 experts, top-1, capacity factor 1.5)."""
    expert_sources: list[Literal["grounding", "vl"]] = Field(default_factory=lambda: ["grounding", "vl"])
    """moe stage only: which stage's FFN initialises expert i (upstream `--expert_pretrained_path
    stage3,stage2`: expert 0 = grounding, expert 1 = vl)."""

    @model_validator(mode="after")
    def _consistent(self) -> StageConfig:
        if self.stage == "moe":
            if self.moe is None:
                raise ValueError(
                    "moe: the moe stage needs a `moe:` section (num_experts, top_k, layers, ...)"
                )
            if len(self.expert_sources) != self.moe.num_experts:
                raise ValueError(
                    f"expert_sources: {len(self.expert_sources)} sources for moe.num_experts={self.moe.num_experts}"
                )
            if self.moe.gate_scale == "one" and not (
                self.loss_weights.moe_route or self.loss_weights.moe_aux
            ):
                raise ValueError(
                    "moe.gate_scale: 'one' gives the router no gradient from the output, and loss_weights "
                    "moe_route and moe_aux are 0: the router would never learn"
                )
        elif self.moe is not None:
            raise ValueError(f"moe: only the moe stage takes a `moe:` section, not {self.stage}")
        if not self.tasks:
            raise ValueError("tasks: list at least one of vqa, region_vqa, grounding")
        return self

    def global_batch(self, num_workers: int) -> int:
        return self.micro_batch_size * self.grad_accum * num_workers


class DataSettings(_Strict):
    """Where the rows come from. Either `prepared` (a `medplib data prepare` output) or `input` (a MeCoVQA-format
    file or folder that the pipeline prepares first)."""

    input: str | None = None
    """MeCoVQA-format JSON/JSONL file or folder (e.g. the output of `medplib data build-mini`)."""
    prepared: str | None = None
    """An existing prepared folder (`<dir>/<split>/*.parquet` + manifest.json); skips the prepare step."""
    prepare: dict[str, Any] = Field(default_factory=dict)
    """Fields of `workflows.data.preprocess.PrepareConfig` (e.g. max_rows, splits); `model_preset` is always the
    pipeline's preset, so the prepared views and token ids fit the model."""
    train_split: str = "train"
    """Split the stages train on."""
    eval_split: str = "val"
    """Split the pipeline's eval step and the sample predictions use."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSettings:
        if not self.input and not self.prepared:
            raise ValueError(
                "data: give `input` (raw MeCoVQA rows to prepare) or `prepared` (a prepared folder)"
            )
        return self


class EvalSettings(_Strict):
    """The pipeline's evaluation: the untrained starting model and the final model on the same rows of
    `data.eval_split` (which picks the champion) and of `splits` (reported; the first is the headline)."""

    splits: list[str] = Field(default_factory=lambda: ["test", "test_xsubject"])
    """Splits reported beside `data.eval_split`: the headline (`test`) and the zero-shot ones (other subjects);
    a split the prepared data lacks is skipped with a warning."""
    sample: Literal["stratified", "first"] = "stratified"
    """stratified: `per_kind` rows of every question type, seeded, the same rows before and after training;
    first: the first `max_samples` rows of each split."""
    per_kind: dict[Literal["grounding", "vqa"], int] = Field(
        default_factory=lambda: {"grounding": 16, "vqa": 8}
    )
    """Rows per question type (sample stratified), by family: grounding kinds (brain, tissue, structure, ...),
    VQA and region-VQA kinds (presence, plane, structure_box, ...)."""
    split_per_kind: dict[str, dict[Literal["grounding", "vqa"], int]] = Field(default_factory=dict)
    """Per-split overrides of `per_kind` (e.g. a smaller sample of the split that only picks the champion)."""
    max_samples: int = Field(32, ge=1)
    """Rows per split with sample: first."""
    max_new_tokens: int = Field(112, ge=1)
    """Generation budget per answer (the longest MeCoVQA-mini answer, a slice description, is 105 tokens)."""
    max_new_tokens_by: dict[Literal["grounding", "closed", "open"], int] = Field(default_factory=dict)
    """A smaller budget per answer family, capped by `max_new_tokens` (grounding answers are 'Sure, it is
    <SEG>.', closed ones a word or two): an untrained model that babbles then costs 16 tokens, not 112."""
    type_budgets: bool = True
    """Also cap each question type's budget at a quarter more than its longest answer in the train split
    (`EvalConfig.budget_split`), in the evaluations and the stages' sample predictions alike."""
    batch_size: int = Field(EvalConfig.model_fields["batch_size"].default, ge=1)
    """Rows per generate call (default: `EvalConfig.batch_size`'s, where the measurement behind it is)."""
    sample_predictions: int = Field(4, ge=0)
    """Rows rendered as PNG mask overlays + answers into each stage's MLflow run."""
    prefetch: bool = True
    """On a CPU-only cluster, encode the evaluation's images with the frozen encoder while the stages train, on
    a core they leave idle (`workflows.eval.prefetch`), so the evaluation finds them in the embedding cache."""


class PipelineConfig(_Strict):
    """data prepare -> vl -> grounding -> moe -> eval -> register, on a Ray cluster, tracked in MLflow."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Pipeline name: the MLflow parent run's name and the registry alias `latest-<name>`."""
    preset: str
    """Model preset every stage uses (must match each stage config's `preset`)."""
    workdir: str = "work/pipeline"
    """Everything the pipeline writes: prepared data, stage directories (Ray storage, exported models), and the
    default MLflow store. Relative paths are relative to the current directory."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default `sqlite:///<workdir>/mlflow.db` (MLFLOW_TRACKING_URI overrides the default)."""
    experiment: str = "medplib"
    """MLflow experiment holding the pipeline's runs."""
    data: DataSettings
    stages: dict[StageName, StageConfig]
    """The three stage configs: a path (relative to `configs/` or to this file) or an inline mapping."""
    eval: EvalSettings = EvalSettings()
    num_workers: int = Field(2, ge=1)
    """Ray Train workers per stage (one GPU each on a GPU cluster)."""
    cpus_per_worker: float = Field(0.5, gt=0)
    """CPUs reserved per worker. Keep it fractional on small machines: Ray Data needs CPU left to feed the
    workers (with 1 CPU each on 2 cores, ingestion deadlocks)."""
    threads_per_worker: int | None = Field(None, ge=1)
    """Torch threads of each training worker (null: its CPU reservation, Ray's default). A lone CPU worker may
    take every core while its reservation stays fractional, so Ray Data still gets a CPU to read with."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """auto = GPUs when the Ray cluster has any. `yes` without GPUs is an error (Ray would wait forever)."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on optimiser steps per stage for quick runs (null = the stage's full epochs)."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts per stage (Ray FailureConfig); each restart resumes from the last checkpoint."""
    ray_address: str | None = None
    """Ray cluster to join (null: the running one if any, else a local one)."""

    @model_validator(mode="after")
    def _stages(self) -> PipelineConfig:
        missing = [s for s in REQUIRED_STAGES if s not in self.stages]
        if missing:
            raise ValueError(f"stages: missing {missing}; a pipeline runs [align,] vl, grounding and moe")
        for key, stage in self.stages.items():
            if stage.stage != key:
                raise ValueError(f"stages.{key}: the file configures stage {stage.stage!r}")
            if stage.preset != self.preset:
                raise ValueError(
                    f"stages.{key}.preset is {stage.preset!r} but the pipeline preset is {self.preset!r}"
                )
        return self

    @property
    def stage_order(self) -> list[StageName]:
        """The stages this pipeline runs, in order (align only when configured)."""
        return [s for s in STAGES if s in self.stages]

    def stage_inputs(self, name: StageName) -> tuple[StageName, ...]:
        """The stages whose registered models a stage starts from: vl from align (when there is one), grounding
        from vl, moe from vl and grounding (its experts); the first stage from the preset."""
        return {
            "align": (),
            "vl": ("align",) if "align" in self.stages else (),
            "grounding": ("vl",),
            "moe": ("vl", "grounding"),
        }[name]

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).resolve()

    def resolved_tracking_uri(self) -> str:
        import os

        if self.tracking_uri:
            return self.tracking_uri
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.workdir_path / 'mlflow.db'}"


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def _explain(err: ValidationError, path: Path | str) -> ValueError:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return ValueError("\n".join(lines))


def load_stage_config(path: str | Path) -> StageConfig:
    """Read and validate one stage YAML."""
    path = Path(path)
    try:
        return StageConfig.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise _explain(err, path) from None


def _stage_path(ref: str, pipeline_file: Path) -> Path:
    for base in (pipeline_file.parent, configs_dir(), Path.cwd()):
        candidate = (base / ref).resolve()
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{pipeline_file}: stage config {ref!r} not found next to it or under {configs_dir()}"
    )


def load_pipeline_config(path: str | Path, data_input: str | None = None, **overrides: Any) -> PipelineConfig:
    """Read a pipeline YAML; stage entries that are paths are read too. `overrides` replace top-level fields
    (None values are ignored), e.g. `workdir=...` from the command line; `data_input` replaces `data.input` (and
    drops `data.prepared`, so those rows are prepared)."""
    path = Path(path)
    data = _read_yaml(path)
    if data_input is not None:
        data["data"] = {**(data.get("data") or {}), "input": data_input, "prepared": None}
    stages = data.get("stages") or {}
    if not isinstance(stages, dict):
        raise ValueError(f"{path}: stages: expected a mapping of vl/grounding/moe to files or mappings")
    resolved = {}
    for key, ref in stages.items():
        if isinstance(ref, str):
            stage_file = _stage_path(ref, path)
            try:
                resolved[key] = StageConfig.model_validate(_read_yaml(stage_file))
            except ValidationError as err:
                raise _explain(err, stage_file) from None
        else:
            resolved[key] = ref
    data["stages"] = resolved
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise _explain(err, path) from None


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists/models -> {"a.b.0": "value"} (MLflow params cannot be nested; ray#33246)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list | tuple) and obj and any(isinstance(v, dict | list) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(obj) if isinstance(obj, list | tuple) else str(obj)
    return out


def fingerprint(*parts: Any) -> str:
    """SHA-256 over the canonical JSON of validated configs / strings (what identifies a step's output)."""
    canon = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()
