"""`medplib pipeline run` (all steps) and `medplib train` (one stage); see workflows/pipeline.py."""

from __future__ import annotations

import argparse
import logging

from workflows.train_config import STAGES

log = logging.getLogger("medplib")


def register(commands: argparse._SubParsersAction) -> None:
    pipeline = commands.add_parser("pipeline", help="run the training pipeline (prepare -> vl -> grounding -> moe "
                                   "-> eval -> register)")
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="PIPELINE_COMMAND")
    run = sub.add_parser(
        "run", help="run every step; steps already done for the same inputs and config are skipped",
        description="data prepare -> vl -> grounding -> moe -> eval -> register, each stage a Ray Train run "
        "tracked in MLflow (parent run + one child run per stage). A step whose output exists for the same inputs "
        "and config is skipped; an interrupted stage resumes from its last checkpoint.",
    )
    run.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline/small.yaml")
    run.add_argument("--workdir", help="override the config's workdir")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db, or "
                     "MLFLOW_TRACKING_URI)")
    run.add_argument("--from-stage", choices=STAGES, help="redo this stage and the later ones even if done "
                     "(their old outputs are moved aside); earlier stages must be done")
    run.add_argument("--max-steps", type=int, help="override max_steps (optimiser steps per stage)")
    run.set_defaults(handler=_pipeline_run)

    train = commands.add_parser(
        "train", help="run one training stage of a pipeline config",
        description="Run one stage (a Ray Train TorchTrainer run). Its input models come from the registry "
        "aliases of the earlier stages (models:/medplib-vl@latest-<pipeline>), so run those first.",
    )
    train.add_argument("--stage", required=True, choices=STAGES)
    train.add_argument("--config", required=True, help="pipeline YAML (its stages.<stage> entry is used)")
    train.add_argument("--workdir", help="override the config's workdir")
    train.add_argument("--tracking-uri", help="MLflow tracking URI")
    train.add_argument("--max-steps", type=int, help="override max_steps")
    train.set_defaults(handler=_train)

    sweep = commands.add_parser(
        "sweep", help="Ray Tune sweep over one stage (ASHA; each trial a Ray Train run and an MLflow child run)",
        description="Sweep a stage's config fields (search space in YAML, e.g. configs/sweeps/tiny-vl.yaml); "
        "the best trial's full stage config is written to <workdir>/sweeps/<name>-<fp>/best_<stage>.yaml.",
    )
    sweep.add_argument("--config", required=True, help="sweep YAML")
    sweep.add_argument("--stage", choices=STAGES, help="must match the sweep file's stage (optional)")
    sweep.add_argument("--workdir", help="override the pipeline's workdir")
    sweep.set_defaults(handler=_sweep)


def _load(args: argparse.Namespace):
    from workflows.train_config import load_pipeline_config

    return load_pipeline_config(args.config, workdir=args.workdir, tracking_uri=args.tracking_uri,
                                max_steps=args.max_steps)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_text(result) -> str:
    """What `medplib pipeline run` prints at the end: runs, model, before/after metrics, report, how to look."""
    from pathlib import Path

    from workflows.pipeline import before_after_rows

    names = {"vl": "medplib-vl", "grounding": "medplib-grounding", "moe": "medplib"}
    uri = result.tracking_uri
    lines = [f"== MedPLIB pipeline {result.pipeline}: done", f"MLflow ({uri}):",
             f"  pipeline   run {result.parent_run_id}"]
    for name, outcome in result.stages.items():
        lines.append(f"  {name:<10} run {outcome.run_id}  {outcome.status:<7}  models:/{names[name]}/{outcome.version}"
                     f"  {outcome.stage_dir}")
    moe = result.stages.get("moe")
    if moe is None:
        return "\n".join(lines)
    export = moe.stage_dir / "export"
    alias = "champion" if result.champion else f"latest-{result.pipeline}"
    lines.append(f"Model: models:/medplib/{moe.version} (@latest-{result.pipeline}"
                 f"{', @champion' if result.champion else ''}); files: {export}")
    rows = before_after_rows(result.before_dir, result.eval_dir)
    if rows:
        lines.append(f"Eval on split {result.eval_split} (<= {result.eval_rows} rows), untrained start vs trained:")
        lines.append(f"  {'split':<10} {'metric':<17} {'before':>8} {'after':>8} {'change':>8}")
        for split, label, before, after in rows:
            change = "-" if before is None or after is None else f"{after - before:+.4f}"
            lines.append(f"  {split:<10} {label:<17} {_fmt(before):>8} {_fmt(after):>8} {change:>8}")
    elif result.eval:
        lines.append("Eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items()))
    if "score" in result.eval:
        lines.append(f"  champion score {result.eval['score']:.4f}" + (" (new champion)" if result.champion else
                                                                        " (champion unchanged)"))
    if result.eval_dir is not None:
        report = result.eval_dir / "report.html"
        comparison = result.eval_dir / "comparison.html"
        lines.append(f"Report: {report}" + (f"  (before vs after: {comparison})" if comparison.is_file() else ""))
    if result.before_dir is not None:
        lines.append(f"        untrained model's report: {result.before_dir / 'report.html'}")
    lines.append(f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    lines.append(f"Serve:  MLFLOW_TRACKING_URI={uri} medplib serve run --model models:/medplib@{alias}")
    lines.append(f"        or: medplib serve run --model {export}")
    image = "IMAGE.png"
    predictions = None if result.eval_dir is None else result.eval_dir / "predictions.jsonl"
    if result.data_input and predictions is not None and predictions.is_file():
        import json

        with predictions.open() as f:
            first = json.loads(f.readline() or "{}")
        candidate = Path(result.data_input) / str(first.get("image_path") or "")
        if first.get("image_path") and candidate.is_file():
            image = str(candidate)
    lines.append(f"Query:  medplib predict --endpoint http://127.0.0.1:8000 --image {image} "
                 "--question 'What imaging modality was used to acquire this image?'")
    return "\n".join(lines)


def _summary(result) -> None:
    print("\n" + summary_text(result), flush=True)


def _pipeline_run(args: argparse.Namespace) -> int:
    from workflows.pipeline import run_pipeline

    _summary(run_pipeline(_load(args), from_stage=args.from_stage))
    return 0


def _train(args: argparse.Namespace) -> int:
    from workflows.pipeline import run_pipeline

    _summary(run_pipeline(_load(args), only_stage=args.stage))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from workflows.sweep import load_sweep_config, run_sweep

    cfg = load_sweep_config(args.config)
    if args.stage and args.stage != cfg.stage:
        raise ValueError(f"{args.config} sweeps stage {cfg.stage!r}, not {args.stage!r}")
    out = run_sweep(cfg, workdir=args.workdir)
    for trial in out["trials"]:
        log.info("trial %s %-8s %s steps %s %s", trial["trial_id"], trial["status"], trial["params"],
                 trial["steps"], trial.get(cfg.metric))
    log.info("best %s %.4f with %s -> %s (MLflow run %s)", cfg.metric, out["best_metric"], out["best_params"],
             out["best_config_path"], out["sweep_run_id"])
    return 0
