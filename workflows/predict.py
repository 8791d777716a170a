"""`medplib predict`: one question about one image, asked of the model in this process or of a running server,
and the answer written as JSON with one PNG per mask beside it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medplib.prediction import Prediction


def predict(
    image: str,
    question: str,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    points: Sequence[Sequence[float]] = (),
    boxes: Sequence[Sequence[float]] = (),
    masks: Sequence[str] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    segment: bool = False,
) -> Prediction:
    """Exactly one of `model` (a model directory, MLflow model URI or preset, run here) and `endpoint` (a
    MedPLIB server; API key from $MEDPLIB_API_KEY). Regions are used in the order points, boxes, masks."""
    if (model is None) == (endpoint is None):
        raise ValueError(
            "predict needs exactly one of --model (run the model here) or --endpoint (ask a server)"
        )
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "segment": segment}
    if endpoint:
        import httpx

        from serve.client import MedPLIBAPIError, MedPLIBClient

        try:
            with MedPLIBClient(endpoint) as client:
                return client.predict(
                    image, question, point=list(points), box=list(boxes), mask=list(masks), **settings
                )
        except (MedPLIBAPIError, httpx.HTTPError) as err:
            raise ValueError(f"{endpoint}: {err}") from err
    from medplib.data.schema import Box, MaskRef, Point
    from medplib.inference import Predictor, resolve_model_source

    regions = [Point(x=x, y=y) for x, y in points]
    regions += [Box(x0=a, y0=b, x1=c, y1=d) for a, b, c, d in boxes]
    regions += [MaskRef(path=str(Path(m).resolve())) for m in masks]
    return Predictor.from_pretrained(resolve_model_source(model)).predict(
        image, question, regions, **settings
    )


def write_prediction(pred: Prediction, out: Path) -> list[Path]:
    """`out` (answer, masks, timings as JSON) and `<out stem>_mask<i>.png` beside it; returns the PNG paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_files = pred.save_masks(out.with_suffix(""))
    result = {
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
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return mask_files
