"""Images without masks for modality, organ and plane questions: pydicom's CT/MR/ultrasound test DICOMs, ITK's 2D
slices, stardist's H&E tile and scikit-image's retina and IHC images."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from medplib.data.image import load_image
from medplib_datasets import files
from medplib_datasets.mini.rows import FileRegistry, SliceRows, SourceResult, source_rng, standard_vqa

logger = logging.getLogger(__name__)

PYDICOM_LICENCE = """\
pydicom test files (pydicom, MIT): CT_small.dcm and MR_small.dcm are downsized NEMA WG04 samples; the other
DICOMs come from public sample collections (see pydicom/data/test_files/README.txt, whose author believes there is
no restriction on their use)."""


@dataclass(frozen=True)
class ModalityImage:
    """An image without masks, used for modality/organ/plane questions."""

    origin: str  # "pydicom", "itk", "stardist" or "skimage"
    file_name: str
    modality: str  # schema modality key
    modality_answer: str
    organ_answer: str | None
    plane: str | None
    split: str
    stem: str


# fmt: off
MODALITY_IMAGES = (
    # origin, file, modality key, modality answer, organ answer, plane, split, image stem
    ModalityImage("pydicom", "CT_small.dcm", "ct", "CT", "the lumbar spine", "axial", "train",
                  "ct_00--pydicom-NEMA-WG04--CT_small--2d_0000"),
    ModalityImage("pydicom", "MR_small.dcm", "mri", "MRI", None, None, "train",
                  "mr_00--pydicom-NEMA-WG04--MR_small--2d_0000"),
    ModalityImage("pydicom", "examples_rgb_color.dcm", "ultrasound", "ultrasound (colour Doppler)", None, None,
                  "train", "us_00--pydicom-examples--rgb_color--2d_0000"),
    ModalityImage("pydicom", "examples_ybr_color.dcm", "ultrasound", "ultrasound", None, None, "train",
                  "us_00--pydicom-examples--ybr_color--2d_0000"),
    ModalityImage("itk", "BrainT1Slice.png", "mri", "MRI (T1-weighted)", "the brain", "axial", "train",
                  "mr_t1--ITK-BrainWeb--BrainT1Slice--2d_0000"),
    ModalityImage("itk", "FatMRISlice.png", "mri", "MRI", "the abdomen", "axial", "train",
                  "mr_00--ITK-examples--FatMRISlice--2d_0000"),
    ModalityImage("stardist", "histo.jpg", "microscopy", "brightfield microscopy (H&E-stained histology)", None,
                  None, "train", "microscopy_he--stardist--histo--2d_0000"),
    ModalityImage("skimage", "retina.jpg", "fundus", "fundus photography", "the retina", None, "train",
                  "fundus_00--skimage--retina--2d_0000"),
    ModalityImage("skimage", "ihc.png", "microscopy", "brightfield microscopy (immunohistochemistry)", None, None,
                  "train", "microscopy_ihc--skimage--ihc--2d_0000"),
    ModalityImage("pydicom", "J2K_pixelrep_mismatch.dcm", "ct", "CT", "the head", "axial", "test_xsubject",
                  "ct_00--pydicom-examples--J2K_pixelrep_mismatch--2d_0000"),
    ModalityImage("pydicom", "693_J2KI.dcm", "ct", "CT", "the head", "axial", "test_xsubject",
                  "ct_00--pydicom-examples--693_J2KI--2d_0000"),
    ModalityImage("pydicom", "examples_overlay.dcm", "mri", "MRI", "the abdomen", "axial", "test_xsubject",
                  "mr_00--pydicom-examples--overlay--2d_0000"),
    ModalityImage("pydicom", "examples_palette.dcm", "ultrasound", "ultrasound", None, None, "test_xsubject",
                  "us_00--pydicom-examples--palette--2d_0000"),
    ModalityImage("itk", "BrainProtonDensitySlice.png", "mri", "MRI (proton density-weighted)", "the brain",
                  "axial", "test_xsubject", "mr_pd--ITK-BrainWeb--BrainProtonDensitySlice--2d_0000"),
    ModalityImage("itk", "BrainMidSagittalSlice.png", "mri", "MRI", "the brain", "sagittal", "test_xsubject",
                  "mr_00--ITK-examples--BrainMidSagittalSlice--2d_0000"),
)
# fmt: on


@functools.cache
def load_modality_image(spec: ModalityImage) -> np.ndarray | None:
    """The image as uint8 (grey or RGB), or None when its package (or a decoder it needs) is missing."""
    try:
        if spec.origin == "pydicom":
            pydicom_dir = files.package_dir("pydicom")
            path = pydicom_dir / "data" / "test_files" / spec.file_name if pydicom_dir else None
            # The project's own DICOM reader: windowing, MONOCHROME1, colour, the middle frame.
            return load_image(path) if path is not None and path.is_file() else None
        if spec.origin == "itk":
            path = files.deb_file("insighttoolkit5-examples", spec.file_name)
        else:  # stardist's data/images or scikit-image's data folder, located without importing either
            folder = files.package_dir(spec.origin)
            subfolder = ("data", "images") if spec.origin == "stardist" else ("data",)
            path = folder.joinpath(*subfolder, spec.file_name) if folder else None
        if path is None or not path.is_file():
            return None
        image = Image.open(path)
        return np.asarray(
            image.convert("RGB" if image.mode in ("RGB", "RGBA", "P") and spec.origin != "itk" else "L")
        )
    except Exception as err:  # noqa: BLE001 - an undecodable sample is skipped, never fatal
        logger.info("skipping %s: %s", spec.file_name, err)
        return None


def rows_modality_only(registry: FileRegistry, seed: int) -> SourceResult | None:
    rng = source_rng(seed, "modality-only")
    rows: list[dict[str, Any]] = []
    used: list[str] = []
    origins: set[str] = set()
    for spec in MODALITY_IMAGES:
        image = load_modality_image(spec)
        if image is None:
            continue
        used.append(f"{spec.origin}: {spec.file_name}")
        origins.add(spec.origin)
        image_path = registry.add(f"images/{spec.stem}.png", lambda i=image: i)
        rows_here = SliceRows(
            spec.stem, image_path, spec.modality, spec.split, f"{spec.origin}-modality", registry, rng
        )
        standard_vqa(rows_here, spec.modality_answer, spec.organ_answer, spec.plane)
        if spec.modality in ("ct", "mri"):
            answer = "CT" if spec.modality == "ct" else "MRI"
            rows_here.add_vqa("modality_choice", "Is this a CT or an MRI image?", answer, "closed")
        rows += rows_here.rows
    if files.package_dir("skimage") is None:
        logger.info("scikit-image is not installed: its retina fundus and IHC images are not used (optional)")
    if not rows:
        return None
    notices = {
        "pydicom": PYDICOM_LICENCE,
        "itk": "ITK 2D slices: see the ITK notice.",
        "stardist": "H&E tile: see the stardist notice.",
        "skimage": "scikit-image data (BSD-3-Clause package): retina.jpg (Wikimedia Commons, CC0) and ihc.png "
        "(Wikimedia Commons, public domain); see the skimage.data docstrings for provenance.",
    }
    licence = "\n".join(notices[o] for o in sorted(origins))
    return SourceResult("modality-only images (no masks)", rows, licence, used)
