"""`medplib predict`: ask about one image or volume, here (--model) or of a server (--endpoint)."""

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
        help="answer a question about an image or a volume, with an optional region prompt, and save the masks",
        description="Run the model on one image. The answer and the masks (one PNG per <SEG>, next to --out) "
        "are written to --out, with an overlay PNG. A volume (NIfTI, DICOM series folder or zip, NRRD/MHA) runs "
        "slice by slice along --axis unless --slice picks one; it writes the 3-D mask as NIfTI with the input's "
        "affine (and a DICOM-SEG for DICOM input) and a mosaic overlay. --model takes a model directory, an MLflow "
        "model URI (models:/medplib@champion, runs:/ID/model) or a preset name (tiny builds at random init). With "
        "--endpoint URL the question goes to a running `medplib serve` server instead (API key from "
        "$MEDPLIB_API_KEY).",
    )
    p.add_argument("--model", help="model directory, MLflow model URI, or preset name")
    p.add_argument(
        "--endpoint", metavar="URL", help="a MedPLIB server (http://127.0.0.1:8000) instead of --model"
    )
    p.add_argument(
        "--image",
        required=True,
        help="PNG/JPEG, DICOM (.dcm), NIfTI (.nii/.nii.gz), a DICOM series folder or .zip, NRRD/MHA",
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
    p.add_argument(
        "--slice",
        type=int,
        default=None,
        metavar="K",
        help="one slice (volume) or frame (DICOM); default: all "
        "slices of a volume, the middle frame of a multi-frame DICOM",
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
    p.add_argument(
        "--answer-slices",
        default=None,
        metavar="mask|all|A:B|K",
        help="volume: whose text answers to keep (default: where the mask is with --segment, else the middle "
        "slice)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="volume: slices per generation pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--out", default="result.json", help="where to write the answer JSON (masks go beside it)")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from medplib.data.display import View
    from workflows.predict import (
        is_volume_input,
        predict,
        predict_volume_here_or_there,
        write_prediction,
        write_volume_prediction,
    )

    out = Path(args.out)
    view = View(slice_index=args.slice, axis=args.axis, window=args.window)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "segment": args.segment,
    }
    if is_volume_input(args.image, view):
        if args.point or args.box or args.mask:
            raise ValueError("region prompts belong to one slice: add --slice K to ask about that slice")
        volume, pred = predict_volume_here_or_there(
            args.image,
            args.question,
            model=args.model,
            endpoint=args.endpoint,
            view=view,
            answer_slices=args.answer_slices,
            batch_size=args.batch_size,
            **settings,
        )
        files = write_volume_prediction(volume, pred, out, args.question, view.window)
        print(f"answer: {pred.answer!r} (slices {_span(pred.answer_slices)} of {len(pred.slices_read)} read)")
        print(f"wrote {out} and {', '.join(str(f) for f in files)}")
        return 0
    from medplib.data.image import load_image
    from workflows.predict import regions_from_flags

    points = [_floats(v, 2, "--point") for v in args.point]
    boxes = [_floats(v, 4, "--box") for v in args.box]
    pred = predict(
        args.image,
        args.question,
        model=args.model,
        endpoint=args.endpoint,
        points=points,
        boxes=boxes,
        masks=args.mask,
        view=view,
        **settings,
    )
    image = load_image(args.image, view=view)
    files = [str(f) for f in write_prediction(pred, out, image, regions_from_flags(points, boxes, []))]
    print(f"answer: {pred.text!r}")
    print(f"wrote {out}" + (f" and {', '.join(files)}" if files else ""))
    return 0


def _span(slices: list[int]) -> str:
    if not slices:
        return "none"
    return f"{slices[0]}-{slices[-1]}" if len(slices) > 1 else str(slices[0])
