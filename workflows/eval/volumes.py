"""3-D evaluation of volume-level grounding rows (`medplib eval --volumes ROWS.json`), beside the 2-D rows.

Each row (`medplib_datasets.mini.volumes` writes MeCoVQA-mini's) names a NIfTI volume and a 3-D target mask of the
same shape and affine, a question, the structure and the RAS axis to read along. The model answers slice by slice
(`medplib.volume_prediction.predict_volume`: the same `Predictor.encode` -> `run` path as everything else), and the
3-D mask is scored against the target: Dice, HD95 and NSD (MONAI, in mm through the voxel spacing), per row and
per structure within each split. The report gets a table per split and, per row, a strip of slices through the
3-D overlay (target green, prediction magenta). A row whose files are missing, escape the rows file's folder or
disagree in shape or affine is skipped with its reason, never scored.

With engine "ray" all rows run in one Ray task (one model, one GPU when asked for); with "local" in this process.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medplib.data.display import parse_axis

logger = logging.getLogger(__name__)

VOLUME_PREDICTIONS_NAME = "volume_predictions.jsonl"
STRIP_SLICES = 8


class VolumeRow(BaseModel):
    """One volume-level grounding row; paths are relative to the rows file's folder."""

    model_config = ConfigDict(extra="ignore")

    id: str
    image: str
    mask: str
    question: str = Field(min_length=1)
    structure: str
    axis: int = 2
    split: str = "test"
    modality: str = "other"

    @field_validator("axis", mode="before")
    @classmethod
    def _axis(cls, v: Any) -> int:
        return parse_axis(v)


def read_volume_rows(path: Path) -> tuple[list[VolumeRow], list[dict[str, Any]]]:
    """(rows, skipped rows with their reason) from a JSON array file."""
    folder = path.parent.resolve()
    raw = json.loads(path.read_text())
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON array of volume rows")
    rows, skipped = [], []
    for index, item in enumerate(raw):
        try:
            row = VolumeRow.model_validate(item)
            for field in ("image", "mask"):
                target = (folder / getattr(row, field)).resolve()
                if not target.is_relative_to(folder):
                    raise ValueError(f"{field} {getattr(row, field)!r} resolves outside {folder}")
                if not target.is_file():
                    raise ValueError(f"{field} {getattr(row, field)!r} not found under {folder}")
        except (ValidationError, ValueError) as err:
            skipped.append(
                {"index": index, "id": item.get("id") if isinstance(item, dict) else None, "reason": str(err)}
            )
            continue
        rows.append(row)
    return rows, skipped


def _strip(volume: Any, gt_ras: np.ndarray, pred_ras: np.ndarray, axis: int) -> bytes:
    from medplib.data.overlay import mosaic, strip_slices
    from workflows.eval.report import overlay, png_bytes_rgb

    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(gt_ras.any(axis=other) | pred_ras.any(axis=other))[0].tolist()
    tiles = [
        overlay(
            volume.display_slice(axis, k),
            np.rot90(np.take(gt_ras, k, axis=axis)),
            np.rot90(np.take(pred_ras, k, axis=axis)),
            display_px=160,
        )
        for k in strip_slices(present, volume.num_slices(axis), STRIP_SLICES)
    ]
    return png_bytes_rgb(mosaic(tiles, columns=len(tiles)))


def score_volume_rows(
    rows: list[dict[str, Any]],
    folder: str,
    *,
    model: str,
    seed: int,
    dtype: str | None,
    use_gpu: bool,
    batch_size: int,
    max_new_tokens: int,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Predict and score each row; returns one record per row (with its strip PNG bytes under `strip_png`)."""
    import torch
    from nibabel.orientations import apply_orientation

    from medplib.data.volume import load_volume
    from medplib.inference import Predictor, resolve_model_source
    from medplib.volume_metrics import dice_3d, hd95_mm, nsd, voxel_spacing_mm
    from medplib.volume_prediction import predict_volume

    logging.basicConfig(level=logging.INFO)  # a fresh Ray worker has no handler; a no-op elsewhere
    device = "cuda" if use_gpu and torch.cuda.is_available() else None
    torch.manual_seed(seed)
    predictor = Predictor.from_pretrained(
        resolve_model_source(model, tracking_uri), dtype=dtype, device=device
    )
    records = []
    for item in rows:
        row = VolumeRow.model_validate(item)
        began = time.perf_counter()
        volume = load_volume(Path(folder) / row.image)
        target = load_volume(Path(folder) / row.mask)
        if target.data.shape != volume.data.shape or not np.allclose(target.affine, volume.affine, atol=1e-4):
            records.append(
                {
                    "id": row.id,
                    "split": row.split,
                    "structure": row.structure,
                    "skipped": "the mask's shape or affine differs from the image's",
                }
            )
            continue
        gt = target.data > 0
        pred = predict_volume(
            predictor,
            volume,
            row.question,
            axis=row.axis,
            segment=True,
            answer_slices="mask",
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        spacing = voxel_spacing_mm(volume.affine)
        strip = _strip(
            volume, apply_orientation(gt, volume.ornt), apply_orientation(pred.mask, volume.ornt), row.axis
        )
        records.append(
            {
                "id": row.id,
                "split": row.split,
                "structure": row.structure,
                "modality": row.modality,
                "question": row.question,
                "answer": pred.answer,
                "dice": dice_3d(pred.mask, gt),
                "hd95_mm": hd95_mm(pred.mask, gt, spacing),
                "nsd": nsd(pred.mask, gt, spacing),
                "pred_voxels": int(pred.mask.sum()),
                "gt_voxels": int(gt.sum()),
                "slices_read": len(pred.slices_read),
                "seconds": round(time.perf_counter() - began, 3),
                "strip_png": strip,
            }
        )
        logger.info("volume %s: Dice %.3f", row.id, records[-1]["dice"])
    return records


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def volume_metrics(records: list[dict[str, Any]], skipped: list[dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """`metrics.json`'s `volumes` section: per split, the means and `by_structure` (Dice, HD95 mm, NSD, n)."""
    scored = [r for r in records if "skipped" not in r]
    splits: dict[str, Any] = {}
    for split in sorted({r["split"] for r in scored}):
        in_split = [r for r in scored if r["split"] == split]
        by_structure = {}
        for structure in sorted({r["structure"] for r in in_split}):
            group = [r for r in in_split if r["structure"] == structure]
            by_structure[structure] = {
                "n": len(group),
                "dice": _mean([r["dice"] for r in group]),
                "hd95_mm": _mean([r["hd95_mm"] for r in group]),
                "nsd": _mean([r["nsd"] for r in group]),
                "hd95_missing": sum(r["hd95_mm"] is None for r in group),
            }
        splits[split] = {
            "kind": cfg.split_kind(split),
            "rows": len(in_split),
            "dice": _mean([r["dice"] for r in in_split]),
            "hd95_mm": _mean([r["hd95_mm"] for r in in_split]),
            "nsd": _mean([r["nsd"] for r in in_split]),
            "by_structure": by_structure,
        }
    skipped = skipped + [{"id": r["id"], "reason": r["skipped"]} for r in records if "skipped" in r]
    return {"rows": len(scored), "skipped": skipped, "nsd_tolerance_mm": _nsd_tolerance(), "splits": splits}


def _nsd_tolerance() -> float:
    from medplib.volume_metrics import NSD_TOLERANCE_MM

    return NSD_TOLERANCE_MM


def evaluate_volumes(cfg: Any, use_gpu: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `cfg.volumes`; returns (the `volumes` metrics section, records with their strip PNGs)."""
    rows, skipped = read_volume_rows(cfg.volumes)
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    kwargs = {
        "model": cfg.model,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "use_gpu": use_gpu,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "tracking_uri": cfg.tracking_uri,
    }
    payload = [r.model_dump() for r in rows]
    folder = str(cfg.volumes.parent.resolve())
    if cfg.engine == "ray":
        import ray

        # Ray touch-point: one task holds one model for all volume rows (a GPU when the eval uses GPUs).
        task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else cfg.cpus_per_actor)(
            score_volume_rows
        )
        records = ray.get(task.remote(payload, folder, **kwargs))
    else:
        records = score_volume_rows(payload, folder, **kwargs)
    path = cfg.out / VOLUME_PREDICTIONS_NAME
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in record.items() if k != "strip_png"}) + "\n")
    return volume_metrics(records, skipped, cfg), records


def _cell(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def volume_section_html(
    section: dict[str, Any], records: list[dict[str, Any]], out: Path
) -> tuple[str, list[Path]]:
    """The report's 3-D section (tables per split, a slice strip per row) and the strip PNGs it wrote."""
    from workflows.eval.report import _img_tag

    parts = [
        "<h2>Volumes (3-D grounding)</h2>",
        '<p class="note">Each row is answered slice by slice along its axis and the 3-D mask scored against the '
        f"target: Dice x100, HD95 in mm (95th percentile Hausdorff distance), NSD x100 at {section['nsd_tolerance_mm']:g} mm "
        "(MONAI). HD95 and NSD are missing where the prediction or the target is empty. Strips: slices through the "
        "overlay, target green, prediction magenta.</p>",
    ]
    for split, s in section["splits"].items():
        parts.append(
            f"<h3>Split <code>{html.escape(split)}</code> ({html.escape(s['kind'])}) &middot; {s['rows']} volume rows "
            f"&middot; Dice {_cell(s['dice'])} &middot; HD95 {_cell(s['hd95_mm'], 1.0)} mm &middot; NSD {_cell(s['nsd'])}</h3>"
        )
        lines = ["<table><tr><th>structure</th><th>n</th><th>Dice</th><th>HD95 (mm)</th><th>NSD</th></tr>"]
        for structure, m in s["by_structure"].items():
            lines.append(
                f"<tr><td>{html.escape(structure)}</td><td>{m['n']}</td><td>{_cell(m['dice'])}</td>"
                f"<td>{_cell(m['hd95_mm'], 1.0)}</td><td>{_cell(m['nsd'])}</td></tr>"
            )
        parts.append("\n".join(lines) + "</table>")
    written = []
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    for k, record in enumerate(r for r in records if "strip_png" in r):
        path = out / "gallery" / f"volume_{k}.png"
        path.write_bytes(record["strip_png"])
        written.append(path)
        parts.append(
            f"<p>{html.escape(record['id'])}: Dice {_cell(record['dice'])}, HD95 {_cell(record['hd95_mm'], 1.0)} mm</p>"
            + _img_tag(record["strip_png"], f"{record['id']}: slices through the 3-D overlay", "strip")
        )
    if section["skipped"]:
        parts.append(
            f'<p class="note">{len(section["skipped"])} volume row(s) skipped: '
            + "; ".join(html.escape(f"{s.get('id')}: {s['reason']}") for s in section["skipped"][:5])
            + "</p>"
        )
    return "\n".join(parts), written


def volume_summary_lines(section: dict[str, Any]) -> list[str]:
    """What `medplib eval` prints for the volumes: per split and structure, 3-D Dice, HD95 and NSD."""
    lines = []
    for split, s in section["splits"].items():
        lines.append(
            f"{split} volumes ({s['kind']}): {s['rows']} rows | 3-D Dice {_cell(s['dice'])} HD95 {_cell(s['hd95_mm'], 1.0)} mm "
            f"NSD {_cell(s['nsd'])}"
        )
        for structure, m in s["by_structure"].items():
            lines.append(
                f"  {structure}: Dice {_cell(m['dice'])} HD95 {_cell(m['hd95_mm'], 1.0)} mm NSD {_cell(m['nsd'])} (n={m['n']})"
            )
    if section["skipped"]:
        lines.append(f"  {len(section['skipped'])} volume row(s) skipped (see metrics.json)")
    return lines
