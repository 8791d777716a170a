"""The whole training pipeline: data prepare -> vl -> grounding -> moe -> eval -> register.

    medplib pipeline run --config configs/pipeline/tiny.yaml [--workdir DIR] [--from-stage vl|grounding|moe]
    medplib train --stage grounding --config configs/pipeline/tiny.yaml      (one stage)

Each step's output is keyed by a fingerprint of its inputs and config (`workflows.train.config.fingerprint`):

* prepare: `workflows.data.preprocess.prepare` reuses its output when the input and config hashes match (it says
  "reusing"); with `data.prepared` the folder is used as it is. The data fingerprint is the manifest's hashes.
* stage S: fingerprint(S's config, the model preset, the data, the input stages' fingerprints, num_workers,
  max_steps). Outputs live in `<workdir>/stages/<S>-<fp12>/` (the Ray run directory: checkpoints; plus
  `init_model/`, `export/`, `mlflow_run.json`, `done.json`). A stage is skipped ("skipped: done") when `done.json`
  matches and its model version is registered; a stage that stopped half-way resumes from its last checkpoint
  (same Ray run name) and continues its MLflow run. Changing anything upstream changes every later fingerprint.
  Code changes do not: use `--from-stage S` to redo S and every later stage (their old directories are moved
  aside to `<dir>.old-<time>`).
* eval: first the untrained starting model (the first stage's own `init_model/`: the preset at random-init
  heads, `preset_start`) in `<workdir>/eval/before-<fp12>/` on the reported splits (`untrained_splits`),
  then the trained model in `<workdir>/eval/<fp12>/` on those and the champion split, same rows, both on one
  actor pool (`workflows.eval.evaluate.evaluate_all`); the trained side's folder
  holds `comparison.html`/`.json` (before vs after) and its `report.html` shows both. Both are logged to the
  parent MLflow run. On a CPU-only cluster the images of that sample are encoded while the stages train, on a
  core they leave idle (`workflows.eval.prefetch`; `eval.prefetch: false` turns it off). Then `champion`
  moves to the new `medplib` version only if its score (`champion_score`) beats the current champion's.

A failing step marks its MLflow run and the parent run FAILED (error tag + error.txt) and re-raises; earlier
steps stay done and registered, so the next run starts at the failed step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medplib.data.prepared import MANIFEST_NAME, read_manifest
from medplib.model.export import is_model_dir
from workflows.common import cluster_gpus, decide_gpu, init_ray, write_json_atomic
from workflows.data.prepared import RowInfo, read_rows, row_index
from workflows.eval.config import EvalConfig
from workflows.eval.prefetch import Prefetch, start_prefetch, stop_prefetch
from workflows.tracking import FINGERPRINT_TAG, PIPELINE_TAG, STAGE_TAG, Tracker, latest_alias
from workflows.train.config import (
    REGISTERED_MODEL,
    PipelineConfig,
    StageConfig,
    StageName,
    fingerprint,
    flatten,
)

if TYPE_CHECKING:
    from workflows.eval.evaluate import EvalResult

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
COMPARE_LABELS = ("before training", "after training")


@dataclass
class StageOutcome:
    stage: str
    status: str  # "trained" | "skipped"
    fingerprint: str
    stage_dir: Path
    run_id: str
    version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class PipelineResult:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    champion: bool = False
    pipeline: str = ""
    eval_split: str = ""
    eval_dir: Path | None = None  # the trained model's eval folder (report.html, comparison.html)
    before_dir: Path | None = None  # the untrained model's eval folder
    data_input: str | None = None


@dataclass
class _Context:
    cfg: PipelineConfig
    tracker: Tracker
    experiment_id: str
    parent_id: str
    prepared: Path
    data_fp: str
    fps: dict[str, str]
    use_gpu: bool
    rows: list[RowInfo] = field(default_factory=list)  # the train split, for stage planning


# ---------------------------------------------------------------------------------------------- helpers


def prepare_data(cfg: PipelineConfig) -> tuple[Path, str]:
    """The prepared folder and its fingerprint (running `medplib data prepare` when `data.input` is given)."""
    if cfg.data.prepared:
        folder = Path(cfg.data.prepared).resolve()
        log.info("== data: using the prepared folder %s (data.prepared)", folder)
    else:
        from workflows.data.preprocess import PrepareConfig, prepare

        prep = PrepareConfig.model_validate({**cfg.data.prepare, "model_preset": cfg.preset})
        result = prepare(Path(cfg.data.input), cfg.workdir_path / "data" / "prepared", prep)
        folder = Path(result.output).resolve()
        log.info("== data: %s %s", "reused (same input and config)" if result.reused else "prepared", folder)
    manifest = read_manifest(folder)
    preset = manifest.get("model_preset")
    if preset is not None and preset != cfg.preset:
        raise ValueError(
            f"{folder / MANIFEST_NAME}: prepared for model preset {preset!r}, the pipeline's preset is "
            f"{cfg.preset!r}; its image views and token ids would not fit the model"
        )
    data_fp = fingerprint(
        manifest.get("input_hash"),
        manifest.get("config_hash"),
        manifest.get("schema_version"),
        cfg.data.train_split,
    )
    return folder, data_fp


def stage_fingerprints(cfg: PipelineConfig, data_fp: str, rows: list[RowInfo]) -> dict[str, str]:
    """Each stage's fingerprint: its config, the model preset, the data, its input stages' fingerprints, the
    number of workers and the steps it will actually run (so raising max_steps past a stage's own length does
    not redo it)."""
    from medplib.model.config import load_model_config
    from workflows.train.stage import plan_steps

    model_fp = fingerprint(load_model_config(cfg.preset))
    fps: dict[str, str] = {}
    for name in cfg.stage_order:
        steps = plan_steps(cfg.stages[name], rows, cfg.num_workers, cfg.max_steps)["total_steps"]
        fps[name] = fingerprint(
            name,
            cfg.stages[name],
            model_fp,
            data_fp,
            [fps[s] for s in cfg.stage_inputs(name)],
            cfg.num_workers,
            steps,
        )
    # `prefetch` only moves when the evaluation's images are encoded, not what it scores.
    scored = cfg.eval.model_dump(mode="json", exclude={"prefetch"})
    fps["eval"] = fingerprint("eval", fps["moe"], scored, cfg.data.eval_split, data_fp)
    # The untrained side: what the first stage starts from (the preset, torch seeded with its seed), same rows.
    first = cfg.stages[cfg.stage_order[0]]
    fps["before"] = fingerprint(
        "before",
        model_fp,
        first.preset,
        first.seed,
        scored,
        cfg.data.eval_split,
        data_fp,
    )
    return fps


def embedding_cache_dir(cfg: PipelineConfig) -> Path:
    """The frozen image encoder's outputs, shared by every stage and eval of this workdir (keyed inside by the
    encoder's fingerprint, so a different encoder never reads them)."""
    return cfg.workdir_path / "embeddings"


def _eval_dir(cfg: PipelineConfig, fps: dict[str, str]) -> Path:
    """The trained model's evaluation folder."""
    return cfg.workdir_path / "eval" / fps["eval"][:12]


def _stage_dir(ctx: _Context, name: str) -> Path:
    return ctx.cfg.workdir_path / "stages" / f"{name}-{ctx.fps[name][:12]}"


def _done(ctx: _Context, name: str) -> dict | None:
    """done.json of the stage if it matches the fingerprint and its model version is still registered."""
    path = _stage_dir(ctx, name) / DONE_FILE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("fingerprint") != ctx.fps[name]:
        return None
    version = ctx.tracker.version_for(REGISTERED_MODEL[name], ctx.fps[name])
    if version is None:
        return None
    return {**done, "version": str(version.version)}


# ---------------------------------------------------------------------------------------------- one stage


def preset_start(stage: StageConfig):
    """The first stage's starting model: its preset with `torch` seeded by the stage's seed (the same random-init
    heads on every rerun), without MoE layers (`config.dense`: the moe stage builds its experts from the dense
    stages' FFNs, and a preset may enable MoE, as `7b` does)."""
    import torch

    from medplib.model.config import dense, load_model_config
    from medplib.model.medplib import MedPLIB

    torch.manual_seed(stage.seed)
    return MedPLIB(dense(load_model_config(stage.preset)))


def _init_model(ctx: _Context, name: StageName, stage_dir: Path) -> Path:
    """The stage's starting model in `stage_dir/init_model` (built once; inputs come through the registry)."""
    from workflows.train.stage import build_moe_init, save_model_atomic

    cfg, stage = ctx.cfg, ctx.cfg.stages[name]
    init = stage_dir / "init_model"
    if is_model_dir(init):
        return init
    alias = latest_alias(cfg.name)
    if not cfg.stage_inputs(name):  # the first stage: the preset
        model = preset_start(stage)
        if model.projector_source is None:
            log.warning(
                "== stage %s STARTS FROM A RANDOM PROJECTOR: the LLM sees nothing of the image until %s. Give the "
                "preset `projector_weights` (LLaVA's trained mm_projector), base weights that hold one, or add "
                "the `align` stage (upstream stage I) to the pipeline.",
                name,
                "this stage trains mm_projector"
                if "mm_projector" in stage.sft_modules
                else "a stage trains it",
            )
        return save_model_atomic(model, init)
    inputs = stage_dir / "inputs"
    downloaded = {}
    for source in cfg.stage_inputs(name):
        # Registry touch point: the input is whatever `latest-<pipeline>` points to, checked by fingerprint.
        downloaded[source] = ctx.tracker.download_by_alias(
            REGISTERED_MODEL[source], alias, inputs / source, ctx.fps[source]
        )
    if name in ("vl", "grounding"):  # from the previous stage's model as it is
        os.replace(downloaded[cfg.stage_inputs(name)[0]], init)
    else:
        save_model_atomic(build_moe_init(downloaded["vl"], downloaded["grounding"], stage), init)
    shutil.rmtree(inputs, ignore_errors=True)
    return init


def _write_card(
    ctx: _Context, name: StageName, run_id: str, export: Path, eval_metrics: dict | None = None
) -> Path:
    """The export's model card (README.md, `workflows/model_card.py`) from this run."""
    from medplib.model.config import load_model_config
    from workflows.model_card import model_card

    cfg = ctx.cfg
    card = model_card(
        model_name=REGISTERED_MODEL[name],
        stage=name,
        preset=load_model_config(cfg.stages[name].preset),
        stage_configs={
            s: cfg.stages[s].model_dump(mode="json")
            for s in cfg.stage_order[: cfg.stage_order.index(name) + 1]
        },
        manifest=read_manifest(ctx.prepared),
        data_fingerprint=ctx.data_fp,
        pipeline=cfg.name,
        run_id=run_id,
        eval_metrics=eval_metrics,
    )
    (export / "README.md").write_text(card)
    return export / "README.md"


def _log_model(ctx: _Context, name: StageName, run_id: str, export: Path) -> None:
    """The export with its card as an MLflow pyfunc model (`workflows/mlflow_model.py`, input example from the
    eval split), logged as the run's `model` artifacts; the prepared data as the run's input."""
    from medplib.model.config import load_model_config
    from workflows.mlflow_model import example_from_rows, save_pyfunc_model

    _write_card(ctx, name, run_id, export)
    folder = export.parent / "mlflow_model"
    shutil.rmtree(folder, ignore_errors=True)
    rows = read_rows(ctx.prepared, ctx.cfg.data.eval_split, None, 8)
    vision = load_model_config(ctx.cfg.stages[name].preset).vision
    save_pyfunc_model(export, folder, example_from_rows(rows, vision))
    ctx.tracker.log_artifacts(run_id, folder, "model")
    ctx.tracker.log_dataset(run_id, ctx.prepared, "training")


def _train_stage(ctx: _Context, name: StageName) -> StageOutcome:
    from workflows.train.samples import loss_curves_png, sample_predictions
    from workflows.train.stage import (
        LOSS_TERMS,
        StagePlan,
        export_stage_model,
        fail_hook_steps,
        fit_stage,
        plan_steps,
        resolve_precision,
        select_rows,
    )

    cfg, tracker = ctx.cfg, ctx.tracker
    stage, fp = cfg.stages[name], ctx.fps[name]
    stage_dir = _stage_dir(ctx, name)
    model_name = REGISTERED_MODEL[name]
    started = time.perf_counter()
    log.info("== stage %s: starting (fingerprint %s, %s)", name, fp[:12], stage_dir)
    params = {
        **flatten(stage),
        "fingerprint": fp,
        "data_fingerprint": ctx.data_fp,
        "num_workers": str(cfg.num_workers),
        "max_steps": str(cfg.max_steps),
        **{f"input.{s}": ctx.fps[s] for s in cfg.stage_inputs(name)},
    }
    run_id = tracker.stage_run(ctx.experiment_id, ctx.parent_id, cfg.name, name, stage_dir, fp, params)
    phases: dict[str, float] = {}  # seconds per phase, logged with the stage's end (where start-up goes)
    mark = time.perf_counter()

    def phase(label: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[label] = phases.get(label, 0.0) + now - mark
        mark = now

    try:
        export = stage_dir / "export"
        metrics: dict[str, Any] = {}
        if not is_model_dir(export):
            init = _init_model(ctx, name, stage_dir)
            arithmetic = plan_steps(stage, ctx.rows, cfg.num_workers, cfg.max_steps)
            train_ds = select_rows(
                stage,
                ctx.prepared,
                cfg.data.train_split,
                ctx.rows,
                cfg.num_workers,
                arithmetic["total_steps"],
            )
            plan = StagePlan(
                stage=stage,
                fingerprint=fp,
                init_dir=str(init),
                stage_dir=str(stage_dir),
                world_size=cfg.num_workers,
                use_gpu=ctx.use_gpu,
                precision=resolve_precision(stage, ctx.use_gpu),
                tracking_uri=tracker.uri,
                mlflow_run_id=run_id,
                embedding_cache=str(embedding_cache_dir(cfg)),
                torch_threads=cfg.threads_per_worker,
                fail_after_steps=fail_hook_steps(name),
                **arithmetic,
            )
            phase("plan")
            log.info(
                "== stage %s: %d rows%s, %d steps (%d per epoch x %d epochs, max_steps %s), global batch %d",
                name,
                plan.rows,
                f" of at most {stage.image_pool} images (image_pool)" if stage.image_pool else "",
                plan.total_steps,
                plan.steps_per_epoch,
                stage.epochs,
                cfg.max_steps,
                stage.global_batch(cfg.num_workers),
            )
            run = fit_stage(
                plan,
                train_ds,
                name=stage_dir.name,
                storage_path=str(stage_dir.parent),
                cpus_per_worker=cfg.cpus_per_worker,
                max_failures=cfg.max_failures,
            )
            metrics = run.metrics
            phase("train")
            export_stage_model(plan, run.checkpoint_dir, export)
            phase("export")
            curves = stage_dir / "plots" / "loss_curves.png"
            if loss_curves_png(tracker.client, run_id, curves, LOSS_TERMS):
                tracker.log_file(run_id, curves, "plots")
            tracker.set_tags(
                run_id, {"checkpoint": str(run.checkpoint_dir), "final_step": str(metrics.get("step"))}
            )
        # Artifacts: the config, the exported model, sample predictions.
        tracker.client.log_text(
            run_id, yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=False), "config/stage.yaml"
        )
        version = tracker.version_for(model_name, fp)
        if (
            version is None or version.run_id != run_id
        ):  # not yet registered by this run (--from-stage reruns)
            _log_model(ctx, name, run_id, export)
            version = tracker.register(
                model_name, run_id, "model", {STAGE_TAG: name, FINGERPRINT_TAG: fp, PIPELINE_TAG: cfg.name}
            )
        tracker.set_alias(model_name, latest_alias(cfg.name), version.version)
        phase("mlflow")
        if cfg.eval.sample_predictions:
            from workflows.eval.evaluate import type_budgets

            rows = read_rows(ctx.prepared, cfg.data.eval_split, set(stage.tasks), cfg.eval.sample_predictions)
            samples = stage_dir / "samples"
            shutil.rmtree(samples, ignore_errors=True)
            if sample_predictions(
                export,
                rows,
                samples,
                cfg.eval.max_new_tokens,
                max_new_tokens_by=cfg.eval.max_new_tokens_by,
                max_new_tokens_by_type=type_budgets(ctx.prepared, cfg.data.train_split)
                if cfg.eval.type_budgets
                else None,
                embedding_cache=embedding_cache_dir(cfg),
            ):
                tracker.log_artifacts(run_id, samples, "samples")
            phase("samples")
        write_json_atomic(
            stage_dir / DONE_FILE,
            {
                "fingerprint": fp,
                "run_id": run_id,
                "version": str(version.version),
                "model": model_name,
                "finished": time.time(),
            },
        )
        tracker.finish(run_id)
    except BaseException as err:
        log.error(
            "== stage %s: FAILED (%s: %s); MLflow run %s marked FAILED", name, type(err).__name__, err, run_id
        )
        tracker.fail(run_id, err)
        raise
    seconds = time.perf_counter() - started
    log.info(
        "== stage %s: done in %.0f s (%s), registered models:/%s/%s (@%s)",
        name,
        seconds,
        ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
        model_name,
        version.version,
        latest_alias(cfg.name),
    )
    return StageOutcome(name, "trained", fp, stage_dir, run_id, str(version.version), metrics, seconds)


def _stage_step(ctx: _Context, name: StageName) -> StageOutcome:
    done = _done(ctx, name)
    if done is not None:
        model_name = REGISTERED_MODEL[name]
        ctx.tracker.set_alias(model_name, latest_alias(ctx.cfg.name), done["version"])
        ctx.tracker.set_tags(ctx.parent_id, {f"stage.{name}.run_id": done["run_id"]})
        log.info(
            "== stage %s: skipped, done for fingerprint %s (MLflow run %s, models:/%s/%s)",
            name,
            ctx.fps[name][:12],
            done["run_id"],
            model_name,
            done["version"],
        )
        return StageOutcome(
            name, "skipped", ctx.fps[name], _stage_dir(ctx, name), done["run_id"], done["version"]
        )
    outcome = _train_stage(ctx, name)
    ctx.tracker.set_tags(ctx.parent_id, {f"stage.{name}.run_id": outcome.run_id})
    return outcome


# ---------------------------------------------------------------------------------------------- eval + register


def champion_score(split_metrics: dict[str, Any]) -> float:
    """The number `champion` compares: the mean of the available grounding mDice (of the generated answers: what
    serving returns), closed-question accuracy and open-question token F1 (each in [0, 1]) of one split's
    `workflows.eval.evaluate` metrics."""
    import math

    seg, vqa = split_metrics.get("grounding") or {}, split_metrics.get("vqa") or {}
    parts = [seg.get("mDice"), vqa.get("closed_accuracy"), vqa.get("open_f1")]
    parts = [float(p) for p in parts if isinstance(p, int | float) and not math.isnan(p)]
    return sum(parts) / len(parts) if parts else float("nan")


def eval_splits(ctx: _Context) -> list[str]:
    """`data.eval_split` (it picks the champion) then `eval.splits` (reported), those the prepared data has."""
    from medplib.data.prepared import read_manifest

    known = read_manifest(ctx.prepared).get("splits", {})
    wanted = list(dict.fromkeys([ctx.cfg.data.eval_split, *ctx.cfg.eval.splits]))
    missing = [s for s in wanted if s not in known]
    if missing:
        log.warning(
            "eval: the prepared data has no split %s; scoring %s", missing, [s for s in wanted if s in known]
        )
    return [s for s in wanted if s in known]


def _eval_fields(ctx: _Context) -> dict[str, Any]:
    """What the before and the after evaluation share, so they score the same rows the same way."""
    cfg = ctx.cfg
    return dict(
        data=ctx.prepared,
        splits=eval_splits(ctx),
        sample=cfg.eval.sample,
        per_kind=cfg.eval.per_kind,
        split_per_kind=cfg.eval.split_per_kind,
        max_rows=cfg.eval.max_samples if cfg.eval.sample == "first" else None,
        max_new_tokens=cfg.eval.max_new_tokens,
        max_new_tokens_by=cfg.eval.max_new_tokens_by,
        budget_split=cfg.data.train_split if cfg.eval.type_budgets else None,
        batch_size=cfg.eval.batch_size,
        baseline_split=cfg.data.train_split,
        embedding_cache=embedding_cache_dir(cfg),
        tracking_uri=ctx.tracker.uri,
    )


def _start_prefetch(ctx: _Context) -> Prefetch | None:
    """`workflows.eval.prefetch`: the evaluation's images encoded on an idle core while the stages train (CPU-only
    clusters; on GPUs the eval actors encode on their GPU, into another cache)."""
    if not ctx.cfg.eval.prefetch or ctx.use_gpu:
        return None
    if (_eval_dir(ctx.cfg, ctx.fps) / "pipeline_metrics.json").is_file():
        return None  # evaluated before: nothing will be encoded
    first = ctx.cfg.stage_order[0]
    init = _init_model(ctx, first, _stage_dir(ctx, first))  # the untrained start, built now or by its stage
    return start_prefetch(EvalConfig(model=str(init), **_eval_fields(ctx)))


def _before_config(ctx: _Context) -> tuple[Path, EvalConfig | None]:
    """The untrained starting model's evaluation (the first stage's `init_model/`, `preset_start`) on the same
    rows as the trained one: its folder `<workdir>/eval/before-<fp12>/`, and its config, None when it was done
    for the same fingerprint. Its metrics go to the parent run (prefix `eval_before`)."""
    cfg = ctx.cfg
    first = cfg.stage_order[0]
    start = cfg.stages[first]
    out = cfg.workdir_path / "eval" / f"before-{ctx.fps['before'][:12]}"
    if (out / "pipeline_metrics.json").is_file() and (out / "metrics.json").is_file():
        log.info(
            "== eval before training: skipped, scored before for fingerprint %s (%s)",
            ctx.fps["before"][:12],
            out,
        )
        return out, None
    fields = _eval_fields(ctx)
    fields["splits"] = untrained_splits(fields["splits"], cfg.data.eval_split)
    log.info(
        "== eval before training: the untrained %s model (seed %d) on %s",
        start.preset,
        start.seed,
        ", ".join(fields["splits"]),
    )
    return out, EvalConfig(
        # The very model the first stage started from (its `init_model/`, built now if that stage ran elsewhere).
        model=str(_init_model(ctx, first, _stage_dir(ctx, first))),
        out=out,
        mlflow_run_id=ctx.parent_id,
        mlflow_prefix="eval_before",
        mlflow_artifact_path="eval_before",
        model_id=f"{start.preset} (untrained)",
        **fields,
    )


def untrained_splits(splits: list[str], champion_split: str) -> list[str]:
    """The splits the untrained start is scored on: the reported ones. The champion split only ranks trained
    models (the untrained start is never a candidate), and on `small` it was a quarter of a 6-minute evaluation
    of a model that decodes every row to its token budget; it stays when it is the only split."""
    return [s for s in splits if s != champion_split] or splits


def _after_metrics(ctx: _Context, result: EvalResult) -> dict[str, float]:
    """The trained model's headline metrics for the parent run and the champion score."""
    metrics = {
        k.replace("/", "_"): v
        for k, v in result.flat_metrics("eval").items()
        if "/by_" not in k and "/generation/" not in k and "_by_kind/" not in k
    }
    metrics["score"] = champion_score(result.metrics["splits"][ctx.cfg.data.eval_split])
    return metrics


def _log_comparison(ctx: _Context, out: Path) -> None:
    """The trained side's report and the before/after comparison, as artifacts of the parent run."""
    for name in ("report.html", "comparison.html", "comparison.json"):
        if (out / name).is_file():
            ctx.tracker.log_file(ctx.parent_id, out / name, "eval")
    for chart in sorted((out / "plots").glob("comparison_*.png")):
        ctx.tracker.log_file(ctx.parent_id, chart, "eval/plots")


def _evaluate_and_register(ctx: _Context, moe: StageOutcome) -> tuple[Path, dict[str, float], bool]:
    """The untrained start and the trained model scored on one actor pool (`evaluate_all`: its start-up paid
    once), each skipped when done for the same fingerprint; then the trained model's champion promotion.
    Returns the untrained side's folder, the trained side's metrics and whether it became the champion."""
    from workflows.eval.evaluate import evaluate_all

    cfg, tracker = ctx.cfg, ctx.tracker
    before, before_cfg = _before_config(ctx)
    out = _eval_dir(cfg, ctx.fps)
    metrics_file = out / "pipeline_metrics.json"
    after_cfg = None
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        log.info(
            "== eval: skipped, scored before for fingerprint %s (score %.4f)",
            ctx.fps["eval"][:12],
            metrics["score"],
        )
    else:
        log.info("== eval: scoring models:/%s/%s", REGISTERED_MODEL["moe"], moe.version)
        after_cfg = EvalConfig(
            model=str(moe.stage_dir / "export"),
            out=out,
            mlflow_run_id=moe.run_id,
            model_id=f"{REGISTERED_MODEL['moe']}/{moe.version}",
            compare_with=before,
            compare_labels=COMPARE_LABELS,
            **_eval_fields(ctx),
        )
    pending = [c for c in (before_cfg, after_cfg) if c is not None]
    results = evaluate_all(pending) if pending else []
    if before_cfg is not None:
        write_json_atomic(before / "pipeline_metrics.json", {"fingerprint": ctx.fps["before"]})
        log.info("== eval before training: done (%s)", before)
    if after_cfg is not None:
        metrics = _after_metrics(ctx, results[-1])
        tracker.log_metrics(ctx.parent_id, metrics)
        # The final model's card gains the eval table; the predictions become an MLflow table of its run.
        export = moe.stage_dir / "export"
        _write_card(ctx, "moe", moe.run_id, export, json.loads((out / "metrics.json").read_text()))
        tracker.log_file(moe.run_id, export / "README.md", "model/artifacts/export")
        tracker.log_table(moe.run_id, out / "predictions.jsonl", "eval/predictions.json")
        _log_comparison(ctx, out)
        tracker.client.set_model_version_tag(
            REGISTERED_MODEL["moe"], moe.version, "eval_split", cfg.data.eval_split
        )
        write_json_atomic(metrics_file, metrics)
        log.info(
            "== eval: score %.4f (%s)",
            metrics["score"],
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score" and not k.endswith("_n"))[
                :400
            ],
        )
    promoted, previous = tracker.promote_champion(REGISTERED_MODEL["moe"], moe.version, metrics["score"])
    tracker.set_tags(ctx.parent_id, {"champion": "yes" if promoted else "no"})
    if promoted:
        log.info(
            "== register: models:/%s/%s is @%s and @champion (previous champion score %s)",
            REGISTERED_MODEL["moe"],
            moe.version,
            latest_alias(cfg.name),
            previous,
        )
    else:
        log.info(
            "== register: models:/%s/%s is @%s; @champion stays (its score %.4f >= %.4f)",
            REGISTERED_MODEL["moe"],
            moe.version,
            latest_alias(cfg.name),
            previous,
            metrics["score"],
        )
    return before, metrics, promoted


# ---------------------------------------------------------------------------------------------- the pipeline


def _open_tracker(cfg: PipelineConfig) -> tuple[Tracker, str]:
    tracker = Tracker(cfg.resolved_tracking_uri(), cfg.workdir_path)
    return tracker, tracker.experiment_id(cfg.experiment)


def run_pipeline(
    cfg: PipelineConfig, *, from_stage: StageName | None = None, only_stage: StageName | None = None
) -> PipelineResult:
    """Run (or resume, or skip through) the pipeline; see the module docstring."""
    workdir = cfg.workdir_path
    workdir.mkdir(parents=True, exist_ok=True)
    # MLflow opens its store (a new SQLite file: ~3 s of table migrations) while Ray starts its processes:
    # 1.5-2.5 s less than one after the other on 2 cores (2026-11-30).
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-store") as pool:
        opening = pool.submit(_open_tracker, cfg)
        init_ray(cfg.ray_address, ray_train=True)
        tracker, experiment_id = opening.result()
    use_gpu = decide_gpu(cfg.use_gpu, cluster_gpus())
    log.info(
        "== pipeline %s: workdir %s, MLflow %s (experiment %s), %d workers x %s CPU%s",
        cfg.name,
        workdir,
        tracker.uri,
        cfg.experiment,
        cfg.num_workers,
        cfg.cpus_per_worker,
        ", GPUs" if use_gpu else "",
    )
    prepared, data_fp = prepare_data(cfg)
    try:
        rows = row_index(prepared, cfg.data.train_split)
    except ValueError as err:
        raise ValueError(f"data.train_split: {err}") from err
    fps = stage_fingerprints(cfg, data_fp, rows)
    pipeline_fp = fingerprint(cfg.name, fps["eval"])
    params = {
        **flatten(cfg.model_dump(mode="json", exclude={"stages"})),
        **{f"fingerprint.{k}": v for k, v in fps.items()},
        "data_fingerprint": data_fp,
    }
    parent_id = tracker.parent_run(experiment_id, cfg.name, pipeline_fp, params)
    tracker.client.log_text(
        parent_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/pipeline.yaml"
    )
    ctx = _Context(cfg, tracker, experiment_id, parent_id, prepared, data_fp, fps, use_gpu, rows)
    result = PipelineResult(
        parent_id,
        experiment_id,
        tracker.uri,
        pipeline=cfg.name,
        eval_split=cfg.data.eval_split,
        data_input=cfg.data.input,
    )
    try:
        if from_stage is not None:
            # The redone stages and the eval of the model they end in (its folder is keyed by the configs only).
            redo = [
                (name, _stage_dir(ctx, name)) for name in cfg.stage_order[cfg.stage_order.index(from_stage) :]
            ]
            for name, folder in [*redo, ("eval", _eval_dir(cfg, fps))]:
                if folder.exists():
                    aside = folder.with_name(f"{folder.name}.old-{int(time.time())}")
                    log.info("== %s: --from-stage %s: moving %s aside to %s", name, from_stage, folder, aside)
                    os.replace(folder, aside)
        prefetch = _start_prefetch(ctx) if only_stage is None else None
        try:
            for name in cfg.stage_order:
                if only_stage is not None and name != only_stage:
                    continue
                result.stages[name] = _stage_step(ctx, name)
        finally:
            stop_prefetch(prefetch)  # the evaluation encodes what is left, on every core
        if only_stage is None:
            result.before_dir, result.eval, result.champion = _evaluate_and_register(
                ctx, result.stages["moe"]
            )
            result.eval_dir = _eval_dir(cfg, fps)
        tracker.finish(parent_id)
    except BaseException as err:
        tracker.fail(parent_id, err)
        raise
    trained = [s for s, o in result.stages.items() if o.status == "trained"]
    log.info(
        "== pipeline %s: done (trained: %s; skipped: %s); MLflow parent run %s",
        cfg.name,
        ", ".join(trained) or "none",
        ", ".join(s for s in result.stages if s not in trained) or "none",
        parent_id,
    )
    return result


# ---------------------------------------------------------------------------------------------- summary

HEADLINE = (
    ("grounding", ("teacher_forced", "mDice"), "grounding mDice, teacher-forced", ("teacher_forced", "n")),
    ("grounding", ("mDice",), "grounding mDice, generated", ("n",)),
    ("grounding", ("seg_token_rate",), "<SEG> emitted (rate)", ("rows",)),
    ("vqa", ("closed_accuracy",), "closed accuracy", ("n_closed",)),
    ("vqa", ("closed_top_answer_share",), "closed: top answer's share", ("n_closed",)),
    ("vqa", ("open_f1",), "open F1", ("n_open",)),
)


@dataclass
class ComparedMetric:
    """One line of the before/after table: a metric of a split on both sides, its n, and a baseline if any."""

    split: str
    label: str
    before: float | None
    after: float | None
    n: int | None = None
    baseline: float | None = None


def _dig(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def before_after_rows(before_dir: Path | None, after_dir: Path | None) -> list[ComparedMetric]:
    """The headline metrics per split from the two eval folders' metrics.json (None where a side lacks them),
    then the teacher-forced Dice per grounding kind."""

    def load(folder: Path | None) -> dict[str, Any]:
        path = None if folder is None else folder / "metrics.json"
        return json.loads(path.read_text())["splits"] if path is not None and path.is_file() else {}

    before, after = load(before_dir), load(after_dir)
    rows = []
    for split in list(after) + [s for s in before if s not in after]:
        sides = [side.get(split) or {} for side in (before, after)]
        for section, key, label, n_key in HEADLINE:
            values = [_dig(side, (section, *key)) for side in sides]
            if all(v is None for v in values):
                continue
            n = _dig(sides[1], (section, *n_key)) or _dig(sides[0], (section, *n_key))
            base = (
                _dig(sides[1], ("vqa", "baseline_closed_accuracy")) if key == ("closed_accuracy",) else None
            )
            rows.append(ComparedMetric(split, label, *values, n, base))
        kinds = sorted(
            set(_dig(sides[0], ("grounding", "by_kind")) or {})
            | set(_dig(sides[1], ("grounding", "by_kind")) or {})
        )
        for kind in kinds:
            values = [_dig(side, ("grounding", "by_kind", kind, "teacher_forced_mDice")) for side in sides]
            if any(v is not None for v in values):
                n = _dig(sides[1], ("grounding", "by_kind", kind, "rows"))
                rows.append(ComparedMetric(split, f"  {kind} (tf mDice)", *values, n))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_text(result: PipelineResult) -> str:
    """What `medplib pipeline run` prints at the end: runs, model, before/after metrics, report, how to look."""
    uri = result.tracking_uri
    lines = [
        f"== MedPLIB pipeline {result.pipeline}: done",
        f"MLflow ({uri}):",
        f"  pipeline   run {result.parent_run_id}",
    ]
    for name, outcome in result.stages.items():
        lines.append(
            f"  {name:<10} run {outcome.run_id}  {outcome.status:<7}  models:/{REGISTERED_MODEL[name]}/{outcome.version}"
            f"  {outcome.stage_dir}"
        )
    moe = result.stages.get("moe")
    if moe is None:
        return "\n".join(lines)
    export = moe.stage_dir / "export"
    alias = "champion" if result.champion else f"latest-{result.pipeline}"
    lines.append(
        f"Model: models:/medplib/{moe.version} (@latest-{result.pipeline}"
        f"{', @champion' if result.champion else ''}); files: {export}"
    )
    rows = before_after_rows(result.before_dir, result.eval_dir)
    if rows:
        lines.append(
            "Held-out evaluation, untrained start vs trained, the same rows on both sides "
            f"({result.eval_split} picks the champion; n = rows or masks scored; baseline = the train split's "
            "majority answer per question type, without the image):"
        )
        lines.append(
            f"  {'split':<13} {'metric':<34} {'n':>4} {'before':>7} {'after':>7} {'change':>7} {'baseline':>8}"
        )
        for r in rows:
            change = "-" if r.before is None or r.after is None else f"{r.after - r.before:+.3f}"
            n = "-" if r.n is None else str(r.n)
            lines.append(
                f"  {r.split:<13} {r.label:<34} {n:>4} {_fmt(r.before):>7} {_fmt(r.after):>7} {change:>7} "
                f"{_fmt(r.baseline) if r.baseline is not None else '':>8}"
            )
    elif result.eval:
        lines.append("Eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items()))
    if "score" in result.eval:
        lines.append(
            f"  champion score {result.eval['score']:.4f}"
            + (" (new champion)" if result.champion else " (champion unchanged)")
        )
    if result.eval_dir is not None:
        report = result.eval_dir / "report.html"
        comparison = result.eval_dir / "comparison.html"
        lines.append(
            f"Report: {report}" + (f"  (before vs after: {comparison})" if comparison.is_file() else "")
        )
    if result.before_dir is not None:
        lines.append(f"        untrained model's report: {result.before_dir / 'report.html'}")
    lines.append(f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    lines.append(f"Serve:  MLFLOW_TRACKING_URI={uri} medplib serve run --model models:/medplib@{alias}")
    lines.append(f"        or: medplib serve run --model {export}")
    image = "IMAGE.png"
    predictions = None if result.eval_dir is None else result.eval_dir / "predictions.jsonl"
    if result.data_input and predictions is not None and predictions.is_file():
        with predictions.open() as f:
            first = json.loads(f.readline() or "{}")
        candidate = Path(result.data_input) / str(first.get("image_path") or "")
        if first.get("image_path") and candidate.is_file():
            image = str(candidate)
    lines.append(
        f"Query:  medplib predict --endpoint http://127.0.0.1:8000 --image {image} "
        "--question 'What imaging modality was used to acquire this image?'"
    )
    return "\n".join(lines)
