"""How an image of MeCoVQA-mini becomes rows: the three task types with their question templates and region
prompts, the slab splits, and the image and mask files the kept rows refer to."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

MIN_REGION_PX = 40  # a structure counts as visible in a slice from this many pixels
SLAB_GAP_SLICES = 5  # unused slices between slabs of different splits
# One period of the slab pattern along each axis: (split, slab width in slices); a gap follows every slab.
SLAB_PATTERN = (("train", 30), ("val", 6), ("test", 9))
PNG_COMPRESS_LEVEL = 1

# Class ids for masks/<stem>--{class_id:04d}_{instance:03d}.png. 1-83 are the Desikan-Killiany atlas ids.
CLASS_BRAIN, CLASS_CSF, CLASS_GM, CLASS_WM = 100, 101, 102, 103
CLASS_BONE, CLASS_HEAD, CLASS_SOFT_TISSUE = 200, 201, 202
CLASS_NUCLEUS, CLASS_ALL_NUCLEI = 300, 301
TISSUE_NAMES = {CLASS_CSF: "cerebrospinal fluid", CLASS_GM: "grey matter", CLASS_WM: "white matter"}

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


def source_rng(seed: int, stream: str) -> np.random.Generator:
    """A generator per source, so adding a source never changes the rows of another."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


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
        self._row("vqa", kind, question, sentence(answer), answer_type, [])

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
            sentence(answer),
            answer_type,
            files,
        )
        if regions is not None:
            row["regions"] = regions

    def add_grounding(self, kind: str, name: str, mask_path: str) -> None:
        question = pick(self.rng, QUESTION_SEGMENT).format(name=name)
        answer = f"Sure, it is <SEG><mask>{mask_path}</mask>."
        self._row("grounding", kind, question, answer, "open", [mask_path])


@dataclass
class SourceResult:
    """Rows of one source plus what the README says about it."""

    name: str
    rows: list[dict[str, Any]]
    licence: str
    files: list[str]


def standard_vqa(rows: SliceRows, modality_answer: str, organ_answer: str | None, plane: str | None) -> None:
    rows.add_vqa("modality", pick(rows.rng, QUESTION_MODALITY), modality_answer, "open")
    if organ_answer:
        rows.add_vqa("organ", pick(rows.rng, QUESTION_ORGAN), organ_answer, "open")
    if plane:
        rows.add_vqa("plane", pick(rows.rng, QUESTION_PLANE), plane.capitalize(), "closed")
