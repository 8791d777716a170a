"""What `medplib eval` is asked to do (`EvalConfig`) and the names of the files it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PREDICTIONS_NAME = "predictions.jsonl"
METRICS_NAME = "metrics.json"
REPORT_NAME = "report.html"
ZERO_SHOT_MARKERS = ("xsubject", "heldout", "held_out", "zeroshot", "zero_shot")


class EvalConfig(BaseModel):
    """Everything `evaluate` needs; `medplib eval` flags map one to one onto these fields."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        description="model directory, MLflow model URI (models:/NAME@ALIAS, runs:/ID/model) or preset"
    )
    data: Path = Field(description="prepared dataset folder (the output of `medplib data prepare`)")
    splits: list[str] = Field(
        default_factory=lambda: ["test"], min_length=1, description="splits to evaluate"
    )
    out: Path = Field(
        Path("eval"), description="output folder (created; files of the same name are replaced)"
    )
    max_rows: int | None = Field(
        None, ge=1, description="sample 'first': evaluate at most this many rows per split (file order)"
    )
    sample: Literal["first", "stratified"] = Field(
        "first",
        description="first: the split's rows in file order (up to max_rows); stratified: `per_kind` rows of every "
        "question type, seeded (`sample_seed`), so before/after compare the same rows",
    )
    per_kind: dict[Literal["grounding", "vqa"], int] = Field(
        default_factory=lambda: {"grounding": 16, "vqa": 8},
        description="sample stratified: rows per question type, by family (a family left out is not scored)",
    )
    split_per_kind: dict[str, dict[Literal["grounding", "vqa"], int]] = Field(
        default_factory=dict,
        description="per-split overrides of `per_kind`, e.g. fewer rows for the split that only picks the champion",
    )
    sample_seed: int = Field(0, description="seed of the stratified sample")
    teacher_forced: bool = Field(
        True,
        description="also score grounding masks from the ground-truth answer's <SEG> positions (upstream's "
        "in-training validation), beside the masks of the generated answer",
    )
    baseline_split: str | None = Field(
        "train",
        description="split whose majority closed answer per question type is the question-only baseline "
        "(null: none)",
    )
    embedding_cache: Path | None = Field(
        None, description="folder of cached frozen image-encoder outputs (shared with training), or none"
    )
    max_new_tokens: int = Field(
        112,
        ge=1,
        description="greedy decoding length limit (upstream eval: 1024; MeCoVQA-mini's longest answer: 105)",
    )
    max_new_tokens_by: dict[Literal["grounding", "closed", "open"], int] = Field(
        default_factory=dict,
        description="a smaller budget per answer family (grounding, closed, open), capped by max_new_tokens: "
        "each family's longest answer plus a margin, so that a babbling model does not decode 112 tokens "
        "where the answer is 'Sure, it is <SEG>.' or 'Yes.'",
    )
    budget_split: str | None = Field(
        None,
        description="also cap each question type's budget at a quarter more than its longest answer (tokens, the "
        "end of turn included) in this split, e.g. train: a model that learnt the format stops before it, and an "
        "untrained one's babble stops there (the untrained `small` model decoded 38 of 43 short open answers to "
        "112 tokens); a type the split lacks keeps its family's budget",
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="rows per generate call inside an actor. Greedy decoding of a small model on a CPU is bound by "
        "reading its weights, not by the rows: 32 open answers of the untrained `small` model took 27.4 s in "
        "batches of 8 and 13.2 s in one batch of 32 (2 threads, 2026-11-29)",
    )
    rows_per_call: int = Field(
        256,
        ge=1,
        description="rows an actor takes at a time; it decodes each answer family of them by image and question "
        "type in `batch_size` chunks, so batches fill and hold answers of similar length (8-row calls of a "
        "stratified sample held 3.5 rows of a family on average, 2026-11-29); with many actors, lower it so each "
        "gets work",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="actors (one model each); default: one per GPU, or on a CPU-only cluster one per CPU core "
        "(at most 8), each on one thread (`actor_count`)",
    )
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="auto: one GPU per actor when the Ray cluster has GPUs; yes: require them; no: CPU",
    )
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs an actor reserves on a CPU-only cluster")
    dtype: str | None = Field(None, description="override the model's dtype (float32, bfloat16)")
    seed: int = Field(0, description="torch seed set before building the model (random-init presets)")
    model_id: str | None = Field(None, description="label in the records and the report; default: `model`")
    engine: Literal["ray", "local"] = Field("ray", description="ray: actor pool; local: this process, no Ray")
    gallery_size: int = Field(4, ge=0, description="best and worst grounding cases shown per split")
    examples_per_split: int = Field(6, ge=0, description="VQA predictions shown per split in the report")
    zero_shot_markers: list[str] = Field(
        default_factory=lambda: list(ZERO_SHOT_MARKERS),
        description="a split whose name contains one of these is reported as zero-shot (cross-subject/held-out)",
    )
    mlflow_run_id: str | None = Field(None, description="log metrics and artifacts to this MLflow run")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: MLflow's own resolution"
    )
    mlflow_artifact_path: str = Field("eval", description="artifact folder inside the run")
    mlflow_prefix: str = Field("eval", description="prefix of the logged metric names: PREFIX/SPLIT/...")
    mlflow_step: int = Field(0, ge=0, description="step of the logged metrics")
    volumes: Path | None = Field(
        None,
        description="volume-level grounding rows (JSON) to score in 3-D as well (workflows/eval/volumes.py)",
    )
    compare_with: Path | None = Field(
        None, description="an earlier eval folder: write a before/after comparison"
    )
    compare_labels: tuple[str, str] = Field(("before", "after"), description="names of the two sides")

    @field_validator("splits")
    @classmethod
    def _unique_splits(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"splits must be distinct, got {value}")
        return value

    @property
    def call_rows(self) -> int:
        """Rows an actor takes at a time: `rows_per_call`, at least one generate batch."""
        return max(self.rows_per_call, self.batch_size)

    def kind_caps(self, split: str) -> dict[str, int]:
        """Rows per question type of `split` (sample stratified)."""
        return self.split_per_kind.get(split, self.per_kind)

    @property
    def label(self) -> str:
        return self.model_id or self.model

    def split_kind(self, split: str) -> Literal["in_distribution", "zero_shot"]:
        """Zero-shot splits (other subjects, a modality absent from training) get their own report section, as
        the paper reports them, never averaged with the in-distribution ones."""
        name = split.lower()
        return "zero_shot" if any(marker in name for marker in self.zero_shot_markers) else "in_distribution"
