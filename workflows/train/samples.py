"""Per-stage sample predictions logged to each stage's MLflow run (scores come from `workflows/eval/evaluate.py`).

`sample_predictions`: a few rows through `medplib.inference.Predictor` (the serving code path), rendered as PNGs:
the image rebuilt from the row's SAM view, the predicted mask in red, the reference mask outlined in green,
region prompts outlined in yellow; plus `predictions.jsonl` with question, reference and answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _unpad(view: np.ndarray, geo) -> np.ndarray:
    from PIL import Image

    crop = view[geo.pad_top : geo.pad_top + geo.resized_h, geo.pad_left : geo.pad_left + geo.resized_w]
    resample = Image.NEAREST if view.dtype == bool else Image.BILINEAR
    pil = Image.fromarray(crop.astype(np.uint8) * 255 if view.dtype == bool else crop)
    out = np.asarray(pil.resize((geo.orig_w, geo.orig_h), resample))
    return out > 127 if view.dtype == bool else out


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def overlay_png(
    image: np.ndarray, pred: np.ndarray | None, ref: np.ndarray | None, regions: list[np.ndarray], path: Path
) -> None:
    """Red = predicted mask (blended), green = reference mask outline, yellow = region prompt outline."""
    from PIL import Image

    out = image.astype(np.float32).copy()
    if pred is not None and pred.any():
        out[pred] = 0.5 * out[pred] + 0.5 * np.array([255, 0, 0])
    if ref is not None:
        out[_outline(ref)] = (0, 255, 0)
    for region in regions:
        out[_outline(region)] = (255, 255, 0)
    scale = max(1, 256 // max(image.shape[:2]))  # tiny images are enlarged so they can be seen
    Image.fromarray(out.clip(0, 255).astype(np.uint8)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST
    ).save(path)


def row_inputs(row: dict, vision):
    """A prepared row back as a request: the image (rebuilt from its SAM view), its non-empty region masks and
    its encoding; None when the row has no image."""
    from medplib.data.rows import row_to_encoded
    from medplib.data.transforms import Geometry
    from workflows.train.stage import plain_row

    enc = row_to_encoded(plain_row(row), vision.image_size_px)
    if enc.sam_view is None:
        return None
    image = _unpad(enc.sam_view, enc.sam_geometry)
    # Region masks live in the vision view (`vision`: a `VisionConfig`), wherever it put the image.
    vgeo = Geometry.fit(
        enc.sam_geometry.orig_h, enc.sam_geometry.orig_w, vision.image_size_px, vision.pad_mode
    )
    regions = [_unpad(m, vgeo) for m in enc.region_masks]
    return image, [m for m in regions if m.any()], enc


def sample_predictions(
    model_dir: str | Path,
    rows: list[dict],
    out_dir: Path,
    max_new_tokens: int,
    *,
    max_new_tokens_by: dict[str, int] | None = None,
    max_new_tokens_by_type: dict[str, int] | None = None,
    embedding_cache: str | Path | None = None,
) -> int:
    """Render up to len(rows) predictions into `out_dir` (PNGs + predictions.jsonl); returns how many. Token
    budgets as the evaluation's (`max_new_tokens_by` per answer family, `max_new_tokens_by_type` per question
    type); `embedding_cache`: the frozen encoder's
    outputs folder the stages and the evaluation share (the samples' images are eval-split images it scores)."""
    from medplib.inference import Predictor
    from workflows.eval.evaluate import token_budget

    predictor = Predictor.from_pretrained(model_dir)
    if embedding_cache is not None:
        predictor.use_embedding_cache(embedding_cache)
    cfg = predictor.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        inputs = row_inputs(row, cfg.vision)
        if inputs is None:
            continue
        image, regions, enc = inputs
        try:
            pred = predictor.predict(
                image,
                row.get("question") or "",
                regions,
                max_new_tokens=token_budget(row, max_new_tokens, max_new_tokens_by, max_new_tokens_by_type),
                segment=row.get("task") == "grounding",
            )
        except ValueError as err:  # e.g. a question whose region markers do not match the masks
            log.warning("sample %s: no prediction (%s)", row.get("sample_id"), err)
            continue
        name = f"sample_{i:02d}.png"
        overlay_png(
            image,
            pred.masks[0] if pred.masks else None,
            enc.target_masks[0] if enc.target_masks else None,
            regions,
            out_dir / name,
        )
        lines.append(
            {
                "png": name,
                "sample_id": row.get("sample_id"),
                "task": row.get("task"),
                "question": row.get("question"),
                "reference": row.get("answer"),
                "answer": pred.text,
                "masks": len(pred.masks),
            }
        )
    (out_dir / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def loss_curves_png(client, run_id: str, path: Path, terms: tuple[str, ...]) -> bool:
    """One panel per loss term (each with its own scale) of a stage's per-step metrics in MLflow, as a PNG: the
    curves a reader of the run wants at a glance, beside the MLflow UI's charts. False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for term in terms:
        history = sorted(client.get_metric_history(run_id, term), key=lambda m: m.step)
        if any(m.value != 0 for m in history):
            series[term] = ([m.step for m in history], [m.value for m in history])
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.6), squeeze=False)
    for ax, (term, (steps, values)) in zip(axes[0], series.items(), strict=True):
        ax.plot(steps, values, lw=1.2)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
