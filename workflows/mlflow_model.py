"""A MedPLIB export as an MLflow `pyfunc` model, so `mlflow.pyfunc.load_model("models:/medplib@champion")` and
`mlflow models serve -m models:/medplib@champion --env-manager local` work.

The MLflow model folder (`save_pyfunc_model`) holds `MLmodel` (signature and input example), the export as the
`model` artifact (safetensors, read by `medplib.inference.Predictor`) and `python_model.py`, the model as code:
three lines that build `MedPLIBPyfunc`, so nothing is pickled. `medplib.inference.resolve_model_source` reads both
layouts: a bare export directory and this folder.

Columns in: `image` (base64 of a PNG, JPEG, DICOM or NIfTI file; bytes also work in Python), `question`,
`regions` (optional JSON list of `{"kind": "point"|"box"|"mask", ...}` as in `POST /v1/predict`, masks as COCO
RLE) and `segment` (optional bool). Out: `answer`, `masks` (JSON list of COCO RLE, one per `<SEG>`) and `scores`
(JSON list of SAM's IoU per mask). Params: `max_new_tokens`, `temperature`.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

# The model as code (MLflow's "models from code"): no pickle in the model folder.
PYTHON_MODEL_CODE = """import mlflow.models

from workflows.mlflow_model import MedPLIBPyfunc

mlflow.models.set_model(MedPLIBPyfunc())
"""


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "image"),
            ColSpec("string", "question"),
            ColSpec("string", "regions", required=False),
            ColSpec("boolean", "segment", required=False),
        ]
    )
    outputs = Schema([ColSpec("string", "answer"), ColSpec("string", "masks"), ColSpec("string", "scores")])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _regions(text: Any, row: int) -> list:
    from medplib.data.schema import Box, Point
    from medplib_client.masks import decode_rle

    if text is None or (isinstance(text, float) and np.isnan(text)) or text == "":
        return []
    try:
        items = json.loads(text) if isinstance(text, str) else list(text)
        out = []
        for item in items:
            kind = item["kind"]
            if kind == "point":
                out.append(Point(x=item["x"], y=item["y"]))
            elif kind == "box":
                out.append(Box(x0=item["x0"], y0=item["y0"], x1=item["x1"], y1=item["y1"]))
            elif kind == "mask":
                out.append(decode_rle(item["rle"]))
            else:
                raise ValueError(f"kind must be point, box or mask, got {kind!r}")
        return out
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"row {row}: regions: {err}") from err


class MedPLIBPyfunc(mlflow.pyfunc.PythonModel):
    """`Predictor` behind MLflow's pyfunc interface (one generation pass per `segment` value)."""

    def load_context(self, context) -> None:
        from medplib.inference import Predictor, find_model_dir

        self.predictor = Predictor.from_pretrained(find_model_dir(Path(context.artifacts["model"])))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from medplib.inference import Request
        from medplib_client.masks import encode_rle

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        requests, segment = [], []
        for i, row in enumerate(frame.to_dict("records")):
            image = row["image"]
            requests.append(
                Request(
                    image if isinstance(image, bytes) else base64.b64decode(image),
                    row["question"],
                    _regions(row.get("regions"), i),
                )
            )
            segment.append(bool(row.get("segment")) if row.get("segment") is not None else False)
        out: list[dict[str, str] | None] = [None] * len(requests)
        for flag in sorted(set(segment)):
            rows = [i for i, s in enumerate(segment) if s == flag]
            preds = self.predictor.predict_batch(
                [requests[i] for i in rows],
                max_new_tokens=int(params.get("max_new_tokens", 64)),
                temperature=float(params.get("temperature", 0.0)),
                segment=flag,
            )
            for i, pred in zip(rows, preds, strict=True):
                out[i] = {
                    "answer": pred.text,
                    "masks": json.dumps([encode_rle(m) for m in pred.masks]),
                    "scores": json.dumps(pred.scores),
                }
        return pd.DataFrame(out, columns=["answer", "masks", "scores"])


def example_from_rows(rows: list[dict], vision):
    """The input example: the first prepared row with an image, as a request (its image as PNG base64, its
    region masks as RLE, `segment` for grounding rows); None when no row has an image."""
    import pandas as pd

    from medplib.data.rows import png_bytes
    from medplib_client.masks import encode_rle
    from workflows.train.samples import row_inputs

    for row in rows:
        inputs = row_inputs(row, vision)
        if inputs is None:
            continue
        image, regions, _ = inputs
        record = {
            "image": base64.b64encode(png_bytes(image)).decode("ascii"),
            "question": row.get("question") or "",
            "regions": json.dumps([{"kind": "mask", "rle": encode_rle(m)} for m in regions]),
            "segment": row.get("task") == "grounding",
        }
        return pd.DataFrame([record])
    return None


def save_pyfunc_model(export_dir: Path, dst: Path, input_example) -> Path:
    """Write the MLflow pyfunc model folder for `export_dir` into `dst` (which must not exist); without an input
    example (None) the model has its signature only."""
    from medplib import __version__

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "python_model.py"
        code.write_text(PYTHON_MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(dst),
            python_model=str(code),
            artifacts={"model": str(export_dir)},
            signature=signature(),
            input_example=None if input_example is None else (input_example, {"max_new_tokens": 8}),
            # Explicit: inferring them would load the model in a subprocess just to list its imports.
            pip_requirements=[f"medplib=={__version__}"],
        )
    return dst
