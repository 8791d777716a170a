"""`medplib convert-upstream SRC DST`: import an upstream MedPLIB checkpoint (e.g. the released MedPLIB-7b-2e)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("medplib")


def add_convert_upstream(commands: argparse._SubParsersAction, verb: str) -> None:
    p = commands.add_parser(
        verb,
        help="import a checkpoint in the upstream MedPLIB layout into a MedPLIB model directory",
        description="Read an upstream MedPLIB checkpoint (a Hugging Face directory of .bin/.safetensors shards, "
        "or one file) and write a model directory that `medplib predict --model DST` and training stages load. "
        "Keys are mapped by the table in medplib/model/convert.py; any key that cannot be placed is listed in "
        "the error. Nothing is downloaded.",
    )
    p.add_argument(
        "src", help="upstream checkpoint: directory (HF layout) or a single .bin/.safetensors file"
    )
    p.add_argument("dst", help="output model directory (must not exist or be empty)")
    p.add_argument(
        "--preset", default="7b", help="architecture the tensors must fit (preset name or config file)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, when SRC has none (its token ids index the rows)",
    )
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from medplib.model.convert import convert_upstream

    out = convert_upstream(args.src, args.dst, preset=args.preset, tokenizer=args.tokenizer)
    log.info("wrote %s", out)
    return 0
