"""Whole volumes end to end: `medplib predict` on a NIfTI and on a DICOM series (3-D NIfTI mask with the input's
affine, DICOM-SEG, mosaic overlay), the batched slice path against one slice at a time, and bad volumes refused by
the CLI and quarantined by `data prepare` while the good rows go through."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from clinical_files import itk_t1, mni_t1, write_mixed_series, write_nifti, write_series
from PIL import Image


def _medplib(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, timeout=600
    )


def _small_series_volume() -> np.ndarray:
    return np.asarray(nib.load(mni_t1()).dataobj)[::8, ::8, ::8].astype(np.int16) * 4 + 1024


@pytest.mark.slow
def test_predict_on_the_cross_subject_t1_writes_a_mask_with_its_affine(tmp_path: Path) -> None:
    t1 = itk_t1()
    if t1 is None:
        pytest.skip("apt-get install insighttoolkit5-examples (make install does)")
    out = tmp_path / "t1" / "result.json"
    r = _medplib(
        "predict", "--model", "tiny", "--image", str(t1), "--question", "Segment the brain.", "--segment",
        "--axis", "coronal", "--max-new-tokens", "1", "--batch-size", "32", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    source, mask = nib.load(t1), nib.load(result["mask_nifti"])
    assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
    assert result["axis"] == 1 and result["slices_read"] == list(range(62))  # A is stored third: 62 slices
    assert result["mask_voxels"] == int(np.asarray(mask.dataobj).sum())
    assert set(result["answer_slices"]) == set(result["mask_slices"])  # default: answers where the mask is
    assert [a["slice"] for a in result["answers"]] == result["answer_slices"]
    overlay = Image.open(result["overlay_png"])
    assert overlay.mode == "RGB" and overlay.size[0] > 128
    assert "slices" in r.stdout and "result_mask.nii.gz" in r.stdout


@pytest.mark.slow
def test_predict_on_a_dicom_series_writes_a_dicom_seg(tmp_path: Path) -> None:
    import highdicom as hd

    volume = _small_series_volume()
    files = write_series(volume, tmp_path / "series")
    out = tmp_path / "seg" / "result.json"
    r = _medplib(
        "predict", "--model", "tiny", "--image", str(tmp_path / "series"), "--question", "Segment the brain.",
        "--segment", "--window", "brain", "--answer-slices", "3:6", "--max-new-tokens", "1", "--batch-size", "32",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["slices_read"] == list(range(volume.shape[2])) and result["answer_slices"] == [3, 4, 5]
    seg = hd.seg.segread(result["dicom_seg"])
    source = pydicom.dcmread(files[0])
    assert seg.NumberOfFrames == volume.shape[2]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert len(referenced.ReferencedInstanceSequence) == volume.shape[2]
    mask = nib.load(result["mask_nifti"])
    assert mask.shape == volume.shape
    assert np.allclose(mask.affine[:3, :3], np.diag([-2.0, -2.0, 3.0]))  # LPS series -> RAS affine


def test_batched_slices_match_one_slice_at_a_time(tiny_model) -> None:
    from medplib.data.volume import load_volume
    from medplib.inference import Predictor
    from medplib.volume_prediction import parse_slices, predict_volume

    predictor = Predictor(tiny_model)
    volume = load_volume(mni_t1())
    volume.data = volume.data[::12, ::12, ::12]
    volume.affine = volume.affine @ np.diag([12, 12, 12, 1])
    pred = predict_volume(
        predictor, volume, "Segment the brain.", axis=0, segment=True, batch_size=4, max_new_tokens=2,
        answer_slices="all",
    )  # fmt: skip
    count = volume.num_slices(0)
    assert pred.slices_read == list(range(count)) and sorted(pred.answers) == list(range(count))
    for k in (0, count // 2):
        one = predictor.predict(
            volume.display_slice(0, k), "Segment the brain.", max_new_tokens=2, segment=True
        )
        assert one.text == pred.answers[k]
        ras = np.zeros(volume.ras_shape(), dtype=bool)
        volume.put_display_mask(ras, 0, k, one.masks[0])
        assert (volume.to_stored(ras)[k] == pred.mask[k]).all()  # RAS storage: stored axis 0 is axis 0
    assert parse_slices("2:4", 10) == [2, 3] and parse_slices("mask", 10) == "mask"
    with pytest.raises(ValueError, match="answer_slices"):
        parse_slices("x", 10)
    with pytest.raises(ValueError, match="needs segment"):
        predict_volume(predictor, volume, "Where?", answer_slices="mask")


def write_bad_volumes(root: Path) -> dict[str, str]:
    """{what is wrong: relative path} for each kind of bad volume, written under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    header = nib.Nifti1Header()
    header.set_data_shape((5, 0))
    header.set_data_dtype(np.int16)
    (root / "zero.nii").write_bytes(header.binaryblock + b"\0" * 4)
    noise = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    good = write_nifti(root / "good.nii.gz", noise, np.eye(4)).read_bytes()
    (root / "truncated.nii.gz").write_bytes(good[: len(good) * 2 // 5])
    paths = write_mixed_series(root / "mixed", _small_series_volume())
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("series/slice_000.dcm", paths[1].read_bytes())
        out.writestr("../outside.dcm", paths[2].read_bytes())
    (root / "escaping.zip").write_bytes(archive.getvalue())
    return {
        "dim[2] is 0": "zero.nii",
        "truncated or corrupt gzip": "truncated.nii.gz",
        "mixes slice sizes": "mixed",
        "points outside the archive": "escaping.zip",
    }


def test_bad_volumes_are_refused_by_the_cli(tmp_path: Path) -> None:
    for message, rel in write_bad_volumes(tmp_path).items():
        r = _medplib("predict", "--model", "tiny", "--image", str(tmp_path / rel), "--question", "Segment.")
        assert r.returncode == 2 and message in r.stderr and rel in r.stderr, (rel, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
    assert gzip.decompress((tmp_path / "good.nii.gz").read_bytes())  # the intact file next to them is fine


@pytest.mark.slow
def test_bad_volumes_are_quarantined_by_prepare(ray_local, tmp_path: Path) -> None:
    from workflows.data.preprocess import PrepareConfig, prepare

    root = tmp_path / "data"
    bad = write_bad_volumes(root)
    rows = [
        {
            "id": f"bad-{k}",
            "image": rel,
            "split": "test",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "MRI"},
            ],
        }
        for k, rel in enumerate(bad.values())
    ]
    rows.append(
        {
            "id": "good",
            "image": "good.nii.gz",
            "view": {"axis": "coronal", "slice_index": 3, "window": "0.5,1"},
            "split": "test",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "MRI"},
            ],
        }
    )
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = prepare(
        root / "rows.jsonl", tmp_path / "prepared", PrepareConfig(data_root=root, window="brain")
    )
    quarantine = [
        json.loads(line) for line in (tmp_path / "prepared" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert len(quarantine) == 4
    for message, rel in bad.items():
        (record,) = [q for q in quarantine if rel in q["message"]]
        assert message in record["message"]
        assert record["reason"] == ("image_empty" if rel == "zero.nii" else "image_unreadable")
    assert result.manifest["splits"]["test"]["accepted"] == 1  # the good row went through
