"""Image geometry: the vision-tower and SAM views (resize the longest side, pad to a square), region prompts
as masks, and the inverse mapping used to put predicted masks back onto the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medplib.data.schema import Box, MaskRef, Point, RegionPrompt


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside a square view of side `size`."""

    orig_h: int
    orig_w: int
    size: int
    resized_h: int
    resized_w: int
    pad_top: int
    pad_left: int

    @classmethod
    def fit(cls, orig_h: int, orig_w: int, size: int, pad_mode: str) -> Geometry:
        if orig_h <= 0 or orig_w <= 0:
            raise ValueError(f"image of size {orig_h}x{orig_w} has no pixels")
        scale = size / max(orig_h, orig_w)
        rh, rw = max(1, int(orig_h * scale + 0.5)), max(1, int(orig_w * scale + 0.5))
        if pad_mode == "center":
            top, left = (size - rh) // 2, (size - rw) // 2
        elif pad_mode == "corner":
            top, left = 0, 0
        else:
            raise ValueError(f"pad_mode must be 'center' or 'corner', got {pad_mode!r}")
        return cls(orig_h, orig_w, size, rh, rw, top, left)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.orig_h, self.orig_w, self.size, self.resized_h, self.resized_w, self.pad_top, self.pad_left]
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Geometry:
        return cls(*[int(v) for v in t.tolist()])


def to_square(
    image: np.ndarray,
    size: int,
    pad_mode: str,
    pad_value: tuple[int, int, int] | int = 0,
    nearest: bool = False,
) -> tuple[np.ndarray, Geometry]:
    """Resize so the longest side is `size`, then pad to size x size (uint8 HxWx3 or bool HxW)."""
    geo = Geometry.fit(image.shape[0], image.shape[1], size, pad_mode)
    is_mask = image.dtype == bool
    pil = Image.fromarray(image.astype(np.uint8) * 255 if is_mask else image)
    resample = Image.NEAREST if (nearest or is_mask) else Image.BILINEAR
    resized = np.asarray(pil.resize((geo.resized_w, geo.resized_h), resample))
    if is_mask:
        out = np.zeros((size, size), dtype=bool)
        resized = resized > 127
    else:
        out = np.empty((size, size, 3), dtype=np.uint8)
        out[:] = pad_value
    out[geo.pad_top : geo.pad_top + geo.resized_h, geo.pad_left : geo.pad_left + geo.resized_w] = resized
    return out, geo


def normalize(
    view: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], scale: float
) -> torch.Tensor:
    """uint8 HxWx3 -> float CHW, (x*scale - mean)/std."""
    x = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1).float() * scale
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def normalize_view(
    view: np.ndarray,
    geo: Geometry,
    mode: str,
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
    scale: float = 1.0,
) -> torch.Tensor:
    """A square uint8 view -> float CHW, by the encoder's own convention (`mode`):

    * "mean_std": `(x * scale - mean) / std` everywhere, padding included (CLIP, SAM, SAM-Med2D);
    * "min_max": LiteMedSAM's `(x - min) / max(max - min, 1e-8)` with min and max taken over the resized image
      (all channels), and the padding set to 0 after scaling, as LiteMedSAM pads its normalised image.
    """
    if mode == "mean_std":
        return normalize(view, mean, std, scale)
    if mode != "min_max":
        raise ValueError(f"normalization must be 'mean_std' or 'min_max', got {mode!r}")
    rows = slice(geo.pad_top, geo.pad_top + geo.resized_h)
    cols = slice(geo.pad_left, geo.pad_left + geo.resized_w)
    image = torch.from_numpy(np.ascontiguousarray(view[rows, cols])).permute(2, 0, 1).double()
    lo, hi = image.min(), image.max()
    out = torch.zeros((3, view.shape[0], view.shape[1]), dtype=torch.float32)
    out[:, rows, cols] = ((image - lo) / torch.clamp(hi - lo, min=1e-8)).float()
    return out


def region_to_mask(
    region: RegionPrompt | np.ndarray,
    hw: tuple[int, int],
    point_square_px: int,
    data_root: Path | None = None,
) -> np.ndarray:
    """A region prompt -> a bool mask of the original image size, the way the upstream demo draws them:
    a point becomes a filled square of side `point_square_px` around it, a box the filled box; a mask is a
    `MaskRef` PNG or an in-memory array (nonzero = inside)."""
    h, w = hw
    mask = np.zeros((h, w), dtype=bool)
    if isinstance(region, np.ndarray):
        mask = region.astype(bool) if region.ndim == 2 else region.any(axis=-1)
        if mask.shape != (h, w):
            raise ValueError(f"region mask is {mask.shape[1]}x{mask.shape[0]}, the image is {w}x{h}")
    elif isinstance(region, Point):
        if not (0 <= region.x < w and 0 <= region.y < h):
            raise ValueError(f"point ({region.x}, {region.y}) lies outside the {w}x{h} image")
        half = point_square_px // 2
        cx, cy = int(region.x), int(region.y)
        mask[max(0, cy - half) : cy + half + 1, max(0, cx - half) : cx + half + 1] = True
    elif isinstance(region, Box):
        if region.x0 < 0 or region.y0 < 0 or region.x1 > w or region.y1 > h:
            raise ValueError(
                f"box ({region.x0}, {region.y0}, {region.x1}, {region.y1}) lies outside the {w}x{h} image"
            )
        x0, y0 = int(np.floor(region.x0)), int(np.floor(region.y0))
        x1, y1 = max(x0 + 1, int(np.ceil(region.x1))), max(y0 + 1, int(np.ceil(region.y1)))
        mask[y0:y1, x0:x1] = True
    elif isinstance(region, MaskRef):
        from medplib.data.image import load_mask

        path = Path(region.path) if data_root is None else Path(data_root) / region.path
        mask = load_mask(path)
        if mask.shape != (h, w):
            raise ValueError(f"region mask {path} is {mask.shape[1]}x{mask.shape[0]}, the image is {w}x{h}")
    else:  # pragma: no cover - pydantic guarantees the union
        raise TypeError(f"unknown region prompt {region!r}")
    if not mask.any():
        what = "mask array" if isinstance(region, np.ndarray) else repr(region)
        raise ValueError(f"region prompt {what} is empty: it covers no pixel of the {w}x{h} image")
    return mask


def region_cells(mask_view: torch.Tensor, grid: int, min_coverage: float, max_points: int) -> torch.Tensor:
    """Indices (row-major) of the patch cells a view-space region mask covers.

    A cell belongs to the region when at least `min_coverage` of it is covered. A region too small for any cell
    (a thin structure, a point far smaller than a patch) falls back to its best-covered cells, so it never
    vanishes (upstream drops such samples). At most `max_points` cells, evenly spaced.
    """
    coverage = torch.nn.functional.adaptive_avg_pool2d(mask_view.float()[None, None], grid).flatten()
    if coverage.max() <= 0:
        raise ValueError("region mask is empty in the model's view")
    cells = torch.nonzero(coverage >= min_coverage).flatten()
    if cells.numel() == 0:
        cells = torch.nonzero(coverage == coverage.max()).flatten()
    if cells.numel() > max_points:
        cells = cells[torch.linspace(0, cells.numel() - 1, max_points).round().long()]
    return cells


def unpad_mask_logits(logits: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Square-view mask logits (..., s, s) at any resolution -> logits at the original image size.

    Upsample to the view size first, crop the padded border there, then resize to the original size; the
    upstream code cropped at the wrong scale and stretched masks on non-square images.
    """
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    x = torch.nn.functional.interpolate(x, size=(geo.size, geo.size), mode="bilinear", align_corners=False)
    x = x[..., geo.pad_top : geo.pad_top + geo.resized_h, geo.pad_left : geo.pad_left + geo.resized_w]
    x = torch.nn.functional.interpolate(
        x, size=(geo.orig_h, geo.orig_w), mode="bilinear", align_corners=False
    )
    return x.reshape(*lead, geo.orig_h, geo.orig_w)
