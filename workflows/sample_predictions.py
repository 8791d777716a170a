"""The pipeline's own small evaluation and the per-stage sample predictions (until `workflows/evaluate.py`, the
full Ray Data batch evaluator, lands; the pipeline then only needs a different `score` source).

`evaluate_rows`: the first N prepared rows of the eval split, single process. Each row's prompt is its token ids up
to the first supervised (answer) token, so the model sees exactly what training fed it; answers are generated
greedily. Grounding rows are generated with `segment=True` (a mask even without `<SEG>`, upstream eval's rule) and
scored with `medplib.metrics.segmentation_scores` against the row's first target mask; VQA and region-VQA rows
with `medplib.metrics.vqa_scores` against the `answer` column. `score` (what `champion` compares) is the mean of
the available mDice, closed-question accuracy and open-question token F1.

`sample_predictions`: a few rows through `medplib.inference.Predictor` (the serving code path), rendered as PNGs:
the image rebuilt from the row's SAM view, the predicted mask in red, the reference mask outlined in green,
region prompts outlined in yellow; plus `predictions.jsonl` with question, reference and answer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def prompt_of(row: dict, vision_size: int):
    """The row as a generation prompt (`Encoded` without the answer) and its reference masks."""
    from medplib.constants import IGNORE_INDEX
    from medplib.data.rows import row_to_encoded
    from workflows.train import plain_row

    enc = row_to_encoded(plain_row(row), vision_size)
    supervised = [i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX]
    cut = supervised[0] if supervised else len(enc.input_ids)
    targets = enc.target_masks
    enc.input_ids, enc.labels, enc.target_masks = enc.input_ids[:cut], [IGNORE_INDEX] * cut, []
    return enc, targets


def _clean(text: str, tokenizer) -> str:
    return text.replace(tokenizer.eos_token or "", "").strip()


def evaluate_rows(model, rows: list[dict], max_new_tokens: int, batch_size: int = 4) -> dict[str, float]:
    """Scores of `model` (a MedPLIB in eval mode) on prepared rows; see the module docstring."""
    import torch

    from medplib.data.batch import collate
    from medplib.metrics import segmentation_scores, vqa_scores

    vision_size = model.cfg.vision.image_size_px
    seg_preds, seg_gts, records = [], [], []
    for grounding in (True, False):
        chosen = [r for r in rows if (r["task"] == "grounding") == grounding]
        for i in range(0, len(chosen), batch_size):
            chunk = chosen[i : i + batch_size]
            prompts = [prompt_of(r, vision_size) for r in chunk]
            batch = collate([p[0] for p in prompts], model.cfg, model.ids.pad)
            with torch.inference_mode():
                gens = model.generate(batch, max_new_tokens=max_new_tokens, segment=grounding)
            for row, (_, targets), gen in zip(chunk, prompts, gens, strict=True):
                if grounding:
                    if not targets:
                        continue
                    seg_gts.append(targets[0])
                    seg_preds.append(model.binarize(gen.mask_logits[0]) if gen.mask_logits else None)
                else:
                    records.append({"text": _clean(gen.text, model.tokenizer), "gt": row.get("answer") or "",
                                    "answer_type": row.get("answer_type") or "open"})
    out: dict[str, float] = {}
    if seg_gts:
        for k, v in segmentation_scores(seg_preds, seg_gts).items():
            out[f"seg_{k}"] = float(v)
    if records:
        summary = vqa_scores(records)
        for k in ("n", "closed_accuracy", "open_f1", "open_exact_match", "open_bleu"):
            out[f"vqa_{k}"] = float(summary[k])
    parts = [out.get("seg_mDice"), out.get("vqa_closed_accuracy"), out.get("vqa_open_f1")]
    parts = [p for p in parts if p is not None and not math.isnan(p)]
    out["score"] = float(np.mean(parts)) if parts else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- sample PNGs


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


def overlay_png(image: np.ndarray, pred: np.ndarray | None, ref: np.ndarray | None, regions: list[np.ndarray],
                path: Path) -> None:
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


def sample_predictions(model_dir: str | Path, rows: list[dict], out_dir: Path, max_new_tokens: int) -> int:
    """Render up to len(rows) predictions into `out_dir` (PNGs + predictions.jsonl); returns how many."""
    from medplib.data.rows import row_to_encoded
    from medplib.data.transforms import Geometry
    from medplib.inference import Predictor
    from workflows.train import plain_row

    predictor = Predictor.from_pretrained(model_dir)
    cfg = predictor.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        enc = row_to_encoded(plain_row(row), cfg.vision.image_size_px)
        if enc.sam_view is None:
            continue
        image = _unpad(enc.sam_view, enc.sam_geometry)
        vgeo = Geometry.fit(enc.sam_geometry.orig_h, enc.sam_geometry.orig_w, cfg.vision.image_size_px, "center")
        regions = [_unpad(m, vgeo) for m in enc.region_masks]
        regions = [m for m in regions if m.any()]
        try:
            pred = predictor.predict(image, row.get("question") or "", regions,
                                     max_new_tokens=max_new_tokens, segment=row.get("task") == "grounding")
        except ValueError as err:  # e.g. a question whose region markers do not match the masks
            log.warning("sample %s: no prediction (%s)", row.get("sample_id"), err)
            continue
        name = f"sample_{i:02d}.png"
        overlay_png(image, pred.masks[0] if pred.masks else None, enc.target_masks[0] if enc.target_masks else None,
                    regions, out_dir / name)
        lines.append({"png": name, "sample_id": row.get("sample_id"), "task": row.get("task"),
                      "question": row.get("question"), "reference": row.get("answer"), "answer": pred.text,
                      "masks": len(pred.masks)})  # fmt: skip
    (out_dir / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def read_rows(prepared_dir: str | Path, split: str, tasks: set[str] | None, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of a prepared split (file order), optionally only some tasks; no Ray."""
    import pyarrow.parquet as pq

    folder = Path(prepared_dir) / split
    if not folder.is_dir():
        raise ValueError(f"{prepared_dir} has no split {split!r} (data.eval_split)")
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                if tasks is None or row["task"] in tasks:
                    out.append(row)
                    if len(out) >= limit:
                        return out
    return out
