"""`medplib predict`: one question about one image, asked of the model in this process or of a running server
(`medplib_client.ask_server`, which `medplib-client predict` uses too)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medplib_client import Prediction, ask_server


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
        return ask_server(endpoint, image, question, points=points, boxes=boxes, masks=masks, **settings)
    from medplib.data.schema import Box, MaskRef, Point
    from medplib.inference import Predictor, resolve_model_source

    regions = [Point(x=x, y=y) for x, y in points]
    regions += [Box(x0=a, y0=b, x1=c, y1=d) for a, b, c, d in boxes]
    regions += [MaskRef(path=str(Path(m).resolve())) for m in masks]
    return Predictor.from_pretrained(resolve_model_source(model)).predict(
        image, question, regions, **settings
    )
