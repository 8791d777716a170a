"""Which rows an evaluation scores, and the question-only baseline it prints beside the model.

The first N rows of a file are one image and one kind of question (MeCoVQA-mini is written sorted), so the
protocol samples per kind: a fixed number of rows of every question type (grounding: brain, head, bone, tissue,
DK structure, nuclei...; VQA: presence, plane, modality, region questions...), seeded, so the rows before
training and after are the same rows and a rerun scores them again.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable

from medplib.metrics import normalize_answer
from workflows.data.prepared import RowInfo


def family(task: str) -> str:
    """ "grounding" or "vqa" (VQA and region VQA are scored alike, by their answers)."""
    return "grounding" if task == "grounding" else "vqa"


def kind_of(question_type: str | None, task: str) -> str:
    """The kind a row is reported under: its question type, else its task (rows without one)."""
    return question_type or task


def stratified_ids(rows: Iterable[RowInfo], per_kind: dict[str, int], seed: int) -> list[str]:
    """Sample ids: up to `per_kind[family]` rows of every kind of each family, drawn with `seed`; a family
    missing from `per_kind` is not sampled. Ordered by family, kind, then draw, so the choice never depends on
    the order the rows were read in."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        fam = family(r.task)
        if fam in per_kind:
            groups[fam, kind_of(r.question_type, r.task)].append(r.sample_id)
    chosen: list[str] = []
    for (fam, kind), ids in sorted(groups.items()):
        rng = random.Random(f"{seed}/{fam}/{kind}")
        chosen += rng.sample(sorted(ids), min(per_kind[fam], len(ids)))
    return chosen


def majority_answers(rows: Iterable[tuple[str | None, str, str | None, str | None]]) -> dict[str, str]:
    """Question-only baseline: the most frequent normalised answer per kind among closed rows of (question_type,
    task, answer_type, answer). A model that beats it uses the image; one that matches it may not."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for question_type, task, answer_type, answer in rows:
        if answer_type == "closed" and answer:
            counts[kind_of(question_type, task)][normalize_answer(answer)] += 1
    # Ties break by the answer text, so the baseline is the same on every run.
    return {k: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, c in counts.items()}
