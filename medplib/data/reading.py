"""What every image and volume reader shares: the error it raises, the limits it reads within, bounded gzip
inflation and the uint8 scaling.

Readers check a file's header against `ReadLimits` before they decode anything, so a small compressed file that
declares a huge image is refused (`problem="too_large"`) without the memory its pixels would take.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ImageProblem = Literal["missing", "empty", "unreadable", "unsupported", "too_large"]


class ImageReadError(ValueError):
    """An image or mask could not be read. The message names the file; `problem` classifies the failure."""

    def __init__(
        self, source: str | Path, problem: ImageProblem, detail: str, limit: str | None = None
    ) -> None:
        self.source = str(source)
        self.problem: ImageProblem = problem
        self.detail = detail
        self.limit = limit  # the `ReadLimits` field a too_large input exceeded
        super().__init__(f"{source}: {detail}")


class ReadLimits(BaseModel):
    """Largest input a reader decodes; checked against the header before any pixel is decoded."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(
        4096 * 4096, gt=0, description="largest 2-D plane (rows x columns) of any image, frame or slice"
    )
    max_volume_bytes: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="largest voxel data of a volume or multi-frame file as its header declares (shape x bytes per "
        "voxel; x 4 for a volume read whole, which is held as float32); also bounds how far gzip is inflated",
    )
    max_files: int = Field(4096, gt=0, description="most files of one DICOM series (folder or zip)")


def too_large(name: str | Path, what: str, size: int, limit: int, field: str) -> ImageReadError:
    return ImageReadError(name, "too_large", f"{what} is {size:,}; the limit is {limit:,} ({field})", field)


def check_plane(name: str | Path, height: int, width: int, limits: ReadLimits) -> None:
    """Refuse an empty plane or one over `limits.max_pixels`, before decoding it."""
    if height <= 0 or width <= 0:
        raise ImageReadError(name, "empty", f"image has zero size {height}x{width}")
    if height * width > limits.max_pixels:
        raise too_large(
            name, f"one plane ({height}x{width}) in pixels", height * width, limits.max_pixels, "max_pixels"
        )


def gunzip_prefix(data: bytes, size: int, name: str | Path) -> bytes:
    """The first `size` inflated bytes of a gzip stream (fewer if it is shorter); never inflates more."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        try:
            return stream.read(size)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise ImageReadError(name, "unreadable", f"truncated or corrupt gzip data ({err})") from err


def scale_to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linearly map [low, high] (default: the array's finite min and max) to [0, 255] as uint8, clipping outside.

    NaN and infinities become `low`. A constant array maps to all zeros.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if low is None or high is None:
        if not finite.any():
            return np.zeros(values.shape, dtype=np.uint8)
        low = float(values[finite].min()) if low is None else low
        high = float(values[finite].max()) if high is None else high
    values = np.where(finite, values, low)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> (H, W, 3)."""
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
