"""`medplib pipeline run` (all steps), `medplib train` (one stage) and `medplib sweep` (Ray Tune over a stage)."""

from __future__ import annotations

import argparse

from medplib.model.config import find_config
from workflows.train.config import STAGES


def add_pipeline(commands: argparse._SubParsersAction, verb: str) -> None:
    pipeline = commands.add_parser(
        verb, help="run the training pipeline (prepare -> vl -> grounding -> moe -> eval -> register)"
    )
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="PIPELINE_COMMAND")
    run = sub.add_parser(
        "run",
        help="run every step; steps already done for the same inputs and config are skipped",
        description="data prepare -> vl -> grounding -> moe -> eval -> register, each stage a Ray Train run "
        "tracked in MLflow (parent run + one child run per stage). A step whose output exists for the same inputs "
        "and config is skipped; an interrupted stage resumes from its last checkpoint.",
    )
    run.add_argument(
        "--config", required=True, type=find_config, help="pipeline YAML, e.g. configs/pipeline/small.yaml"
    )
    run.add_argument("--workdir", help="override the config's workdir")
    run.add_argument(
        "--input",
        help="override the config's data.input: a MeCoVQA-format file or folder to prepare "
        "(e.g. the output of `medplib data build-mini`)",
    )
    run.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db, or MLFLOW_TRACKING_URI)",
    )
    run.add_argument(
        "--from-stage",
        choices=STAGES,
        help="redo this stage and the later ones even if done "
        "(their old outputs are moved aside); earlier stages must be done",
    )
    run.add_argument("--max-steps", type=int, help="override max_steps (optimiser steps per stage)")
    run.set_defaults(handler=_pipeline_run)


def add_train(commands: argparse._SubParsersAction, verb: str) -> None:
    train = commands.add_parser(
        verb,
        help="run one training stage of a pipeline config",
        description="Run one stage (a Ray Train TorchTrainer run). Its input models come from the registry "
        "aliases of the earlier stages (models:/medplib-vl@latest-<pipeline>), so run those first.",
    )
    train.add_argument("--stage", required=True, choices=STAGES)
    train.add_argument(
        "--config", required=True, type=find_config, help="pipeline YAML (its stages.<stage> entry is used)"
    )
    train.add_argument("--workdir", help="override the config's workdir")
    train.add_argument("--input", help="override the config's data.input (MeCoVQA rows to prepare)")
    train.add_argument("--tracking-uri", help="MLflow tracking URI")
    train.add_argument("--max-steps", type=int, help="override max_steps")
    train.set_defaults(handler=_train)


def add_sweep(commands: argparse._SubParsersAction, verb: str) -> None:
    sweep = commands.add_parser(
        verb,
        help="Ray Tune sweep over one stage (ASHA; each trial a Ray Train run and an MLflow child run)",
        description="Sweep a stage's config fields (search space in YAML, e.g. configs/sweeps/tiny-vl.yaml); "
        "the best trial's full stage config is written to <workdir>/sweeps/<name>-<fp>/best_<stage>.yaml.",
    )
    sweep.add_argument("--config", required=True, type=find_config, help="sweep YAML")
    sweep.add_argument("--stage", choices=STAGES, help="must match the sweep file's stage (optional)")
    sweep.add_argument("--workdir", help="override the pipeline's workdir")
    sweep.set_defaults(handler=_sweep)


def _load(args: argparse.Namespace):
    from workflows.train.config import load_pipeline_config

    return load_pipeline_config(
        args.config,
        data_input=args.input,
        workdir=args.workdir,
        tracking_uri=args.tracking_uri,
        max_steps=args.max_steps,
    )


def _pipeline_run(args: argparse.Namespace) -> int:
    from workflows.pipeline import run_pipeline, summary_text

    print("\n" + summary_text(run_pipeline(_load(args), from_stage=args.from_stage)), flush=True)
    return 0


def _train(args: argparse.Namespace) -> int:
    from workflows.pipeline import run_pipeline, summary_text

    print("\n" + summary_text(run_pipeline(_load(args), only_stage=args.stage)), flush=True)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from workflows.tune.sweep import load_sweep_config, run_sweep

    cfg = load_sweep_config(args.config)
    if args.stage and args.stage != cfg.stage:
        raise ValueError(f"{args.config} sweeps stage {cfg.stage!r}, not {args.stage!r}")
    run_sweep(cfg, workdir=args.workdir)
    return 0
