"""`build_mini`: every source's rows, capped and balanced when asked, written with the images and masks they use,
`classes.tsv` and a README with sources, licences, conventions and counts."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medplib_datasets.mini.brain import dk_name, load_icbm152, rows_icbm152
from medplib_datasets.mini.head_ct import rows_head_ct
from medplib_datasets.mini.modality import rows_modality_only
from medplib_datasets.mini.nuclei import rows_nuclei
from medplib_datasets.mini.rows import (
    CLASS_ALL_NUCLEI,
    CLASS_BONE,
    CLASS_BRAIN,
    CLASS_HEAD,
    CLASS_NUCLEUS,
    CLASS_SOFT_TISSUE,
    SLAB_GAP_SLICES,
    SLAB_PATTERN,
    TISSUE_NAMES,
    FileRegistry,
    SourceResult,
    source_rng,
)
from medplib_datasets.mini.volumes import VOLUME_ROWS_NAME, VOLUMES_DIR, write_volume_rows
from medplib_datasets.mini.xsubject import rows_fsl_mni152, rows_itk_subject

logger = logging.getLogger(__name__)

DATASET_NAME = "MeCoVQA-mini"
SPLITS = ("train", "val", "test", "test_xsubject")
# In build order; each returns None when its package is not installed.
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
    n_volume_rows: int = 0


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
            "no data source is installed: pip install 'medplib[datasets]' (see medplib_datasets/mini/)"
        )
    rows = [row for result in results for row in result.rows]
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
        rows = cap_rows(rows, max_samples, source_rng(seed, "cap"))
    referenced = {path for row in rows for path in row["_files"]}
    n_written = registry.write(root, referenced, progress=progress)
    for row in rows:
        del row["_files"]
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        write_rows(root / f"{DATASET_NAME}_{split}.json", split_rows)
    volume_rows = write_volume_rows(root)
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
        len(volume_rows),
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
        f"- `{VOLUMES_DIR}/{VOLUME_ROWS_NAME}`: volume-level grounding rows for 3-D evaluation (`medplib eval "
        f"--volumes`): whole NIfTI volumes with one 3-D mask each (the ICBM152 brain and 15 deep Desikan-Killiany "
        "structures, split test; the ITK real-subject T1 brain, split test_xsubject); `image` and `mask` are relative "
        f"to `{VOLUMES_DIR}/`.",
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
        "- Modality-only images are assigned to train or test_xsubject by a fixed table in medplib_datasets/mini/modality.py.",
        "",
        "## Counts",
        "",
        f"{report.n_rows} rows, {report.n_images} images, {report.n_masks} masks; {report.n_volume_rows} volume rows.",
    ]
    for key, counts in report.counts.items():
        sections += ["", f"### by {key}", "", _table(counts)]
    sections += ["", "## Sources and licences", ""]
    for result in results:
        sections += [f"### {result.name}", "", "Files: " + "; ".join(result.files), "", result.licence, ""]
    (root / "README.md").write_text("\n".join(sections) + "\n")
