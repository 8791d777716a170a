"""`medplib predict`: ask about one image, here (--model) or of a server (--endpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medplib_client.cli import add_request_arguments, report, request_from_args


def add_predict(commands: argparse._SubParsersAction, verb: str) -> None:
    p = commands.add_parser(
        verb,
        help="answer a question about an image, with an optional region prompt, and save the masks",
        description="Run the model on one image. The answer and the masks (one PNG per <SEG>, next to --out) "
        "are written to --out. --model takes a model directory, an MLflow model URI (models:/medplib@champion, "
        "runs:/ID/model) or a preset name (tiny builds at random init). With --endpoint URL the question goes to a "
        "running `medplib serve` server instead (API key from $MEDPLIB_API_KEY).",
    )
    p.add_argument("--model", help="model directory, MLflow model URI, or preset name")
    p.add_argument(
        "--endpoint", metavar="URL", help="a MedPLIB server (http://127.0.0.1:8000) instead of --model"
    )
    add_request_arguments(p)  # the flags `medplib-client predict` takes too
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from workflows.predict import predict

    report(predict(model=args.model, endpoint=args.endpoint, **request_from_args(args)), Path(args.out))
    return 0
