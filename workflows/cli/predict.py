"""`medplib predict`: ask about one image or volume, here (--model) or of a server (--endpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medplib_client.cli import add_request_arguments, request_from_args


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
    # The flags `medplib-client predict` takes too; a volume without --slice runs whole here.
    add_request_arguments(
        p,
        image_help="PNG/JPEG, DICOM (.dcm), NIfTI (.nii/.nii.gz), a DICOM series folder or .zip, NRRD/MHA",
    )
    p.add_argument(
        "--answer-slices",
        default=None,
        metavar="mask|all|A:B|K",
        help="volume: whose text answers to keep (default: where the mask is with --segment, else the middle "
        "slice)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="volume: slices per generation pass (default 8)")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from medplib.data.display import View
    from workflows.predict import (
        is_volume_input,
        predict,
        predict_volume_here_or_there,
        regions_from_flags,
        write_prediction,
        write_volume_prediction,
    )

    out = Path(args.out)
    request = request_from_args(args)
    view = View.model_validate(request.pop("view") or {})
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
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            segment=args.segment,
        )
        files = write_volume_prediction(volume, pred, out, args.question, view.window)
        print(f"answer: {pred.answer!r} (slices {_span(pred.answer_slices)} of {len(pred.slices_read)} read)")
        print(f"wrote {out} and {', '.join(str(f) for f in files)}")
        return 0
    from medplib.data.image import load_image

    pred = predict(model=args.model, endpoint=args.endpoint, view=view, **request)
    image = load_image(args.image, view=view)
    regions = regions_from_flags(request["points"], request["boxes"], [])
    files = [str(f) for f in write_prediction(pred, out, image, regions)]
    print(f"answer: {pred.text!r}")
    print(f"wrote {out}" + (f" and {', '.join(files)}" if files else ""))
    return 0


def _span(slices: list[int]) -> str:
    if not slices:
        return "none"
    return f"{slices[0]}-{slices[-1]}" if len(slices) > 1 else str(slices[0])
