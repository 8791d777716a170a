"""Pictures people can look at: an image with its masks filled in and its region prompts outlined, and a mosaic of
such pictures for the slices of a volume. numpy only (no plotting library), uint8 RGB out."""

from __future__ import annotations

import math

import numpy as np

from medplib.data.schema import Box, Point

MASK_COLOURS = ((255, 40, 30), (40, 200, 255), (255, 210, 0), (190, 80, 255))
PROMPT_COLOUR = (0, 255, 255)
MASK_ALPHA = 0.45


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(
    image: np.ndarray, masks: list[np.ndarray] = (), regions: list[Point | Box | np.ndarray] = ()
) -> np.ndarray:
    """uint8 (H, W, 3): each mask filled (semi-transparent, one colour each), each prompt in cyan (a point as a
    cross, a box as its rectangle, a mask prompt as its outline)."""
    out = image.astype(np.float32).copy()
    h, w = out.shape[:2]
    for k, mask in enumerate(masks):
        colour = np.asarray(MASK_COLOURS[k % len(MASK_COLOURS)], dtype=np.float32)
        m = mask.astype(bool)
        out[m] = (1 - MASK_ALPHA) * out[m] + MASK_ALPHA * colour
        out[_outline(m)] = colour
    out = out.astype(np.uint8)
    for region in regions:
        if isinstance(region, Point):
            x, y = int(region.x), int(region.y)
            arm = max(3, min(h, w) // 40)
            out[max(0, y - arm) : y + arm + 1, min(max(x, 0), w - 1)] = PROMPT_COLOUR
            out[min(max(y, 0), h - 1), max(0, x - arm) : x + arm + 1] = PROMPT_COLOUR
        elif isinstance(region, Box):
            x0, y0 = int(region.x0), int(region.y0)
            x1, y1 = min(w - 1, int(math.ceil(region.x1)) - 1), min(h - 1, int(math.ceil(region.y1)) - 1)
            out[y0, x0 : x1 + 1] = out[y1, x0 : x1 + 1] = PROMPT_COLOUR
            out[y0 : y1 + 1, x0] = out[y0 : y1 + 1, x1] = PROMPT_COLOUR
        else:
            out[_outline(np.asarray(region).astype(bool))] = PROMPT_COLOUR
    return out


def mosaic(tiles: list[np.ndarray], columns: int | None = None, gap_px: int = 2) -> np.ndarray:
    """Equal-sized uint8 (H, W, 3) tiles in a grid, row by row, separated by `gap_px` of black."""
    if not tiles:
        raise ValueError("mosaic needs at least one tile")
    h, w = tiles[0].shape[:2]
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    out = np.zeros((rows * h + (rows - 1) * gap_px, columns * w + (columns - 1) * gap_px, 3), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        out[r * (h + gap_px) : r * (h + gap_px) + h, c * (w + gap_px) : c * (w + gap_px) + w] = tile
    return out


def strip_slices(candidates: list[int], count: int, most: int) -> list[int]:
    """At most `most` slices, evenly spread over `candidates` (e.g. where a mask is), else over all `count`."""
    pool = candidates or list(range(count))
    if len(pool) <= most:
        return list(pool)
    return [pool[int(round(i))] for i in np.linspace(0, len(pool) - 1, most)]
