"""`medplib model summary`: parameter counts of a preset."""

from __future__ import annotations

import argparse


def add_model(commands: argparse._SubParsersAction, verb: str) -> None:
    model = commands.add_parser(verb, help="inspect model presets")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    s = sub.add_parser("summary", help="parameter counts per component (built on the meta device: no memory)")
    s.add_argument("--preset", required=True, help="preset name or config file")
    s.set_defaults(handler=_summary)


def _summary(args: argparse.Namespace) -> int:
    from medplib.model.summary import parameter_summary

    rows = parameter_summary(args.preset)
    width = max(len(name) for name in rows)
    for name, count in rows.items():
        print(f"{name:<{width}}  {count:>16,}")
    return 0
