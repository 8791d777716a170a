"""`medplib` command line: one sub-command group per module, each registering its own parsers.

Heavy imports (torch, ray, mlflow) happen inside the handlers so `medplib --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflows import convert_cli, data_cli, eval_cli, infra_cli, model_cli, serve_cli, submit_cli, train_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medplib",
        description="MedPLIB on Ray: prepare MeCoVQA data, train the three stages, evaluate, and serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data_cli, model_cli, eval_cli, serve_cli, infra_cli, convert_cli, train_cli, submit_cli):
        module.register(commands)
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


if __name__ == "__main__":
    sys.exit(main())
