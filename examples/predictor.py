"""The model in this process, no server: `Predictor` (`pip install .`, no extras).

    python examples/predictor.py --model tiny --image scan.png --box 10,10,40,30
    python examples/predictor.py --model models:/medplib@champion --image scan.nii.gz --box 60,60,120,120

--model takes a preset name, an export directory, an MLflow model folder or a `models:/` URI (downloaded once).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medplib.data.schema import Box
from medplib.inference import Predictor, resolve_model_source


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--image", required=True, type=Path, help="PNG, JPEG, DICOM or NIfTI")
    parser.add_argument("--box", default="10,10,40,30", help="x0,y0,x1,y1 in image pixels")
    parser.add_argument("--question", default="Please segment the region.")
    parser.add_argument("--out", type=Path, default=Path("prediction"))
    args = parser.parse_args()

    predictor = Predictor.from_pretrained(resolve_model_source(args.model))
    x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
    pred = predictor.predict(
        args.image,
        args.question,
        [Box(x0=x0, y0=y0, x1=x1, y1=y1)],
        segment=True,
        max_new_tokens=32,
        on_text=lambda _row, delta: print(delta, end="", flush=True),  # the answer while it is generated
    )
    print()
    print(f"answer: {pred.text!r} ({pred.num_generated_tokens} tokens, {pred.finish_reason})")
    for path, score in zip(pred.save_masks(args.out), pred.scores, strict=True):
        print(f"mask {path} (predicted IoU {score:.3f})")
    print("timings:", {k: round(v, 4) for k, v in pred.timings.items()})


if __name__ == "__main__":
    main()
