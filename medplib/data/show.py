"""Contact sheet of MeCoVQA-format samples: `medplib data show DIR_OR_JSON [--n 16] [--out sheet.png]`.

Each cell shows the image with the target masks of `<SEG>` filled in red, region prompts in cyan (a mask prompt
as its outline, a point as a cross with the 41x41 square that upstream's demo turns a point into, a box as a
rectangle) and the conversation as a wrapped caption. Rows are read with `medplib.data.parse.parse_row`, so both
the upstream inline form and our explicit form display the same way; rows that do not parse are skipped with a
log line. Samples are drawn round-robin over tasks so that a small sheet shows all three.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medplib.data.image import ImageReadError, load_image, load_mask
from medplib.data.parse import ParseError, parse_row
from medplib.data.schema import Box, MaskRef, Point, Sample

logger = logging.getLogger(__name__)

POINT_SQUARE_PX = 41  # upstream's demo turns a point prompt into a filled 41x41 square
CAPTION_WIDTH_CHARS = 46
CAPTION_MAX_LINES = 9
TARGET_RGBA = (1.0, 0.15, 0.1, 0.45)
PROMPT_COLOUR = "cyan"


def _row_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
    if not path.exists():
        raise FileNotFoundError(f"dataset folder or annotation file not found: {path}")
    return [path]


def _read_raw_rows(path: Path) -> list[Any]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                logger.info("%s:%d: not JSON (%s), skipped", path, number, err)
    return rows


def read_samples(path: str | Path) -> tuple[Path, list[Sample]]:
    """(data root, samples) for a dataset folder (every .json/.jsonl in it) or one annotation file."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    samples: list[Sample] = []
    for file in _row_files(path):
        raw_rows = _read_raw_rows(file)
        if not isinstance(raw_rows, list):
            logger.info("%s holds no list of rows, skipped", file)
            continue
        for index, raw in enumerate(raw_rows):
            try:
                samples.append(parse_row(raw, source=file, index=index))
            except ParseError as err:
                logger.info("%s[%d] skipped: %s", file, index, err)
    return root, samples


def pick_samples(
    samples: list[Sample], n: int, seed: int = 0, task: str | None = None, split: str | None = None
) -> list[Sample]:
    """`n` samples drawn at random, round-robin over tasks, after optional task/split filters."""
    pool = [s for s in samples if (task is None or s.task == task) and (split is None or s.split == split)]
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[Sample]] = defaultdict(list)
    for sample in pool:
        by_task[sample.task].append(sample)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_task.items())]
    picked: list[Sample] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def _caption(sample: Sample) -> str:
    lines = [f"{sample.id}", f"[{sample.task} | {sample.split or '-'} | {sample.answer_type or '-'}]"]
    for turn in sample.turns:
        text = turn.text.replace("<image>\n", "").replace("<region></region>", "<region>").strip()
        prefix = "Q: " if turn.role == "human" else "A: "
        lines += textwrap.wrap(prefix + text, CAPTION_WIDTH_CHARS, subsequent_indent="   ")
    if len(lines) > CAPTION_MAX_LINES:
        lines = lines[: CAPTION_MAX_LINES - 1] + ["   ..."]
    return "\n".join(lines)


def _draw_sample(ax: Any, sample: Sample, root: Path) -> None:
    from matplotlib.patches import Rectangle

    ax.set_xticks([])
    ax.set_yticks([])
    if sample.image is None:
        ax.text(0.5, 0.5, "(no image)", ha="center", va="center", transform=ax.transAxes)
    else:
        try:
            image = load_image(root / sample.image, view=sample.view)
        except ImageReadError as err:
            ax.text(
                0.5,
                0.5,
                f"unreadable image\n{err}",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=6,
                wrap=True,
            )
            image = None
        if image is not None:
            ax.imshow(image, interpolation="nearest")
            height, width = image.shape[:2]
            for mask_path in sample.masks:
                try:
                    mask = load_mask(root / mask_path)
                except ImageReadError as err:
                    logger.info("%s: %s", sample.id, err)
                    continue
                overlay = np.zeros((*mask.shape, 4), dtype=np.float32)
                overlay[mask] = TARGET_RGBA
                ax.imshow(overlay, interpolation="nearest")
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
            for prompt in sample.regions:
                if isinstance(prompt, MaskRef):
                    try:
                        mask = load_mask(root / prompt.path)
                    except ImageReadError as err:
                        logger.info("%s: %s", sample.id, err)
                        continue
                    ax.contour(mask, levels=[0.5], colors=PROMPT_COLOUR, linewidths=1.0)
                elif isinstance(prompt, Point):
                    half = POINT_SQUARE_PX // 2
                    ax.add_patch(
                        Rectangle(
                            (prompt.x - half - 0.5, prompt.y - half - 0.5),
                            POINT_SQUARE_PX,
                            POINT_SQUARE_PX,
                            fill=False,
                            edgecolor=PROMPT_COLOUR,
                            linestyle=":",
                            linewidth=0.8,
                        )
                    )
                    ax.plot([prompt.x], [prompt.y], marker="x", color=PROMPT_COLOUR, markersize=7, mew=2)
                elif isinstance(prompt, Box):
                    ax.add_patch(
                        Rectangle(
                            (prompt.x0 - 0.5, prompt.y0 - 0.5),
                            prompt.x1 - prompt.x0,
                            prompt.y1 - prompt.y0,
                            fill=False,
                            edgecolor=PROMPT_COLOUR,
                            linewidth=1.2,
                        )
                    )
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
    ax.set_xlabel(_caption(sample), fontsize=6.5, loc="left", family="monospace")


def contact_sheet(
    path: str | Path,
    out: str | Path | None = None,
    n: int = 16,
    seed: int = 0,
    task: str | None = None,
    split: str | None = None,
) -> Path:
    """Render `n` samples of a dataset folder or annotation file to a PNG; returns the PNG's path.

    `out` defaults to `<folder>/contact_sheet.png` (or `<file stem>_sheet.png` next to an annotation file).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    root, samples = read_samples(path)
    picked = pick_samples(samples, n, seed=seed, task=task, split=split)
    if not picked:
        raise ValueError(f"{path}: no rows to show (read {len(samples)} samples; task={task}, split={split})")
    if out is None:
        out = path / "contact_sheet.png" if path.is_dir() else path.with_name(f"{path.stem}_sheet.png")
    out = Path(out)
    columns = min(4, len(picked))
    rows = math.ceil(len(picked) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(picked) :]:
        ax.axis("off")
    for ax, sample in zip(axes.ravel(), picked, strict=False):
        _draw_sample(ax, sample, root)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    logger.info("contact sheet of %d samples written to %s", len(picked), out)
    return out
