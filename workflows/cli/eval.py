"""`medplib eval` (batch evaluation on a Ray Data actor pool) and `medplib eval-compare` (two eval folders side by
side)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_eval(commands: argparse._SubParsersAction, verb: str) -> None:
    from workflows.eval.config import EvalConfig  # pydantic only: no torch or Ray at parse time

    p = commands.add_parser(
        verb,
        help="evaluate a model on prepared splits (Ray Data actor pool): predictions, metrics, HTML report",
        description=(
            "Greedy batch inference over one or more splits of a prepared dataset on a Ray Data actor pool (one "
            "model per actor; one GPU per actor when the cluster has GPUs), then predictions.jsonl (upstream "
            "record format + masks), metrics.json (per split, task, modality) and report.html with charts and "
            "the best/worst grounding cases. Splits named like test_xsubject / *heldout* are reported as "
            "zero-shot. Uses the Ray cluster at RAY_ADDRESS, or starts a local one."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory, MLflow model URI (models:/NAME@ALIAS, "
        "runs:/ID/model) or preset name (tiny: random init)",
    )
    p.add_argument("--data", required=True, help="prepared dataset folder (`medplib data prepare --output`)")
    p.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="SPLIT",
        help="split to evaluate (repeatable; default: test)",
    )
    p.add_argument("--out", default="eval", help="output folder (default: ./eval)")
    p.add_argument("--max-rows", type=_positive, help="at most N rows per split (file order)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="decoding length limit (default 64)")
    p.add_argument(
        "--max-new-tokens-by",
        type=_budgets,
        default={},
        metavar="FAMILY=N,...",
        help="smaller limits per answer family, e.g. grounding=16,closed=16 (families: grounding, closed, open)",
    )
    p.add_argument(
        "--budget-split",
        metavar="SPLIT",
        help="also limit each question type to a quarter more than its longest answer in this split, e.g. train "
        "(what `medplib pipeline run` does)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=EvalConfig.model_fields["batch_size"].default,
        help="rows per generate call (default %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        help="actors, one model each (default: one per GPU, or one per CPU core, at most 8)",
    )
    p.add_argument(
        "--gpus",
        choices=("auto", "yes", "no"),
        default="auto",
        help="one GPU per actor: auto (when the cluster has GPUs), yes (require), no (CPU)",
    )
    p.add_argument(
        "--cpus-per-actor", type=float, default=0.5, help="CPUs per actor without GPUs (default 0.5)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="override the model's dtype")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building the model (default 0)")
    p.add_argument("--model-id", help="label of the model in records and the report (default: --model)")
    p.add_argument(
        "--engine",
        choices=("ray", "local"),
        default="ray",
        help="ray: actor pool (default); local: this process, no Ray (debugging)",
    )
    p.add_argument("--gallery-size", type=int, default=4, help="best and worst grounding cases per split")
    p.add_argument("--mlflow-run-id", help="log the metrics and the report to this MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--compare-with", metavar="EVAL_DIR", help="an earlier eval folder: add a before/after section"
    )
    p.add_argument(
        "--volumes",
        metavar="ROWS.json",
        help="volume-level grounding rows (MeCoVQA-mini: volumes/MeCoVQA-mini_volumes.json): also score 3-D Dice, "
        "HD95 and NSD per structure",
    )
    p.set_defaults(handler=_eval)


def add_eval_compare(commands: argparse._SubParsersAction, verb: str) -> None:
    c = commands.add_parser(
        verb,
        help="metrics of two eval folders side by side (before/after training)",
        description="Write OUT/comparison.html (+ comparison.json, plots/comparison_<split>.png) comparing the "
        "metrics.json of two `medplib eval` output folders, per split both evaluated.",
    )
    c.add_argument("--before", required=True, help="eval folder of the baseline (e.g. the untrained model)")
    c.add_argument("--after", required=True, help="eval folder to compare with it (e.g. the trained model)")
    c.add_argument("--out", required=True, help="folder to write comparison.html into")
    c.add_argument("--labels", default="before,after", help="names of the two sides (default: before,after)")
    c.set_defaults(handler=_compare)


def _budgets(text: str) -> dict[str, int]:
    """`grounding=16,closed=16` -> {"grounding": 16, "closed": 16} (EvalConfig validates the family names)."""
    out = {}
    for item in filter(None, text.split(",")):
        family, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected FAMILY=N, got {item!r}")
        out[family.strip()] = _positive(value)
    return out


def _eval(args: argparse.Namespace) -> int:
    from workflows.eval.config import EvalConfig
    from workflows.eval.evaluate import evaluate, summary_text

    cfg = EvalConfig(
        model=args.model,
        data=Path(args.data),
        splits=args.splits or ["test"],
        out=Path(args.out),
        max_rows=args.max_rows,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_by=args.max_new_tokens_by,
        budget_split=args.budget_split,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        use_gpu=args.gpus,
        cpus_per_actor=args.cpus_per_actor,
        dtype=args.dtype,
        seed=args.seed,
        model_id=args.model_id,
        engine=args.engine,
        gallery_size=args.gallery_size,
        mlflow_run_id=args.mlflow_run_id,
        tracking_uri=args.tracking_uri,
        compare_with=Path(args.compare_with) if args.compare_with else None,
        volumes=Path(args.volumes) if args.volumes else None,
    )
    print(summary_text(evaluate(cfg)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from workflows.eval.report import write_comparison_report

    labels = [part.strip() for part in args.labels.split(",")]
    if len(labels) != 2 or not all(labels):
        raise ValueError(f"--labels takes two comma-separated names, got {args.labels!r}")
    path = write_comparison_report(args.before, args.after, args.out, labels=labels)
    print(f"wrote {path}")
    return 0
