"""Head CT: the InVesalius example case (Debian package invesalius-examples) with bone and head masks."""

from __future__ import annotations

import functools
import logging
import plistlib
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medplib.data.image import scale_to_uint8
from medplib_datasets import files
from medplib_datasets.mini.rows import (
    CLASS_BONE,
    CLASS_HEAD,
    CLASS_SOFT_TISSUE,
    MIN_REGION_PX,
    FileRegistry,
    SliceRows,
    SourceResult,
    pick,
    slab_splits,
    source_rng,
    standard_vqa,
)

logger = logging.getLogger(__name__)

INVESALIUS_LICENCE = """\
Head CT "ProMED CT 0051" from the InVesalius example project Cranium.inv3 (Debian package invesalius-examples),
Copyright 2008-2021 Centro de Tecnologia da Informacao Renato Archer, licensed GPL-2. Images and masks derived from
it are distributed under the GPL-2 as well."""


@functools.lru_cache(maxsize=1)
def load_head_ct() -> dict[str, Any] | None:
    """The Cranium.inv3 CT volume (z, y, x int16 HU; z runs inferior to superior) with head and bone masks.

    The masks follow the two threshold masks stored in the project (bone: HU in the first mask's range; head: the
    second mask's range), restricted to the largest 3D component (drops the head rest) with holes filled per slice.
    """
    path = files.deb_file("invesalius-examples", "Cranium.inv3")
    if path is None:
        return None
    with tarfile.open(path) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}

        def read(name: str) -> bytes:
            handle = archive.extractfile(members[name])
            assert handle is not None, f"{path}: {name} is not a regular file"
            return handle.read()

        meta = plistlib.loads(read("main.plist"))
        shape = tuple(meta["matrix"]["shape"])
        ct = np.frombuffer(read(meta["matrix"]["filename"]), dtype=meta["matrix"]["dtype"]).reshape(shape)
        thresholds = [plistlib.loads(read(f"mask_{i}.plist"))["threshold_range"] for i in (0, 1)]
    bone_range, head_range = sorted(thresholds, key=lambda r: -r[0])
    head_raw = (ct >= head_range[0]) & (ct <= head_range[1])
    components, n_components = ndimage.label(head_raw)
    if n_components == 0:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    head = components == largest
    head = np.stack([ndimage.binary_fill_holes(s) for s in head])
    bone = (ct >= bone_range[0]) & (ct <= bone_range[1]) & head
    return {"ct": ct, "head": head, "bone": bone, "name": str(meta.get("name", "Cranium"))}


def rows_head_ct(registry: FileRegistry, seed: int) -> SourceResult | None:
    data = load_head_ct()
    if data is None:
        logger.info(
            "skipping head CT: Debian package invesalius-examples not installed (apt-get install invesalius-examples)"
        )
        return None
    rng = source_rng(seed, "invesalius")
    ct, head, bone = data["ct"], data["head"], data["bone"]
    candidates = [int(z) for z in np.nonzero(head.sum(axis=(1, 2)) >= 500)[0]]
    case = data["name"].replace(" ", "-").replace("--", "-")
    rows: list[dict[str, Any]] = []
    for z, split in sorted(slab_splits(candidates, rng).items()):
        # stored rows run posterior to anterior; flip so anterior is up as in the MRI slices
        image = scale_to_uint8(np.flipud(ct[z]), -160.0, 240.0)  # brain window, level 40 HU / width 400 HU
        head_2d, bone_2d = np.flipud(head[z]).copy(), np.flipud(bone[z]).copy()
        soft_2d = head_2d & ~bone_2d
        stem = f"ct_00--InVesalius-Cranium--{case}--z_{z:04d}"
        image_path = registry.add(f"images/{stem}.png", lambda i=image: i)
        rows_here = SliceRows(stem, image_path, "ct", split, "InVesalius-CT", registry, rng)
        standard_vqa(rows_here, "CT", "the head", "axial")
        has_bone = bool(bone_2d.sum() >= MIN_REGION_PX)
        rows_here.add_vqa("presence", "Is bone visible in this slice?", "yes" if has_bone else "no", "closed")
        head_path = rows_here.mask_path(CLASS_HEAD, 0, lambda m=head_2d: m)
        rows_here.add_grounding("head", "head", head_path)
        template = "Is the region {region} bone or soft tissue?"
        if has_bone:
            bone_path = rows_here.mask_path(CLASS_BONE, 0, lambda m=bone_2d: m)
            rows_here.add_grounding("bone", "bone", bone_path)
            rows_here.add_region_vqa(
                "tissue", template, "bone", "closed", pick(rng, ("point", "mask")), bone_2d, bone_path
            )
        if soft_2d.sum() >= MIN_REGION_PX:
            soft_path = rows_here.mask_path(CLASS_SOFT_TISSUE, 0, lambda m=soft_2d: m)
            rows_here.add_region_vqa(
                "tissue", template, "soft tissue", "closed", pick(rng, ("point", "mask")), soft_2d, soft_path
            )
        rows += rows_here.rows
    return SourceResult(
        "InVesalius Cranium (head CT)",
        rows,
        INVESALIUS_LICENCE,
        [f"invesalius-examples: {case} in Cranium.inv3"],
    )
