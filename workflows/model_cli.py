"""`medplib predict` and `medplib model summary`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("medplib")


def _floats(text: str, n: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{flag} takes {n} comma-separated numbers, got {text!r}")
    return values


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="answer a question about an image, with an optional region prompt, and save the masks",
        description="Run the model on one image. The answer and the masks (one PNG per <SEG>, next to --out) "
        "are written to --out. --model takes a model directory, an MLflow model URI (models:/medplib@champion, "
        "runs:/ID/model) or a preset name (tiny builds at random init). With --endpoint URL the question goes to a "
        "running `medplib serve` server instead (API key from $MEDPLIB_API_KEY).",
    )
    p.add_argument("--model", help="model directory, MLflow model URI, or preset name")
    p.add_argument("--endpoint", metavar="URL", help="a MedPLIB server (http://127.0.0.1:8000) instead of --model")
    p.add_argument("--image", required=True, help="PNG/JPEG, DICOM (.dcm) or NIfTI (.nii/.nii.gz: middle slice)")
    p.add_argument("--question", required=True, help='the question; mark regions with "<region>" (optional)')
    p.add_argument("--point", action="append", default=[], metavar="X,Y", help="point prompt (pixels; repeatable)")
    p.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1", help="box prompt (repeatable)")
    p.add_argument("--mask", action="append", default=[], metavar="F.png", help="mask prompt PNG (repeatable)")
    p.add_argument("--segment", action="store_true", help="return a mask even when the answer has no <SEG>")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--out", default="result.json", help="where to write the answer JSON (masks go beside it)")
    p.set_defaults(handler=_predict)

    model = commands.add_parser("model", help="inspect model presets")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    s = sub.add_parser("summary", help="parameter counts per component (built on the meta device: no memory)")
    s.add_argument("--preset", required=True, help="preset name or config file")
    s.set_defaults(handler=_summary)


def _predict(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.endpoint is None):
        raise ValueError("predict needs exactly one of --model (run the model here) or --endpoint (ask a server)")
    points = [_floats(v, 2, "--point") for v in args.point]
    boxes = [_floats(v, 4, "--box") for v in args.box]
    if args.endpoint:
        import httpx

        from serve.client import MedPLIBAPIError, MedPLIBClient

        try:
            with MedPLIBClient(args.endpoint) as client:
                pred = client.predict(
                    args.image, args.question, point=points, box=boxes, mask=list(args.mask),
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, segment=args.segment,
                )  # fmt: skip
        except (MedPLIBAPIError, httpx.HTTPError) as err:
            raise ValueError(f"{args.endpoint}: {err}") from err
    else:
        from medplib.data.schema import Box, MaskRef, Point
        from medplib.inference import Predictor, resolve_model_source

        regions = [Point(x=x, y=y) for x, y in points]
        regions += [Box(x0=a, y0=b, x1=c, y1=d) for a, b, c, d in boxes]
        regions += [MaskRef(path=str(Path(m).resolve())) for m in args.mask]
        predictor = Predictor.from_pretrained(resolve_model_source(args.model))
        pred = predictor.predict(
            args.image, args.question, regions,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, segment=args.segment,
        )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_files = [str(f) for f in pred.save_masks(out.with_suffix(""))]
    result = {
        "answer": pred.text,
        "masks": [{"png": f, "height": int(m.shape[0]), "width": int(m.shape[1]), "pixels": int(m.sum()),
                   "score": s} for f, m, s in zip(mask_files, pred.masks, pred.scores, strict=True)],
        "timings": pred.timings,
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"answer: {pred.text!r}")
    print(f"wrote {out}" + (f" and {len(mask_files)} mask PNG(s): {', '.join(mask_files)}" if mask_files else ""))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from medplib.model.summary import parameter_summary

    rows = parameter_summary(args.preset)
    width = max(len(name) for name in rows)
    for name, count in rows.items():
        print(f"{name:<{width}}  {count:>16,}")
    return 0
