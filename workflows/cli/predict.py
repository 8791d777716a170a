"""`medplib predict`: ask about one image, here (--model) or of a server (--endpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _floats(text: str, n: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{flag} takes {n} comma-separated numbers, got {text!r}")
    return values


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
    p.add_argument(
        "--image", required=True, help="PNG/JPEG, DICOM (.dcm) or NIfTI (.nii/.nii.gz: middle slice)"
    )
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
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--out", default="result.json", help="where to write the answer JSON (masks go beside it)")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from workflows.predict import predict, write_prediction

    out = Path(args.out)
    pred = predict(
        args.image,
        args.question,
        model=args.model,
        endpoint=args.endpoint,
        points=[_floats(v, 2, "--point") for v in args.point],
        boxes=[_floats(v, 4, "--box") for v in args.box],
        masks=args.mask,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        segment=args.segment,
    )
    mask_files = [str(f) for f in write_prediction(pred, out)]
    print(f"answer: {pred.text!r}")
    print(
        f"wrote {out}"
        + (f" and {len(mask_files)} mask PNG(s): {', '.join(mask_files)}" if mask_files else "")
    )
    return 0
