"""The on-disk row of a prepared dataset (one Parquet row per sample) and its conversion to and from `Encoded`.

Schema version SCHEMA_VERSION; change it whenever a column changes meaning or encoding (3: masks as 1-bit PNGs,
which a version-2 reader would read as empty). Images are stored as PNG bytes of the square uint8 views
(lossless, compact), region masks as 1-bit PNG bytes of the (R*Hv, Wv) stack, target masks as 1-bit PNG bytes
at the original resolution, so a row round-trips to exactly the pixels `encode_sample` produced.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch-free at import: readers of the format (the preprocessing driver) need no torch
    from medplib.data.batch import Encoded
    from medplib.data.transforms import Geometry

SCHEMA_VERSION = 3

# What a row says about its sample, from `encoded_to_row`'s `meta`.
DESCRIPTIVE_COLUMNS = (
    "task",
    "modality",
    "split",
    "answer_type",
    "question_type",
    "image_path",
    "question",
    "answer",
)
COLUMNS = (
    "sample_id",
    *DESCRIPTIVE_COLUMNS,
    "input_ids",
    "labels",
    "vision_view_png",
    "sam_view_png",
    "sam_geometry",
    "num_regions",
    "region_masks_png",
    "target_masks_png",
)


_PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray) -> bytes:
    """A PNG of a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or of a bool mask (stored as 0/255 grey).

    Written here rather than by Pillow, which tries five row filters on every row: one filter ("Up") and zlib
    level 1 encode a 256x256 MeCoVQA-mini view ~2x faster and a mask ~4x faster, in about the same bytes
    (2026-12-01: views 25.2 kB against Pillow's 24.8 kB at its level 1). Any PNG reader decodes them."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    channels = 1 if array.ndim == 2 else array.shape[-1] if array.ndim == 3 else 0
    if array.dtype != np.uint8 or channels not in _PNG_COLOR_TYPE or 0 in array.shape[:2]:
        raise ValueError(
            f"png_bytes takes a non-empty uint8 (H, W), (H, W, 3) or (H, W, 4) array or a bool mask, got "
            f"{array.dtype} {array.shape}"
        )
    height, width = array.shape[:2]
    return _png(array.reshape(height, width * channels), width, 8, _PNG_COLOR_TYPE[channels])


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A 1-bit grey PNG of a bool (H, W) mask, what prepared rows store: 8x fewer bytes to filter and compress
    than `png_bytes`' 0/255 grey (a 256x256 block mask: 33 us to write instead of 115, 149 us to read instead
    of 180, 188 bytes instead of 697; 2026-12-04). `png_array(..., as_mask=True)` reads either."""
    if mask.dtype != bool or mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"mask_png_bytes takes a non-empty bool (H, W) mask, got {mask.dtype} {mask.shape}")
    return _png(np.packbits(mask, axis=1), mask.shape[1], 1, 0)  # PNG packs pixels high bit first, as numpy


def _png(rows: np.ndarray, width: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG whose scanlines are `rows` (H, bytes a row, uint8), filtered "Up": each row is stored as its
    difference from the row above."""
    height = rows.shape[0]
    scanlines = np.full((height, 1 + rows.shape[1]), 2, np.uint8)  # each scanline: filter type 2, its bytes
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(scanlines.data, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def png_array(data: bytes, as_mask: bool = False) -> np.ndarray:
    arr = np.array(
        Image.open(io.BytesIO(data))
    )  # a writable copy: torch.from_numpy warns on read-only arrays
    if as_mask and arr.dtype != bool:  # a 1-bit PNG (`mask_png_bytes`) reads as bool already
        return arr > 127
    return arr


@dataclasses.dataclass(frozen=True)
class StoredViews:
    """An image's columns as rows store them: both views as PNG bytes and the SAM geometry. Preprocessing makes
    them once per image and gives the same bytes to every row of that image."""

    vision_view_png: bytes
    sam_view_png: bytes
    sam_geometry: np.ndarray  # int32 (7,): Geometry.as_tensor() without torch

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.sam_geometry[0]), int(self.sam_geometry[1])

    @classmethod
    def of(cls, vision_view: np.ndarray, sam_view: np.ndarray, geometry: Geometry) -> StoredViews:
        vision_png = png_bytes(vision_view)
        sam_png = vision_png if sam_view is vision_view else png_bytes(sam_view)  # one view (`image_views`)
        return cls(vision_png, sam_png, np.asarray(dataclasses.astuple(geometry), np.int32))


def encoded_to_row(enc: Encoded, meta: dict, views: StoredViews | None = None) -> dict:
    """`meta` carries the `DESCRIPTIVE_COLUMNS`. `views`, when given, stands for the image columns of an `enc` built without views
    (`batch.encode_without_views`)."""
    if views is None and enc.vision_view is not None:
        views = StoredViews.of(enc.vision_view, enc.sam_view, enc.sam_geometry)
    r, size = enc.region_masks.shape[0], enc.region_masks.shape[-1]
    return {
        "sample_id": enc.sample_id,
        **{k: meta.get(k) for k in DESCRIPTIVE_COLUMNS},
        "input_ids": np.asarray(enc.input_ids, dtype=np.int32),
        "labels": np.asarray(enc.labels, dtype=np.int32),
        "vision_view_png": None if views is None else views.vision_view_png,
        "sam_view_png": None if views is None else views.sam_view_png,
        "sam_geometry": None if views is None else views.sam_geometry,
        "num_regions": r,
        "region_masks_png": mask_png_bytes(enc.region_masks.reshape(r * size, size)) if r else None,
        "target_masks_png": [mask_png_bytes(m) for m in enc.target_masks],
    }


def row_to_encoded(row: dict, vision_size: int) -> Encoded:
    from medplib.data.batch import Encoded
    from medplib.data.transforms import Geometry

    r = int(row["num_regions"])
    regions = (
        png_array(row["region_masks_png"], as_mask=True).reshape(r, vision_size, vision_size)
        if r
        else np.zeros((0, vision_size, vision_size), dtype=bool)
    )
    geometry = row.get("sam_geometry")
    vision_png, sam_png = row["vision_view_png"], row["sam_view_png"]
    vision_view = None if vision_png is None else png_array(vision_png)
    return Encoded(
        input_ids=[int(t) for t in row["input_ids"]],
        labels=[int(t) for t in row["labels"]],
        vision_view=vision_view,
        # One view where the model makes both alike (`batch.image_views`): decoded once.
        sam_view=vision_view if sam_png == vision_png else None if sam_png is None else png_array(sam_png),
        sam_geometry=None if geometry is None else Geometry(*[int(v) for v in geometry]),
        region_masks=regions,
        target_masks=[png_array(m, as_mask=True) for m in (row["target_masks_png"] or [])],
        sample_id=str(row["sample_id"]),
    )
