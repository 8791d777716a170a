"""`medplib-client predict --endpoint URL ...`: one question to a running server from a client-only install. Its
request flags and its output (the `--out` JSON, one PNG per mask beside it) are those of `medplib predict`, which
builds its parser from `add_request_arguments` here and adds volumes and an overlay PNG."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from medplib_client import __version__
from medplib_client.client import ask_server
from medplib_client.prediction import Prediction


def _floats(text: str, n: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{flag} takes {n} comma-separated numbers, got {text!r}")
    return values


def add_request_arguments(
    p: argparse.ArgumentParser,
    image_help: str = "PNG/JPEG, DICOM (.dcm) or NIfTI (.nii/.nii.gz: the middle slice unless --slice)",
) -> None:
    """The image and its view, the question, region prompts, generation settings and `--out`: what every predict
    command takes."""
    p.add_argument("--image", required=True, help=image_help)
    p.add_argument("--question", required=True, help='the question; mark regions with "<region>" (optional)')
    p.add_argument(
        "--point", action="append", default=[], metavar="X,Y", help="point prompt (pixels; repeatable)"
    )
    p.add_argument(
        "--box", action="append", default=[], metavar="X0,Y0,X1,Y1", help="box prompt (repeatable)"
    )
    p.add_argument(
        "--mask", action="append", default=[], metavar="F.png", help="mask prompt PNG (repeatable)"
    )
    p.add_argument("--segment", action="store_true", help="return a mask even when the answer has no <SEG>")
    p.add_argument(
        "--slice",
        type=int,
        default=None,
        metavar="K",
        help="slice of a volume or frame of a DICOM (default: middle)",
    )
    p.add_argument(
        "--axis",
        default=None,
        help="sagittal, coronal or axial (0/1/2, after reorientation to RAS; default axial)",
    )
    p.add_argument(
        "--window",
        default=None,
        metavar="PRESET|C,W",
        help="intensity window: brain, subdural, bone, lung, soft_tissue, mediastinum, or centre,width",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--out", default="result.json", help="where to write the answer JSON (masks go beside it)")


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of `add_request_arguments` -> keyword arguments of `ask_server` (and of `medplib predict`'s job).
    The view is the API's dict (the server parses axis names and window presets); None when no flag gave it."""
    view = {"slice_index": args.slice, "axis": args.axis, "window": args.window}
    return {
        "image": args.image,
        "question": args.question,
        "points": [_floats(v, 2, "--point") for v in args.point],
        "boxes": [_floats(v, 4, "--box") for v in args.box],
        "masks": args.mask,
        "view": {k: v for k, v in view.items() if v is not None} or None,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "segment": args.segment,
    }


def write_prediction(pred: Prediction, out: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """`out` (answer, masks, timings and `extra` as JSON) and `<out stem>_mask<i>.png` beside it; returns the PNG
    paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_files = pred.save_masks(out.with_suffix(""))
    result: dict[str, Any] = {
        "answer": pred.text,
        "masks": [
            {
                "png": str(f),
                "height": int(m.shape[0]),
                "width": int(m.shape[1]),
                "pixels": int(m.sum()),
                "score": s,
            }
            for f, m, s in zip(mask_files, pred.masks, pred.scores, strict=True)
        ],
        "timings": pred.timings,
        **(extra or {}),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return mask_files


def report(pred: Prediction, out: Path) -> None:
    """Write the prediction to `out` and tell the user what was written (a command's output, hence print)."""
    mask_files = [str(f) for f in write_prediction(pred, out)]
    print(f"answer: {pred.text!r}")
    print(
        f"wrote {out}"
        + (f" and {len(mask_files)} mask PNG(s): {', '.join(mask_files)}" if mask_files else "")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medplib-client",
        description="Ask a running MedPLIB server (`medplib serve run`) about an image. No torch needed; the "
        "API key comes from $MEDPLIB_API_KEY.",
    )
    parser.add_argument("--version", action="version", version=f"medplib-client {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "predict",
        help="answer a question about an image, with an optional region prompt, and save the masks",
        description="Send one image and question to the server. The answer and the masks (one PNG per <SEG>, "
        "next to --out) are written to --out.",
    )
    p.add_argument("--endpoint", required=True, metavar="URL", help="the server (http://127.0.0.1:8000)")
    add_request_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report(ask_server(args.endpoint, **request_from_args(args)), Path(args.out))
    except (ValueError, FileNotFoundError) as err:
        # A refused request or a missing file ends with one clear line, not a traceback (as in `medplib`).
        logging.getLogger("medplib_client").error("%s", err)
        return 2
    return 0
