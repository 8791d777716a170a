"""The `medplib` command line: a table of verbs, each in its own file here, which parses its arguments and calls
a job. Heavy imports (torch, ray, mlflow) happen inside the handlers, so `medplib --help` stays fast."""

from __future__ import annotations

import argparse
import logging

from medplib import __version__
from workflows.cli import convert, data, infra, model, predict, serve, submit, train
from workflows.cli import eval as eval_verbs  # not `eval`: that name is Python's

# verb -> the function that adds its parser; this order is the order of `medplib --help`.
VERBS = {
    "data": data.add_data,
    "predict": predict.add_predict,
    "model": model.add_model,
    "eval": eval_verbs.add_eval,
    "eval-compare": eval_verbs.add_eval_compare,
    "serve": serve.add_serve,
    "infra": infra.add_infra,
    "convert-upstream": convert.add_convert_upstream,
    "pipeline": train.add_pipeline,
    "train": train.add_train,
    "sweep": train.add_sweep,
    "submit": submit.add_submit,
    "jobs": submit.add_jobs,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medplib",
        description="MedPLIB on Ray: prepare MeCoVQA data, train the three stages, evaluate, and serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"medplib {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, add in VERBS.items():
        add(commands, verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # User mistakes (bad file, bad field, unknown preset) end with one clear line, not a traceback.
        logging.getLogger("medplib").error("%s", err)
        return 2
