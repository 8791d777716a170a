"""Volume-level grounding rows for 3-D evaluation: whole volumes with one 3-D target mask per row, written to
`DIR/volumes/` (outside the folder `medplib data prepare` reads, since these rows are not 2-D samples).

* the ICBM152 T1 template (RAS, 1 mm) with the brain and the 15 deep Desikan-Killiany structures (split `test`:
  the template's slices are also in train, so this measures 3-D fit, not generalisation);
* ITK's real-subject T1, as stored (L-S-A, with skull), with its brain mask (split `test_xsubject`: another subject).

A row: `id`, `image` and `mask` (NIfTI paths relative to `volumes/`; the mask has the image's shape and affine),
`question`, `structure` (the name scores are grouped by), `axis` (the RAS axis to read slices along), `split`,
`modality`, `source`. Files are gzipped with a fixed timestamp, so a rebuild is byte-identical.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medplib_datasets import files
from medplib_datasets.mini.brain import DK_DEEP_LABELS, dk_name, load_icbm152

logger = logging.getLogger(__name__)

VOLUMES_DIR = "volumes"
VOLUME_ROWS_NAME = "MeCoVQA-mini_volumes.json"
ICBM_STEM = "mr_t1--ICBM152-2009a--nlin-sym"
ITK_STEM = "mr_t1--ITK-examples--KmeansTest-T1"


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), mtime=0))


def _row(stem: str, image: str, mask: str, structure: str, split: str, source: str) -> dict[str, Any]:
    return {
        "id": f"{stem}--{structure.replace(' ', '-')}",
        "image": image,
        "mask": mask,
        "question": f"Please segment the {structure}.",
        "structure": structure,
        "axis": 2,
        "split": split,
        "modality": "mri",
        "source": source,
    }


def write_volume_rows(root: str | Path) -> list[dict[str, Any]]:
    """Write the volumes, their masks and `volumes/MeCoVQA-mini_volumes.json` under `root`; returns the rows."""
    folder = Path(root) / VOLUMES_DIR
    rows: list[dict[str, Any]] = []
    icbm = load_icbm152()
    if icbm is not None:
        image = f"{ICBM_STEM}.nii.gz"
        _save(folder / image, icbm["t1"], icbm["affine"])
        targets = [("brain", icbm["brain"])]
        for region_id, (label, hemisphere) in sorted(icbm["info"].items()):
            if label in DK_DEEP_LABELS:
                targets.append((dk_name(label, hemisphere, True)[4:], icbm["atlas"] == region_id))
        for structure, mask in targets:
            mask_path = f"masks/{ICBM_STEM}--{structure.replace(' ', '-')}.nii.gz"
            _save(folder / mask_path, mask.astype(np.uint8), icbm["affine"])
            rows.append(_row(ICBM_STEM, image, mask_path, structure, "test", "ICBM152+DK"))
    t1_path = files.deb_file("insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz")
    brain_path = files.deb_file("insighttoolkit5-examples", "KmeansTest_T1RawSkullStrip.nii.gz")
    if t1_path is not None and brain_path is not None:
        import nibabel as nib

        t1, brain = nib.load(t1_path), nib.load(brain_path)
        image, mask_path = f"{ITK_STEM}.nii.gz", f"masks/{ITK_STEM}--brain.nii.gz"
        _save(folder / image, np.asarray(t1.dataobj), t1.affine)  # as stored (L-S-A): the reader reorients
        _save(folder / mask_path, (np.asarray(brain.dataobj) > 0).astype(np.uint8), t1.affine)
        rows.append(_row(ITK_STEM, image, mask_path, "brain", "test_xsubject", "ITK-T1"))
    else:
        logger.info("no cross-subject volume row: insighttoolkit5-examples not installed")
    if rows:
        (folder / VOLUME_ROWS_NAME).write_text(json.dumps(rows, indent=1) + "\n")
    return rows
