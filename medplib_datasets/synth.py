"""Synthetic MeCoVQA-format data for scale and load tests: `medplib data synth --rows N --output DIR`.

Images are smoothed noise with one to three non-overlapping shapes (circle, square, triangle, diamond, ring; at
most one of each kind per image, so a name picks exactly one mask). A pool of images is written once and rows
reuse it, so thousands of rows take a second. Rows cycle through the three tasks in the same row format as
MeCoVQA-mini (see medplib_datasets/mini/): complex VQA (count, presence, kind), region VQA with point/box prompts in
the explicit form and mask prompts inline, and grounding with `<SEG><mask>...</mask>`. All rows go to
`DIR/MeCoVQA-synth_train.json` with split "train", except those on the last `val_fraction` of the pool, which go
to `DIR/MeCoVQA-synth_val.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from medplib_datasets.mini.build import write_rows
from medplib_datasets.mini.rows import PNG_COMPRESS_LEVEL, interior_point, jittered_box

SHAPES = ("circle", "square", "triangle", "diamond", "ring")
DATASET_NAME = "MeCoVQA-synth"


@dataclass
class SynthReport:
    output: Path
    n_rows: int
    n_images: int
    n_masks: int
    seconds: float


def _shape_mask(kind: str, size_px: int, cy: int, cx: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size_px, :size_px]
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= radius**2
    if kind == "square":
        return (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    if kind == "triangle":  # apex up
        return (dy <= radius * 0.7) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= radius
    if kind == "ring":
        distance_sq = dy**2 + dx**2
        return (distance_sq <= radius**2) & (distance_sq >= (radius * 0.55) ** 2)
    raise ValueError(f"unknown shape {kind!r}; expected one of {', '.join(SHAPES)}")


def _pool_image(rng: np.random.Generator, size_px: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A noise image with 1-3 shapes of distinct kinds that do not touch; returns (uint8 image, kind -> mask)."""
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size_px, size_px)), sigma=2.0)
    image = 90 + 60 * noise / (np.abs(noise).max() + 1e-6)
    occupied = np.zeros((size_px, size_px), dtype=bool)
    masks: dict[str, np.ndarray] = {}
    for kind in rng.permutation(SHAPES)[: int(rng.integers(1, 4))]:
        for _ in range(20):  # rejection sampling for a free spot
            radius = int(rng.integers(size_px // 12, size_px // 5))
            cy, cx = (int(v) for v in rng.integers(radius + 1, size_px - radius - 1, size=2))
            mask = _shape_mask(str(kind), size_px, cy, cx, radius)
            if mask.sum() >= 20 and not (ndimage.binary_dilation(mask, iterations=2) & occupied).any():
                masks[str(kind)] = mask
                occupied |= mask
                image[mask] += rng.uniform(60, 120) * rng.choice([-1, 1])
                break
    return np.clip(image, 0, 255).astype(np.uint8), masks


def _row(
    row_id: str,
    image_path: str,
    split: str,
    task: str,
    kind: str,
    question: str,
    answer: str,
    answer_type: str,
) -> dict[str, Any]:
    return {
        "id": row_id,
        "image": image_path,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": answer},
        ],
        "answer_type": answer_type,
        "modality": "other",
        "task": task,
        "split": split,
        "source": "synthetic",
        "question_type": kind,
    }


def build_synth(
    output: str | Path,
    rows: int,
    seed: int = 0,
    pool_size: int = 64,
    image_px: int = 128,
    val_fraction: float = 0.1,
) -> SynthReport:
    """Write `rows` synthetic rows (and a pool of at most `pool_size` images with their masks) into `output`."""
    if rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    started = time.perf_counter()
    root = Path(output)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pool = max(1, min(pool_size, rows))
    n_val_images = int(n_pool * val_fraction)
    pool = []
    n_masks = 0
    for index in range(n_pool):
        image, masks = _pool_image(rng, image_px)
        stem = f"synthetic_00--Shapes--pool_{index:05d}--2d_0000"
        Image.fromarray(image).save(root / "images" / f"{stem}.png", compress_level=PNG_COMPRESS_LEVEL)
        mask_paths = {}
        for kind, mask in masks.items():
            rel = f"masks/{stem}--{SHAPES.index(kind) + 1:04d}_000.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / rel, compress_level=PNG_COMPRESS_LEVEL)
            mask_paths[kind] = rel
            n_masks += 1
        split = "val" if index >= n_pool - n_val_images else "train"
        pool.append((stem, f"images/{stem}.png", masks, mask_paths, split))

    out_rows: list[dict[str, Any]] = []
    for number in range(rows):
        stem, image_path, masks, mask_paths, split = pool[int(rng.integers(n_pool))]
        row_id = f"{stem}--{number:07d}"
        task = ("vqa", "region_vqa", "grounding")[number % 3]
        kinds = sorted(masks)
        if task == "vqa" or not kinds:
            choice = int(rng.integers(3))
            if choice == 0:
                row = _row(
                    row_id,
                    image_path,
                    split,
                    "vqa",
                    "count",
                    "How many shapes are in this image?",
                    f"{len(kinds)}.",
                    "open",
                )
            elif choice == 1:
                kind = str(rng.choice(SHAPES))
                answer = "Yes." if kind in masks else "No."
                row = _row(
                    row_id,
                    image_path,
                    split,
                    "vqa",
                    "presence",
                    f"Is there a {kind} in this image?",
                    answer,
                    "closed",
                )
            else:
                row = _row(
                    row_id,
                    image_path,
                    split,
                    "vqa",
                    "modality",
                    "What kind of image is this?",
                    "A synthetic image of shapes on noise.",
                    "open",
                )
        elif task == "region_vqa":
            kind = kinds[int(rng.integers(len(kinds)))]
            prompt = ("point", "box", "mask")[int(rng.integers(3))]
            placeholder = f"<region>{mask_paths[kind]}</region>" if prompt == "mask" else "<region>"
            row = _row(
                row_id,
                image_path,
                split,
                "region_vqa",
                f"shape_{prompt}",
                f"What shape is in the marked region {placeholder}?",
                f"A {kind}.",
                "open",
            )
            if prompt == "point":
                row["regions"] = [{"point": list(interior_point(masks[kind]))}]
            elif prompt == "box":
                row["regions"] = [{"box": list(jittered_box(masks[kind], rng))}]
        else:
            kind = kinds[int(rng.integers(len(kinds)))]
            row = _row(
                row_id,
                image_path,
                split,
                "grounding",
                "shape",
                f"Please segment the {kind}.",
                f"Sure, it is <SEG><mask>{mask_paths[kind]}</mask>.",
                "open",
            )
        out_rows.append(row)

    write_rows(root / f"{DATASET_NAME}_train.json", [r for r in out_rows if r["split"] == "train"])
    if n_val_images:
        write_rows(root / f"{DATASET_NAME}_val.json", [r for r in out_rows if r["split"] == "val"])
    return SynthReport(root, len(out_rows), n_pool, n_masks, time.perf_counter() - started)
