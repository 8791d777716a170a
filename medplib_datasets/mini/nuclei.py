"""Fluorescence microscopy: the DSB2018 nuclei image that stardist ships, cut into 128 px tiles, with its instance
masks."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from medplib.data.image import scale_to_uint8
from medplib_datasets import files
from medplib_datasets.mini.rows import (
    CLASS_ALL_NUCLEI,
    CLASS_NUCLEUS,
    MIN_REGION_PX,
    QUESTION_STRUCTURE,
    FileRegistry,
    SliceRows,
    SourceResult,
    pick,
    source_rng,
    standard_vqa,
)

logger = logging.getLogger(__name__)

NUCLEI_TILE_PX = 128

STARDIST_LICENCE = """\
DSB2018 nuclei image and instance mask (img2d.tif, mask2d.tif) and the H&E tile (histo.jpg), as bundled in stardist
(BSD-3-Clause; Schmidt et al., MICCAI 2018). The nuclei image comes from the 2018 Data Science Bowl / BBBC038
(Caicedo et al., Nature Methods 2019), released under CC0. histo.jpg originates from The Cancer Imaging Archive;
check TCIA's data usage policy before redistributing it."""


@functools.lru_cache(maxsize=1)
def load_nuclei() -> dict[str, Any] | None:
    """The DSB2018 fluorescence image (uint8) with its nucleus instance ids, from stardist's data folder."""
    stardist_dir = files.package_dir("stardist")
    if stardist_dir is None or files.package_dir("tifffile") is None:
        return None
    import tifffile

    folder = stardist_dir / "data" / "images"
    raw = tifffile.imread(folder / "img2d.tif").astype(np.float32)
    instances = tifffile.imread(folder / "mask2d.tif").astype(np.int32)
    image = scale_to_uint8(raw, 0.0, float(np.percentile(raw, 99.8)))
    return {"image": image, "instances": instances}


def _nuclei_tile_split(row: int, col: int, n_cols: int) -> str:
    """Left image half -> train; right half: top tile row -> val, the rest -> test."""
    if col < n_cols // 2:
        return "train"
    return "val" if row == 0 else "test"


def rows_nuclei(registry: FileRegistry, seed: int) -> SourceResult | None:
    data = load_nuclei()
    if data is None:
        logger.warning(
            "skipping microscopy: stardist's data files or tifffile are missing (pip install --no-deps stardist; "
            "pip install 'medplib[datasets]')"
        )
        return None
    rng = source_rng(seed, "stardist")
    image, instances = data["image"], data["instances"]
    areas = np.bincount(instances.ravel())
    n_rows, n_cols = image.shape[0] // NUCLEI_TILE_PX, image.shape[1] // NUCLEI_TILE_PX
    rows: list[dict[str, Any]] = []
    for tile_row in range(n_rows):
        for tile_col in range(n_cols):
            window = np.s_[
                tile_row * NUCLEI_TILE_PX : (tile_row + 1) * NUCLEI_TILE_PX,
                tile_col * NUCLEI_TILE_PX : (tile_col + 1) * NUCLEI_TILE_PX,
            ]
            tile, ids = image[window].copy(), instances[window].copy()
            stem = f"microscopy_fluorescence--DSB2018--stardist-img2d--tile_r{tile_row}c{tile_col}"
            image_path = registry.add(f"images/{stem}.png", lambda t=tile: t)
            rows_here = SliceRows(
                stem,
                image_path,
                "microscopy",
                _nuclei_tile_split(tile_row, tile_col, n_cols),
                "stardist-DSB2018",
                registry,
                rng,
            )
            counts = np.bincount(ids.ravel(), minlength=areas.size)
            visible = [int(i) for i in np.nonzero(counts >= MIN_REGION_PX)[0] if i != 0]
            mostly_inside = [i for i in visible if counts[i] >= 0.5 * areas[i]]
            standard_vqa(rows_here, "fluorescence microscopy", "cell nuclei", None)
            rows_here.add_vqa(
                "count",
                "How many cell nuclei are in this image? Count nuclei that lie at least half inside the image.",
                str(len(mostly_inside)),
                "open",
            )
            if not visible:
                rows += rows_here.rows
                continue
            all_nuclei = ids > 0
            rows_here.add_grounding(
                "all_nuclei", "cell nuclei", rows_here.mask_path(CLASS_ALL_NUCLEI, 0, lambda m=all_nuclei: m)
            )
            whole = [i for i in visible if counts[i] == areas[i]]
            if len(whole) >= 2:
                largest = max(whole, key=lambda i: (counts[i], -i))
                mask = ids == largest
                rows_here.add_grounding(
                    "largest_nucleus",
                    "largest nucleus",
                    rows_here.mask_path(CLASS_NUCLEUS, visible.index(largest), lambda m=mask: m),
                )
            for position in rng.permutation(len(visible))[:6]:
                instance = visible[int(position)]
                mask = ids == instance
                mask_path = rows_here.mask_path(CLASS_NUCLEUS, int(position), lambda m=mask: m)
                prompt = pick(rng, ("point", "box", "mask"))
                rows_here.add_region_vqa(
                    "structure",
                    pick(rng, QUESTION_STRUCTURE),
                    "a cell nucleus",
                    "open",
                    prompt,
                    mask,
                    mask_path,
                )
            # closed yes/no questions: one prompt on a nucleus, one on background far from any nucleus
            background = ids == 0
            if background.sum() >= MIN_REGION_PX:
                template = "Is there a cell nucleus in the region {region}?"
                instance = visible[int(rng.integers(len(visible)))]
                rows_here.add_region_vqa(
                    "nucleus_presence", template, "yes", "closed", "point", ids == instance, ""
                )
                rows_here.add_region_vqa(
                    "nucleus_presence", template, "no", "closed", "point", background, ""
                )
            rows += rows_here.rows
    return SourceResult(
        "DSB2018 nuclei (fluorescence microscopy)",
        rows,
        STARDIST_LICENCE,
        ["stardist: data/images/img2d.tif, mask2d.tif, histo.jpg"],
    )
