"""`medplib eval`: prepared splits through `Predictor.run`, the code that serves, on a Ray Data actor pool; then
`predictions.jsonl` (the upstream answer record plus task, modality, split, masks and scores), `metrics.json` (per
split, task, modality and answer type) and the report (`workflows.eval.report`), optionally logged to an MLflow run
and compared with an earlier eval folder. `engine="local"` runs the same worker in this process, without Ray.
`evaluate_all` runs several evaluations (the pipeline's untrained and trained model) on one actor pool.

    from workflows.eval.evaluate import evaluate
    result = evaluate(model="runs:/ID/model", data="work/prepared", splits=["val"], out="work/eval/after",
                      max_rows=8, max_new_tokens=16, mlflow_run_id=ID, compare_with="work/eval/before")
    result.metrics["splits"]["val"]["grounding"]["mDice"]; result.report_path
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from medplib.constants import IGNORE_INDEX
from medplib.data.batch import Encoded
from medplib.inference import MLFLOW_URI_PREFIXES
from medplib.metrics import (
    group_indices,
    mask_intersection_union,
    normalize_answer,
    segmentation_scores_from_counts,
    vqa_scores,
)
from medplib_client import Prediction
from workflows.common import cluster_gpus, decide_gpu, init_ray
from workflows.data.prepared import load_prepared, row_index
from workflows.eval.config import METRICS_NAME, PREDICTIONS_NAME, EvalConfig
from workflows.eval.report import write_comparison_report, write_report
from workflows.eval.sample import kind_of, majority_answers, stratified_ids

logger = logging.getLogger(__name__)

# What one actor returns per row: the evaluation it belongs to (its position in `evaluate_all`'s list), the JSON
# record and the predicted masks as PNG bytes (the driver writes them).
OUTPUT_SCHEMA = pa.schema(
    [("job", pa.int32()), ("record_json", pa.string()), ("pred_masks_png", pa.list_(pa.binary()))]
)


class EvalResult(BaseModel):
    """What `evaluate` returns: the paths it wrote and the metrics (also in `metrics.json`)."""

    model_config = ConfigDict(protected_namespaces=())

    out: Path
    predictions_path: Path
    metrics_path: Path
    report_path: Path
    plots: list[Path] = Field(description="every PNG written (charts and gallery)")
    comparison_path: Path | None = None
    metrics: dict[str, Any]
    elapsed_s: float
    rows: int

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`{"eval/test/grounding/mDice": 0.41, ...}`: see `flatten_metrics`."""
        return flatten_metrics(self.metrics, prefix)


# ------------------------------------------------------------------------------------------------ one batch
def generation_prompt(enc: Encoded, region_feature_id: int) -> Encoded:
    """The generation prompt of a prepared (training) row: its tokens up to the first supervised answer token.

    For a single-turn row these are exactly the tokens `encode_sample(..., for_generation=True)` builds (system,
    `<image>` block, question with `<region><region_feat></region>` triples, assistant prefix): each template
    piece is tokenised on its own, so the prefix does not depend on the answer. A row whose answer was truncated
    away entirely keeps all its tokens. Region masks are trimmed to the region tokens left in the prompt (regions
    of later turns of a multi-turn row); target masks are kept for scoring.
    """
    first_answer = next((i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX), len(enc.labels))
    ids = list(enc.input_ids[:first_answer])
    num_region_tokens = ids.count(region_feature_id)
    if num_region_tokens > enc.region_masks.shape[0]:
        raise ValueError(
            f"row {enc.sample_id}: the prompt has {num_region_tokens} region tokens but the row stores "
            f"{enc.region_masks.shape[0]} region masks; prepare the data again"
        )
    return Encoded(
        input_ids=ids,
        labels=[IGNORE_INDEX] * len(ids),
        vision_view=enc.vision_view,
        sam_view=enc.sam_view,
        sam_geometry=enc.sam_geometry,
        region_masks=enc.region_masks[:num_region_tokens],
        target_masks=enc.target_masks,
        sample_id=enc.sample_id,
    )


@dataclass
class RowResult:
    """One evaluated row: its prediction record (JSON-ready) and the predicted masks (bool, original size)."""

    record: dict[str, Any]
    masks: list[np.ndarray] = field(default_factory=list)


def answer_id(model_id: str, split: str, question_id: str) -> str:
    """A stable id of one answer (upstream uses a random shortuuid; ours repeats across identical runs)."""
    return hashlib.sha1(f"{model_id}\0{split}\0{question_id}".encode()).hexdigest()[:22]


def answer_ids(enc: Encoded, eos: int) -> list[int]:
    """The supervised answer tokens of a prepared row up to its end-of-turn token: what greedy decoding yields
    (`Prediction.token_ids`) when the model answers exactly the ground truth."""
    supervised = [int(t) for t in enc.labels if t != IGNORE_INDEX]
    return supervised[: supervised.index(eos)] if eos in supervised else supervised


def is_grounding(row: dict[str, Any]) -> bool:
    return row.get("task") == "grounding" or bool(row.get("target_masks_png"))


def answer_family(row: dict[str, Any]) -> str:
    """`grounding`, `closed` or `open`: the families `EvalConfig.max_new_tokens_by` caps separately."""
    return "grounding" if is_grounding(row) else ("closed" if row.get("answer_type") == "closed" else "open")


def token_budget(
    row: dict[str, Any],
    max_new_tokens: int,
    max_new_tokens_by: dict[str, int] | None,
    by_type: dict[str, int] | None = None,
) -> int:
    """Greedy decoding limit of a row: `max_new_tokens`, capped by its answer family's `max_new_tokens_by` entry
    and by its question type's `by_type` entry (`type_budgets`)."""
    family_cap = (max_new_tokens_by or {}).get(answer_family(row), max_new_tokens)
    type_cap = (by_type or {}).get(str(row.get("question_type") or ""), max_new_tokens)
    return min(max_new_tokens, family_cap, type_cap)


def type_budgets(data: Path, split: str | None) -> dict[str, int] | None:
    """`EvalConfig.budget_split`: per question type, a quarter more than its longest supervised answer in `split`
    (answer tokens with the end of turn, as the rows' labels hold them); None without a split."""
    import pyarrow.compute as pc

    table = read_split_columns(
        data, split, ("question_type", "labels"), "the token budgets (family budgets apply)"
    )
    if table is None:
        return None
    labels = table.column("labels").combine_chunks()
    supervised = np.asarray(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX))
    counts = np.bincount(np.asarray(pc.list_parent_indices(labels))[supervised], minlength=len(labels))
    longest: dict[str, int] = {}
    for question_type, n in zip(table.column("question_type").to_pylist(), counts.tolist(), strict=True):
        key = str(question_type or "")
        longest[key] = max(longest.get(key, 0), n)
    # The quarter is slack for a held-out answer a little longer than any in training (MeCoVQA-mini's answers are
    # templated: its longest held-out answers fit).
    return {key: math.ceil(1.25 * n) for key, n in sorted(longest.items()) if n}


def predict_rows(
    predictor: Any,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int,
    model_id: str,
    batch_size: int | None = None,
    teacher_forced: bool = False,
    max_new_tokens_by: dict[str, int] | None = None,
    max_new_tokens_by_type: dict[str, int] | None = None,
) -> list[RowResult]:
    """Generate (greedy) and score prepared rows (dicts with `rows.COLUMNS`) through `Predictor.run`, the code
    that serves; results in input order.

    Grounding rows and the rest are decoded in separate `run` calls (segment=True resp. False), at most
    `batch_size` rows each, by image and then question type, each row with its own token budget
    (`token_budget`: the family's `max_new_tokens_by`, the question type's `max_new_tokens_by_type`) and each
    batch of rows of one budget.
    Grounding masks are paired with the row's targets in
    order; a target without a predicted mask is scored against an empty mask. No Ray here: `EvalWorker` and
    `engine="local"` call it.
    """
    from medplib.data.rows import row_to_encoded

    model = predictor.model
    results: list[RowResult | None] = [None] * len(rows)
    limits = [token_budget(row, max_new_tokens, max_new_tokens_by, max_new_tokens_by_type) for row in rows]
    groups = group_indices((answer_family(row), limit) for row, limit in zip(rows, limits, strict=True))
    for (family, limit), positions in groups.items():
        # Rows about one image together: a batch runs their prompt and image once (`MedPLIB.generate`). Then by
        # question type, whose rows decode to similar lengths: together, one babbled 112-token description keeps
        # one batch decoding rather than four (2026-11-29: 4 batches of 15 s where the rest took 2 s each).
        positions = sorted(
            positions,
            key=lambda i: (str(rows[i].get("image_path") or ""), str(rows[i].get("question_type") or "")),
        )
        grounding = family == "grounding"
        step = batch_size or len(positions)
        for start in range(0, len(positions), step):
            chunk = positions[start : start + step]
            full = [row_to_encoded(rows[i], predictor.cfg.vision.image_size_px) for i in chunk]
            prompts = [generation_prompt(enc, model.ids.region_feature) for enc in full]
            # As upstream eval: every grounding row gets a mask (from the last hidden state when the model emits no
            # <SEG>). Masks are scored on grounding rows only, so the other rows decode none, even for `<SEG>`s
            # they emit (the moe model of 2026-11-29 answered 4 test descriptions with 55 each: 220 masks, ~18 s).
            options = dict(max_new_tokens=limit, temperature=0.0, segment=grounding, masks=grounding)
            forced: list[Prediction | None] = [None] * len(chunk)
            if grounding and teacher_forced:
                # The ground-truth answer is teacher-forced in the generation's own pass, on the prompt's KV
                # cache: a second forward pass over the whole row was a quarter of an untrained small model's
                # evaluation (15.6 of 59 s, 48 `test` rows, AVX2 CPU, 2026-12-01). Only where the first answer
                # holds every `<SEG>` of the row; a conversation that grounds in a later turn takes that pass.
                eos, seg = model.ids.eos, model.ids.seg
                answers = [answer_ids(enc, eos) for enc in full]
                answers = [
                    answer if answer.count(seg) == enc.input_ids.count(seg) else None
                    for enc, answer in zip(full, answers, strict=True)
                ]
                pairs = predictor.run_with_answers(prompts, answers, **options)
                preds = [pred for pred, _ in pairs]
                forced = [
                    tf if answer is not None else None for (_, tf), answer in zip(pairs, answers, strict=True)
                ]
                redo = [k for k, tf in enumerate(forced) if tf is None]
                if redo:
                    for k, tf in zip(redo, predictor.teacher_forced([full[k] for k in redo]), strict=True):
                        forced[k] = tf
            else:
                preds = predictor.run(prompts, **options)
            for i, prompt, pred, tf in zip(chunk, prompts, preds, forced, strict=True):
                emitted_seg = model.ids.seg in pred.token_ids
                per_row_s = pred.timings["generate_s"] / len(chunk)
                results[i] = _row_result(
                    rows[i],
                    prompt,
                    pred,
                    emitted_seg,
                    model_id,
                    limit,
                    grounding,
                    per_row_s,
                    len(chunk),
                    tf,
                )
    return [r for r in results if r is not None]


def _row_result(
    row: dict[str, Any],
    prompt: Encoded,
    pred: Prediction,
    emitted_seg: bool,
    model_id: str,
    max_new_tokens: int,
    segment: bool,
    generate_s: float,
    batch_rows: int,
    forced: Prediction | None = None,
) -> RowResult:
    masks = pred.masks
    split = str(row.get("split") or "")
    question_id = str(row["sample_id"])

    def counts(predicted: list[np.ndarray]) -> list[list[int]]:
        out = []
        for k, target in enumerate(prompt.target_masks if segment else []):
            try:
                out.append(
                    list(mask_intersection_union(predicted[k] if k < len(predicted) else None, target))
                )
            except ValueError as err:
                raise ValueError(f"row {question_id} ({split}), mask {k}: {err}") from err
        return out

    seg_counts = counts(masks)
    ious = [i / u if u else 0.0 for i, u in seg_counts]
    dices = [2 * i / (i + u) if u else 0.0 for i, u in seg_counts]
    tf_counts = counts(forced.masks) if forced is not None else None
    record = {
        # upstream MedPLIB / LLaVA-Med answer record
        "question_id": question_id,
        "image_path": row.get("image_path"),
        "prompt": row.get("question"),
        "gt": row.get("answer"),
        "text": pred.text,
        "answer_id": answer_id(model_id, split, question_id),
        "model_id": model_id,
        "answer_type": row.get("answer_type") or "open",
        "metadata": {
            "num_generated_tokens": pred.num_generated_tokens,
            "emitted_seg": emitted_seg,
            "prompt_tokens": len(prompt.input_ids),
            "num_regions": int(row.get("num_regions") or 0),
            "num_region_tokens": int(prompt.region_masks.shape[0]),
            "segment": segment,
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "batch_rows": batch_rows,
            "generate_s": round(generate_s, 6),
        },
        # ours
        "task": row.get("task"),
        "kind": kind_of(row.get("question_type"), str(row.get("task"))),
        "modality": row.get("modality"),
        "split": split,
        "pred_masks": [
            {
                "png": None,
                "size": [int(m.shape[0]), int(m.shape[1])],
                "pixels": int(m.sum()),
                "score": float(s),
            }
            for m, s in zip(masks, pred.scores, strict=True)
        ],
        "seg_counts": seg_counts,
        "iou": float(np.mean(ious)) if ious else None,
        "dice": float(np.mean(dices)) if dices else None,
        # Teacher-forced masks (the ground-truth answer's <SEG>): counts, Dice and SAM's IoU score per mask.
        "tf_seg_counts": tf_counts,
        "tf_dice": float(np.mean([2 * i / (i + u) if u else 0.0 for i, u in tf_counts]))
        if tf_counts
        else None,
        "tf_scores": list(forced.scores) if forced is not None else None,
    }
    return RowResult(record, masks)


# ------------------------------------------------------------------------------------------------ the worker
class EvalWorker:
    """A Ray Data actor (`map_batches(EvalWorker, compute=ActorPoolStrategy(...))`): predicts batches with the
    model of the evaluation each row names (`job`, a position in `jobs`: `_job_spec`s), built when a call of it
    first arrives and kept until a call of another evaluation needs the memory.

    Input: an Arrow batch of prepared rows with a `job` column; output: `OUTPUT_SCHEMA`.
    """

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        logging.basicConfig(level=logging.INFO)  # a fresh Ray worker has no handler; a no-op elsewhere
        self.jobs = jobs
        self.job: int | None = None
        self.predictor: Any = None

    def _load(self, job: int) -> None:
        import torch

        from medplib.inference import Predictor, resolve_model_source

        spec = self.jobs[job]
        self.predictor = None  # the model held so far is freed before the next one is built
        device = "cuda" if spec["use_gpu"] and torch.cuda.is_available() else None
        source = resolve_model_source(spec["model"], spec["tracking_uri"])
        torch.manual_seed(spec["seed"])  # a random-init preset builds the same weights in every actor
        began = time.perf_counter()
        self.predictor = Predictor.from_pretrained(source, dtype=spec["dtype"], device=device)
        if spec["embedding_cache"]:
            self.predictor.use_embedding_cache(spec["embedding_cache"])
        self.job = job
        logger.info(
            "eval actor: model %s on %s in %.1f s",
            spec["model"],
            device or "cpu",
            time.perf_counter() - began,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        from medplib.data.rows import png_bytes

        jobs = batch.column("job").to_pylist()
        rows = batch.drop_columns(["job"]).to_pylist()
        out = []
        for job, positions in group_indices(jobs).items():
            if job != self.job:
                self._load(job)
            spec = self.jobs[job]
            results = predict_rows(
                self.predictor,
                [rows[i] for i in positions],
                max_new_tokens=spec["max_new_tokens"],
                model_id=spec["model_id"],
                batch_size=spec["batch_size"],
                teacher_forced=spec["teacher_forced"],
                max_new_tokens_by=spec["max_new_tokens_by"],
                max_new_tokens_by_type=spec["max_new_tokens_by_type"],
            )
            out += [
                {
                    "job": job,
                    "record_json": json.dumps(r.record),
                    "pred_masks_png": [png_bytes(m) for m in r.masks],
                }
                for r in results
            ]
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


def _want_gpus(cfg: EvalConfig) -> bool:
    if cfg.engine == "local":
        import torch

        return decide_gpu(cfg.use_gpu, torch.cuda.device_count(), "this process (torch)")
    return decide_gpu(cfg.use_gpu, cluster_gpus())


def selected_ids(cfg: EvalConfig, split: str) -> list[str]:
    """The stratified sample of a split (`workflows.eval.sample.stratified_ids`)."""
    return stratified_ids(row_index(cfg.data, split), cfg.kind_caps(split), cfg.sample_seed)


def deal_by_image(rows: Sequence[dict[str, Any]], parts: int) -> list[list[dict[str, Any]]]:
    """`rows` dealt into `parts` lists for as many actors: all rows of an image in one list (its frozen-encoder
    pass is made once), each image to the list with the fewest rows so far, taken in answer-family and
    question-type order so every list holds a like share of each family. Each list keeps the input order."""
    order = sorted(
        range(len(rows)), key=lambda i: (answer_family(rows[i]), str(rows[i].get("question_type") or ""), i)
    )

    def image_of(i: int) -> str:
        return str(rows[i].get("image_path") or f"no image: {rows[i]['sample_id']}")

    size = {key: len(idx) for key, idx in group_indices(image_of(i) for i in range(len(rows))).items()}
    part_of: dict[str, int] = {}
    load = [0] * parts
    dealt: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        key = image_of(i)
        if key not in part_of:
            part_of[key] = min(range(parts), key=lambda p: (load[p], p))
            load[part_of[key]] += size[key]
        dealt[part_of[key]].append(i)
    return [[rows[i] for i in sorted(idx)] for idx in dealt if idx]


def _calls(cfg: EvalConfig, parts: int) -> Iterator[list[dict[str, Any]]]:
    """The rows to evaluate as the calls actors take, at most `call_rows` each: a stratified sample (a few hundred
    rows, read here) dealt by image into `parts` (`deal_by_image`); otherwise each split's rows in file order."""
    from medplib.data.prepared import iter_prepared_rows

    def taken(split: str) -> Iterator[dict[str, Any]]:
        rows = iter_prepared_rows(cfg.data, split, batch_rows=cfg.call_rows)
        if cfg.sample == "stratified":
            chosen = set(selected_ids(cfg, split))
            rows = (r for r in rows if r["sample_id"] in chosen)
        return itertools.islice(rows, cfg.max_rows)

    def chunks(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        rows = iter(rows)
        while chunk := list(itertools.islice(rows, cfg.call_rows)):
            yield chunk

    if cfg.sample == "stratified":
        for part in deal_by_image([row for split in cfg.splits for row in taken(split)], parts):
            yield from chunks(part)
    else:
        for split in cfg.splits:
            yield from chunks(taken(split))


def evaluation_rows(cfg: EvalConfig) -> Iterator[dict[str, Any]]:
    """The rows `cfg` scores, in the order one actor (or `engine="local"`) takes them."""
    for call in _calls(cfg, 1):
        yield from call


def cpu_predictor(cfg: EvalConfig) -> Any:
    """The predictor an eval actor on a CPU builds for `cfg` (model, dtype, seed, embedding cache)."""
    worker = EvalWorker([_job_spec(cfg, False, None)])
    worker._load(0)
    return worker.predictor


def actor_count(cfg: EvalConfig, gpus: bool) -> int:
    """`concurrency`, else one actor per GPU, or on a CPU-only cluster one per CPU core (at most 8: each holds a
    model), each decoding on one thread: on 2 cores two 1-thread actors, each with half of the untrained `small`
    model's 189 rows, took 116 s where one 2-thread process took 124 s, start-up included (2026-11-30; decoding
    a small model is bound by Python and by thread hand-offs more than by arithmetic)."""
    import ray

    if cfg.concurrency:
        return cfg.concurrency
    if gpus:
        return max(1, int(cluster_gpus()))
    return max(1, min(8, int(ray.cluster_resources().get("CPU", 1))))


def _job_spec(cfg: EvalConfig, gpus: bool, by_type: dict[str, int] | None) -> dict[str, Any]:
    """What an `EvalWorker` needs of one evaluation, in an actor or in this process."""
    tracking_uri = cfg.tracking_uri
    if tracking_uri is None and cfg.model.startswith(MLFLOW_URI_PREFIXES):
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()  # what this process uses (set_tracking_uri is not inherited)
    return dict(
        model=cfg.model,
        seed=cfg.seed,
        dtype=cfg.dtype,
        use_gpu=gpus,
        max_new_tokens=cfg.max_new_tokens,
        model_id=cfg.label,
        batch_size=cfg.batch_size,
        tracking_uri=tracking_uri,
        teacher_forced=cfg.teacher_forced,
        embedding_cache=str(cfg.embedding_cache) if cfg.embedding_cache else None,
        max_new_tokens_by=cfg.max_new_tokens_by,
        max_new_tokens_by_type=by_type,
    )


def _tagged(call: list[dict[str, Any]], job: int) -> pa.Table:
    table = pa.Table.from_pylist(call)
    return table.append_column("job", pa.array([job] * len(table), pa.int32()))


def _iter_outputs_ray(
    cfgs: Sequence[EvalConfig], by_types: Sequence[dict[str, int] | None]
) -> Iterator[tuple[int, str, list[bytes]]]:
    import ray

    init_ray()
    first = cfgs[0]  # `_check`: the settings of the pool are the same in every config
    gpus = _want_gpus(first)
    jobs = [_job_spec(cfg, gpus, by_type) for cfg, by_type in zip(cfgs, by_types, strict=True)]
    concurrency = actor_count(first, gpus)
    if first.sample == "stratified":
        # Ray Data touch-point: the samples, dealt by image into one block per actor call, one evaluation's calls
        # after the other's (an actor builds the next model once). A call is a fixed set of rows whichever actor
        # takes it, so its generate batches, and their bf16 rounding, are the same every run.
        calls = [_tagged(call, job) for job, cfg in enumerate(cfgs) for call in _calls(cfg, concurrency)]
        ds, call_rows = ray.data.from_arrow(calls), None
        concurrency = min(concurrency, len(calls))  # no actor, no model load, without a call to make
    else:
        datasets = []
        for job, cfg in enumerate(cfgs):
            for split in cfg.splits:
                # Ray Data touch-point: the split's Parquet shards, lazily; `limit` stops reading after max_rows.
                ds = load_prepared(cfg.data, split)
                ds = ds.limit(cfg.max_rows) if cfg.max_rows else ds
                datasets.append(
                    ds.add_column(
                        "job", lambda b, job=job: pa.array([job] * len(b), pa.int32()), batch_format="pyarrow"
                    )
                )
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]  # one actor pool
        call_rows = first.call_rows
        if all(cfg.max_rows for cfg in cfgs):
            rows = sum(len(cfg.splits) * (cfg.max_rows or 0) for cfg in cfgs)
            concurrency = min(concurrency, math.ceil(rows / call_rows))
    # Ray Data touch-point: an actor pool of `concurrency` EvalWorkers, each holding one model (one GPU each
    # when there are GPUs; otherwise `cpus_per_actor`, half a CPU, so CPU is left to the read tasks).
    predicted = ds.map_batches(
        EvalWorker,
        fn_constructor_kwargs={"jobs": jobs},
        batch_size=call_rows,  # None: a whole block, i.e. one dealt call
        batch_format="pyarrow",
        # One call at a time per actor: a call is minutes of work on a CPU, and an actor that started first took
        # both of two calls while the other sat idle (2026-11-30: 198 s against 118 s).
        compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
        num_gpus=1 if gpus else 0,
        num_cpus=1 if gpus else first.cpus_per_actor,
    )
    logger.info(
        "eval: %d actor(s) on %s, %s",
        concurrency,
        "GPU" if gpus else "CPU",
        "; ".join(f"{cfg.label}: splits {', '.join(cfg.splits)}" for cfg in cfgs),
    )
    # Ray Data touch-point: results stream back to the driver batch by batch (records are small; masks are PNG).
    for row in predicted.iter_rows():
        yield row["job"], row["record_json"], list(row["pred_masks_png"] or [])


def _iter_outputs_local(
    cfgs: Sequence[EvalConfig], by_types: Sequence[dict[str, int] | None]
) -> Iterator[tuple[int, str, list[bytes]]]:
    from medplib.allocator import tune_allocator

    tune_allocator()  # this process decodes, as the Ray engine's actors do with the settings from `init_ray`
    gpus = _want_gpus(cfgs[0])
    worker = EvalWorker([_job_spec(cfg, gpus, by_type) for cfg, by_type in zip(cfgs, by_types, strict=True)])
    for job, cfg in enumerate(cfgs):
        for call in _calls(cfg, 1):
            for row in worker(_tagged(call, job)).to_pylist():
                yield row["job"], row["record_json"], row["pred_masks_png"] or []


# -------------------------------------------------------------------------------------------------- metrics
def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON; NaN means "no such rows")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _is_grounding_record(record: dict[str, Any]) -> bool:
    return record["task"] == "grounding" or bool(record["seg_counts"])


def _dice(pairs: Sequence[Sequence[int]]) -> float:
    return float(np.mean([2 * i / (i + u) if u else 0.0 for i, u in pairs])) if pairs else float("nan")


def _seg_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Grounding: the generated answer's masks (`segmentation_scores` over every mask pair: mIoU, mDice, gIoU,
    cIoU, n), the teacher-forced masks (`teacher_forced`), how often the model emitted `<SEG>` itself, the Dice
    of the rows that did and of those whose mask was forced from the last hidden state, whether SAM's IoU score
    says anything (Pearson r against the teacher-forced IoU), and all of it per kind."""
    if not records:
        return None
    pairs = [pair for r in records for pair in r["seg_counts"]]
    scores = segmentation_scores_from_counts([p[0] for p in pairs], [p[1] for p in pairs])
    scores["rows"] = len(records)
    scores["unscored_rows"] = sum(1 for r in records if not r["seg_counts"])
    emitted = [r for r in records if r["metadata"]["emitted_seg"]]
    scores["seg_token_rate"] = len(emitted) / len(records)
    scores["forced_mask_rate"] = 1.0 - scores["seg_token_rate"]
    scores["mDice_given_seg"] = _dice([p for r in emitted for p in r["seg_counts"]])
    scores["mDice_forced"] = _dice(
        [p for r in records if not r["metadata"]["emitted_seg"] for p in r["seg_counts"]]
    )
    forced = [r for r in records if r.get("tf_seg_counts") is not None]
    if forced:
        tf = [p for r in forced for p in r["tf_seg_counts"]]
        scores["teacher_forced"] = segmentation_scores_from_counts([p[0] for p in tf], [p[1] for p in tf])
        scores["teacher_forced_mDice"] = scores["teacher_forced"]["mDice"]
        scored = np.array(
            [
                (score, i / u if u else 0.0)
                for r in forced
                for score, (i, u) in zip(r["tf_scores"], r["tf_seg_counts"], strict=False)
            ]
        )
        if len(scored) >= 3 and scored.std(0).min() > 0:
            scores["score_iou_pearson"] = float(np.corrcoef(scored.T)[0, 1])
    scores["by_kind"] = {
        kind: {
            "rows": len(idx),
            "mDice": _dice([p for i in idx for p in records[i]["seg_counts"]]),
            "teacher_forced_mDice": _dice([p for i in idx for p in records[i].get("tf_seg_counts") or []]),
            "seg_token_rate": float(np.mean([records[i]["metadata"]["emitted_seg"] for i in idx])),
        }
        for kind, idx in sorted(group_indices(r.get("kind") or r["task"] for r in records).items())
    }
    return scores


def _vqa_summary(
    records: Sequence[dict[str, Any]], baseline: dict[str, str] | None = None, keep_modality: bool = False
) -> dict[str, Any] | None:
    """`vqa_scores` of the VQA and region-VQA rows, the question-only baseline's closed accuracy on the same rows
    (the train split's majority answer of each kind) and closed accuracy per kind, with the model's most common
    answer of the kind and its share: a share of 1.0 is one answer whatever the image, so accuracy there is the
    answer prior's, however high. `closed_top_answer_share` is the mean share over the kinds."""
    if not records:
        return None
    scores = vqa_scores(records)
    if not keep_modality:
        scores.pop("by_modality", None)
    closed = [r for r in records if r.get("answer_type") == "closed"]

    def correct(record: dict[str, Any], answer: str | None) -> bool:
        return answer is not None and normalize_answer(answer) == normalize_answer(record["gt"] or "")

    def baseline_of(record: dict[str, Any]) -> str | None:
        return None if baseline is None else baseline.get(record.get("kind") or record["task"])

    if baseline is not None and closed:
        scores["baseline_closed_accuracy"] = float(np.mean([correct(r, baseline_of(r)) for r in closed]))
    by_kind = {}
    for kind, idx in sorted(group_indices(r.get("kind") or r["task"] for r in closed).items()):
        top, count = Counter(normalize_answer(closed[i]["text"]) for i in idx).most_common(1)[0]
        by_kind[kind] = {
            "n": len(idx),
            "accuracy": float(np.mean([correct(closed[i], closed[i]["text"]) for i in idx])),
            "baseline": float(np.mean([correct(closed[i], baseline_of(closed[i])) for i in idx]))
            if baseline is not None
            else None,
            "top_answer": top,
            "top_answer_share": count / len(idx),
        }
    scores["closed_by_kind"] = by_kind
    if by_kind:
        scores["closed_top_answer_share"] = float(np.mean([v["top_answer_share"] for v in by_kind.values()]))
    return scores


def split_metrics(
    records: Sequence[dict[str, Any]], kind: str = "in_distribution", baseline: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metrics of one split's prediction records (NaN where a group has no rows; `_finite` turns it into null).

    `grounding`: `medplib.metrics.segmentation_scores` over every (predicted, target) mask pair of the grounding
    rows (mIoU, mDice, gIoU, cIoU, n pairs) plus `rows`, `unscored_rows` (no target mask) and `seg_token_rate`
    (rows where the model emitted `<SEG>` itself rather than the segment=True fallback). `vqa`: `vqa_scores` of
    the other rows (VQA and region VQA), with `by_answer_type`. `by_task` and `by_modality` repeat both.
    """

    def sections(subset: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "rows": len(subset),
            "grounding": _seg_summary([r for r in subset if _is_grounding_record(r)]),
            "vqa": _vqa_summary([r for r in subset if not _is_grounding_record(r)], baseline),
        }

    overall = sections(records)
    by_task = {
        str(task): sections([records[i] for i in idx])
        for task, idx in group_indices(str(r["task"]) for r in records).items()
    }
    by_modality = {
        str(modality): sections([records[i] for i in idx])
        for modality, idx in group_indices(str(r["modality"]) for r in records).items()
    }
    generate_s = sum(float(r["metadata"]["generate_s"]) for r in records)
    tokens = sum(int(r["metadata"]["num_generated_tokens"]) for r in records)
    return {
        "kind": kind,
        **overall,
        "by_task": by_task,
        "by_modality": by_modality,
        "generation": {
            "generate_s": round(generate_s, 3),
            "generated_tokens": tokens,
            "rows_per_generate_s": round(len(records) / generate_s, 3) if generate_s > 0 else None,
            "tokens_per_generate_s": round(tokens / generate_s, 1) if generate_s > 0 else None,
        },
    }


def read_split_columns(
    data: Path, split: str | None, columns: Sequence[str], purpose: str
) -> pa.Table | None:
    """Those of `columns` that a prepared split holds, all its shards, read with pyarrow on the driver; None
    without a split, and with a warning naming `purpose` when the data has no such split."""
    import pyarrow.parquet as pq

    from medplib.data.prepared import read_manifest, shard_files

    if split is None:
        return None
    if split not in read_manifest(data).get("splits", {}):
        logger.warning("eval: no split %r for %s", split, purpose)
        return None
    tables = []
    for path in shard_files(data, split):
        names = pq.read_schema(path).names
        tables.append(pq.read_table(path, columns=[c for c in columns if c in names]))
    return pa.concat_tables(tables, promote_options="default")


def question_only_baseline(cfg: EvalConfig) -> dict[str, str] | None:
    """`majority_answers` of `cfg.baseline_split` (None when there is none)."""
    columns = ("question_type", "task", "answer_type", "answer")
    table = read_split_columns(
        cfg.data, cfg.baseline_split, columns, "the question-only baseline (none reported)"
    )
    if table is None:
        return None
    return majority_answers(
        (r.get("question_type"), r["task"], r.get("answer_type"), r.get("answer")) for r in table.to_pylist()
    )


def compute_metrics(
    records: Sequence[dict[str, Any]],
    cfg: EvalConfig,
    baseline: dict[str, str] | None = None,
    by_type: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`metrics.json`: run description plus `splits: {split: split_metrics}` in the order asked for; `by_type`:
    the token budgets per question type the rows were decoded with (`type_budgets`)."""
    by_split = group_indices(r["split"] for r in records)
    splits = {}
    for split in cfg.splits:
        subset = [records[i] for i in by_split.get(split, [])]
        splits[split] = split_metrics(subset, cfg.split_kind(split), baseline)
    return _finite(
        {
            "model": cfg.model,
            "model_id": cfg.label,
            "data": str(cfg.data),
            "splits_order": list(cfg.splits),
            "max_rows": cfg.max_rows,
            "sample": cfg.sample,
            "per_kind": {s: cfg.kind_caps(s) for s in cfg.splits} if cfg.sample == "stratified" else None,
            "sample_seed": cfg.sample_seed,
            "baseline_split": cfg.baseline_split,
            "max_new_tokens": cfg.max_new_tokens,
            "max_new_tokens_by": cfg.max_new_tokens_by,
            "budget_split": cfg.budget_split,
            "max_new_tokens_by_type": by_type,
            "decoding": "greedy",
            "scale": "fractions in [0, 1] (the report shows x100)",
            "splits": splits,
        }
    )


_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def flatten_metrics(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Numbers of `metrics.json` as MLflow metric names: `PREFIX/SPLIT/grounding/mDice`,
    `PREFIX/SPLIT/by_modality/mri/vqa/closed_accuracy`, ...; nulls are left out."""
    flat: dict[str, float] = {}

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*path, str(key)])
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            flat[_METRIC_NAME_BAD.sub("_", "/".join(path))] = float(node)

    for split, section in metrics.get("splits", {}).items():
        walk({k: v for k, v in section.items() if k != "kind"}, [prefix, split])
    return flat


# --------------------------------------------------------------------------------------------------- driver
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:150]


def _write_outputs(
    cfgs: Sequence[EvalConfig], outputs: Iterable[tuple[int, str, list[bytes]]], began: float
) -> tuple[list[list[dict[str, Any]]], list[float]]:
    """Mask PNGs to each evaluation's `masks/<split>/`, its records collected and sorted (split order asked for,
    then id); and the seconds from `began` to each evaluation's last row."""
    records: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    last = [0.0] * len(cfgs)
    done = 0
    for job, record_json, mask_pngs in outputs:
        cfg, record = cfgs[job], json.loads(record_json)
        for k, data in enumerate(mask_pngs):
            relative = (
                Path("masks") / _safe_name(record["split"]) / f"{_safe_name(record['question_id'])}_{k}.png"
            )
            (cfg.out / relative).parent.mkdir(parents=True, exist_ok=True)
            (cfg.out / relative).write_bytes(data)
            record["pred_masks"][k]["png"] = relative.as_posix()
        records[job].append(record)
        last[job] = time.perf_counter() - began
        done += 1
        if done % 100 == 0:
            logger.info("eval: %d rows predicted", done)
    for cfg, job_records in zip(cfgs, records, strict=True):
        order = {split: i for i, split in enumerate(cfg.splits)}
        job_records.sort(key=lambda r: (order.get(r["split"], len(order)), r["question_id"]))
    return records, last


# Settings of the actor pool, which evaluations run together share.
_POOL_FIELDS = ("engine", "sample", "use_gpu", "concurrency", "cpus_per_actor", "rows_per_call")


def _check(cfgs: Sequence[EvalConfig]) -> None:
    """Before any model is built: the data and splits exist, the pool settings agree, and each `compare_with`
    is an eval folder or the `out` of an evaluation earlier in the list."""
    from medplib.data.prepared import read_manifest, shard_files

    if not cfgs:
        raise ValueError("evaluate_all: no evaluation given")
    for name in _POOL_FIELDS:
        values = {repr(getattr(cfg, name)) for cfg in cfgs}
        if len(values) > 1:
            raise ValueError(f"evaluations run together share one actor pool: {name} differs ({values})")
    for k, cfg in enumerate(cfgs):
        read_manifest(cfg.data)
        for split in cfg.splits:
            shard_files(cfg.data, split)  # ValueError naming the prepared splits
        earlier = {c.out.resolve() for c in cfgs[:k]}
        compare = cfg.compare_with
        if (
            compare is not None
            and compare.resolve() not in earlier
            and not (compare / METRICS_NAME).is_file()
        ):
            raise FileNotFoundError(
                f"compare_with: {compare / METRICS_NAME} not found (an eval output folder)"
            )


def evaluate(config: EvalConfig | None = None, **fields: Any) -> EvalResult:
    """Evaluate a model on prepared splits; see the module docstring. Pass an `EvalConfig` or its fields."""
    cfg = config.model_copy(update=fields) if config is not None else EvalConfig(**fields)
    return evaluate_all([cfg])[0]


def evaluate_all(configs: Sequence[EvalConfig]) -> list[EvalResult]:
    """Several evaluations on one actor pool (`engine="local"`: one worker): all of the first's calls, then the
    next's, each actor building the model of the calls it takes, so the pool starts (processes, imports) once
    and an actor done with one evaluation takes the next one's calls while the others finish. Each evaluation
    then writes its own folder, in list order, so a later one can compare with an earlier one's."""
    cfgs = [EvalConfig.model_validate(cfg.model_dump()) for cfg in configs]
    _check(cfgs)
    began = time.perf_counter()
    for cfg in cfgs:
        cfg.out.mkdir(parents=True, exist_ok=True)
    # Read once per evaluation: the actors' budgets and metrics.json's.
    by_types = [type_budgets(cfg.data, cfg.budget_split) for cfg in cfgs]
    outputs = (_iter_outputs_ray if cfgs[0].engine == "ray" else _iter_outputs_local)(cfgs, by_types)
    records, inference_s = _write_outputs(cfgs, outputs, began)
    return [
        _finish(cfg, job_records, by_type, seconds, began)
        for cfg, job_records, by_type, seconds in zip(cfgs, records, by_types, inference_s, strict=True)
    ]


def _finish(
    cfg: EvalConfig,
    records: list[dict[str, Any]],
    by_type: dict[str, int] | None,
    inference_s: float,
    began: float,
) -> EvalResult:
    """One evaluation's predictions, metrics, report (and comparison) and MLflow logging."""
    predictions_path = cfg.out / PREDICTIONS_NAME
    with predictions_path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    metrics = compute_metrics(records, cfg, question_only_baseline(cfg), by_type)
    # From the start to this evaluation's last row (evaluations run together share the actors' time).
    metrics["elapsed_s"] = round(inference_s, 3)
    metrics["rows_per_s"] = round(len(records) / inference_s, 3) if inference_s > 0 else None
    volume_html = ""
    if cfg.volumes is not None:  # 3-D rows beside the 2-D ones (workflows/eval/volumes.py)
        from workflows.eval.volumes import evaluate_volumes, volume_section_html

        metrics["volumes"], volume_records = evaluate_volumes(cfg, _want_gpus(cfg))
        volume_html, _ = volume_section_html(metrics["volumes"], volume_records, cfg.out)
    metrics_path = cfg.out / METRICS_NAME
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    comparison_path = None
    comparison = None
    if cfg.compare_with is not None:
        comparison_path = write_comparison_report(
            cfg.compare_with, cfg.out, cfg.out, labels=cfg.compare_labels
        )
        comparison = json.loads((cfg.out / "comparison.json").read_text())
    report = write_report(cfg, metrics, records, comparison=comparison, extra_html=volume_html)
    elapsed = time.perf_counter() - began
    result = EvalResult(
        out=cfg.out,
        predictions_path=predictions_path,
        metrics_path=metrics_path,
        report_path=report.html,
        plots=report.pngs + ([p for p in (cfg.out / "plots").glob("comparison_*.png")] if comparison else []),
        comparison_path=comparison_path,
        metrics=metrics,
        elapsed_s=round(elapsed, 3),
        rows=len(records),
    )
    logger.info(
        "eval: %d rows in %.1f s (%.2f rows/s); wrote %s",
        len(records),
        elapsed,
        metrics["rows_per_s"] or 0.0,
        report.html,
    )
    if cfg.mlflow_run_id:
        log_to_mlflow(result, cfg)
    return result


def summary_text(result: EvalResult) -> str:
    """What `medplib eval` prints: the headline scores per split (x100) and the files written."""
    lines = []
    for split, section in result.metrics["splits"].items():
        g, v = section.get("grounding") or {}, section.get("vqa") or {}
        parts = [f"{split} ({section['kind']}): {section['rows']} rows"]
        if g:
            parts.append(
                f"mDice {100 * (g.get('mDice') or 0):.1f} mIoU {100 * (g.get('mIoU') or 0):.1f} "
                f"(n={g.get('n')})"
            )
        if v:
            closed, f1 = v.get("closed_accuracy"), v.get("open_f1")
            parts.append(
                f"closed acc {'-' if closed is None else f'{100 * closed:.1f}'} "
                f"open F1 {'-' if f1 is None else f'{100 * f1:.1f}'}"
            )
        lines.append(" | ".join(parts))
    if "volumes" in result.metrics:
        from workflows.eval.volumes import volume_summary_lines

        lines += volume_summary_lines(result.metrics["volumes"])
    lines.append(
        f"wrote {result.predictions_path}, {result.metrics_path}, {result.report_path} "
        f"({result.rows} rows in {result.elapsed_s:.1f} s)"
    )
    return "\n".join(lines)


def log_to_mlflow(result: EvalResult, cfg: EvalConfig) -> None:
    """Flattened metrics and the report files (not the mask PNGs) to run `cfg.mlflow_run_id`.

    Uses `MlflowClient` on the run id, so it works whether or not that run is the active one in this process.
    """
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri) if cfg.tracking_uri else MlflowClient()
    run_id = cfg.mlflow_run_id
    assert run_id is not None
    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(k, v, now_ms, cfg.mlflow_step) for k, v in result.flat_metrics(cfg.mlflow_prefix).items()
    ]
    for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    files = [result.report_path, result.metrics_path, result.predictions_path]
    if result.comparison_path is not None:
        files += [result.comparison_path, result.out / "comparison.json"]
    for path in files:
        client.log_artifact(run_id, str(path), cfg.mlflow_artifact_path)
    for folder in ("plots", "gallery"):
        if (result.out / folder).is_dir():
            client.log_artifacts(run_id, str(result.out / folder), f"{cfg.mlflow_artifact_path}/{folder}")
    logger.info(
        "eval: logged %d metrics and the report to MLflow run %s (%s)",
        len(metrics),
        run_id,
        mlflow.get_tracking_uri() if not cfg.tracking_uri else cfg.tracking_uri,
    )
