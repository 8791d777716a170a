"""`medplib data prepare` (workflows/data/preprocess.py) on a local 2-CPU Ray cluster.

- round trip: MeCoVQA-mini rows -> prepare -> Parquet -> `row_to_encoded` -> `collate` give the source mask pixels
  and, for box/point prompts, region masks exactly where the source prompt lies in the vision view;
- bad rows: quarantine counts and reasons are exact and equal to the sequential validator's, the CLI exits 0;
- reuse: a second run with the same input and config says so and leaves the files untouched;
- the Ray engine and the single-process engine write the same rows, in the same seeded order, which every
  reader returns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import ray.data
from PIL import Image
from pydicom.data import get_testdata_file

from medplib.data.batch import collate
from medplib.data.image import load_mask
from medplib.data.prepared import iter_prepared_rows, read_manifest
from medplib.data.rows import SCHEMA_VERSION, row_to_encoded
from medplib.data.transforms import Geometry
from medplib.data.validate import Accepted, Rejection, read_and_validate
from medplib.model.config import load_model_config
from medplib.tokenizer import build_tokenizer
from workflows.data.preprocess import PrepareConfig, prepare, split_from_filename


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("tiny")


# ------------------------------------------------------------------------------------------------- round trip
@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    from medplib_datasets.mini.build import build_mini

    root = tmp_path_factory.mktemp("mini")
    build_mini(root, seed=0, max_samples=40, progress=False)
    return root


def _source_rows(root: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted(root.glob("MeCoVQA-mini_*.json")):
        rows.update({row["id"]: row for row in json.loads(path.read_text())})
    return rows


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) with exclusive ends of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_round_trip_mini_masks_and_region_boxes(ray_local, mini: Path, tmp_path: Path, cfg) -> None:
    out = tmp_path / "prepared"
    result = prepare(mini, out, PrepareConfig(batch_size=8))
    source = _source_rows(mini)
    counts = result.manifest["counts"]
    assert not result.reused and counts["rejected"] == 0 and counts["accepted"] == len(source)
    assert (out / "quarantine.jsonl").read_text() == ""

    size = cfg.vision.image_size_px
    tok = build_tokenizer(cfg.llm.tokenizer)
    checked = Counter()
    for split in result.manifest["splits"]:
        rows = list(iter_prepared_rows(out, split))
        assert len(rows) == result.manifest["splits"][split]["accepted"] > 0
        encoded = [row_to_encoded(row, size) for row in rows]
        batch = collate(encoded, cfg, tok.pad_token_id)  # what a training step receives
        assert batch["pixel_values"].shape == (len(rows), 3, size, size)
        for i, row in enumerate(rows):
            src = source[row["sample_id"]]
            assert row["split"] == split == src["split"] and row["task"] == src["task"]
            assert row["question_type"] == src["question_type"]  # carried for stratified evaluation
            # Target masks: the same pixels as the source PNG, at full resolution.
            mask_paths = [
                seg.split("</mask>")[0] for seg in src["conversations"][1]["value"].split("<mask>")[1:]
            ]
            for path, got in zip(mask_paths, batch["target_masks"][i], strict=True):
                assert np.array_equal(got.numpy(), load_mask(mini / path))
                checked["target_mask"] += 1
            # Region prompts: the box/point mapped into the vision view (resize longest side + centre pad).
            height, width = Image.open(mini / src["image"]).size[::-1]
            geo = Geometry.fit(height, width, size, "center")
            scale = geo.resized_w / width
            question = src["conversations"][0]["value"]
            inline = [
                {"mask": p.split("</region>")[0]} for p in question.split("<region>")[1:] if "</region>" in p
            ]
            for region, view in zip(src.get("regions") or inline, batch["region_masks"][i], strict=True):
                if "box" in region:  # the box itself
                    kind, (x0, y0, x1, y1) = "box", region["box"]
                elif (
                    "point" in region
                ):  # a square of side point_square_px around the point, clipped to the image
                    kind, (x, y), half = "point", region["point"], cfg.region.point_square_px // 2
                    x0, y0 = max(0, int(x) - half), max(0, int(y) - half)
                    x1, y1 = min(width, int(x) + half + 1), min(height, int(y) + half + 1)
                else:  # the mask's own bounding box
                    kind, (x0, y0, x1, y1) = "mask", _bbox(load_mask(mini / region["mask"]))
                want = (
                    x0 * scale + geo.pad_left,
                    y0 * scale + geo.pad_top,
                    x1 * scale + geo.pad_left,
                    y1 * scale + geo.pad_top,
                )
                got = _bbox(view.numpy())
                assert np.allclose(got, want, atol=1.0), (row["sample_id"], kind, got, want)
                checked[kind] += 1
    assert all(checked[k] > 0 for k in ("target_mask", "box", "point", "mask")), checked


def _written_ids(out: Path) -> dict[str, list[str]]:
    manifest = read_manifest(out)
    return {split: [r["sample_id"] for r in iter_prepared_rows(out, split)] for split in manifest["splits"]}


def test_rows_are_written_in_a_seeded_shuffled_order(ray_local, mini: Path, tmp_path: Path) -> None:
    from workflows.data.prepared import load_prepared

    cfg = PrepareConfig(batch_size=4)  # several chunks and files per split
    first = _written_ids(prepare(mini, tmp_path / "a", cfg).output)
    again = _written_ids(prepare(mini, tmp_path / "b", cfg).output)
    local = _written_ids(prepare(mini, tmp_path / "local", cfg, engine="local").output)
    unshuffled = cfg.model_copy(update={"shuffle_seed": None})  # with_overrides skips None values
    in_file_order = _written_ids(prepare(mini, tmp_path / "ordered", unshuffled).output)
    other_seed = _written_ids(prepare(mini, tmp_path / "seed1", cfg.with_overrides(shuffle_seed=1)).output)

    source = {}
    for path in sorted(mini.glob("MeCoVQA-mini_*.json")):
        for row in json.loads(path.read_text()):
            source.setdefault(row["split"], []).append(row["id"])
    assert in_file_order == source  # shuffle_seed None: file order
    assert first == again == local  # deterministic, and the same for both engines
    for split, ids in first.items():
        assert sorted(ids) == sorted(source[split]) and len(set(ids)) == len(ids)  # every row once
    shuffled = [split for split in first if len(first[split]) > 2]
    assert shuffled and all(first[s] != source[s] for s in shuffled)
    assert any(other_seed[s] != first[s] for s in shuffled)
    # The Ray Data reader training uses gives the written order too.
    train = load_prepared(tmp_path / "a", "train", preserve_order=True).select_columns(["sample_id"])
    assert [r["sample_id"] for r in train.take_all()] == first["train"]


def test_each_image_and_mask_is_decoded_once_per_process(ray_local, mini: Path, tmp_path: Path) -> None:
    images, masks, rows_with_image, mask_uses = set(), set(), 0, 0
    for row in _source_rows(mini).values():
        rows_with_image += 1
        images.add(row["image"])
        text = " ".join(turn["value"] for turn in row["conversations"])
        paths = re.findall(r"<(?:mask|region)>([^<]+)</(?:mask|region)>", text)
        paths += [r["mask"] for r in row.get("regions") or [] if "mask" in r]
        masks.update(paths)
        mask_uses += len(paths)
    assert rows_with_image > len(images)  # rows share images (and validation and encoding share each mask)

    cached = prepare(mini, tmp_path / "cached", PrepareConfig(batch_size=8), engine="local")
    assert cached.manifest["counts"]["decoded"] == {"images": len(images), "masks": len(masks)}
    # Without the cache every row decodes its image and validation and encoding each decode every mask it
    # uses; the rows are the same bytes either way.
    uncached = prepare(mini, tmp_path / "uncached", PrepareConfig(batch_size=8, cache_mb=0), engine="local")
    assert uncached.manifest["counts"]["decoded"] == {"images": rows_with_image, "masks": 2 * mask_uses}
    # Ray: the views pass makes each image's views once for all workers; masks are decoded once per worker.
    on_ray = prepare(mini, tmp_path / "ray", PrepareConfig(batch_size=8))
    # prepare runs its passes without Ray Data's per-operator reservation, and gives the setting back
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled
    assert on_ray.manifest["counts"]["decoded"]["images"] == len(images)
    assert on_ray.manifest["counts"]["decoded"]["masks"] >= len(masks)
    for split in cached.manifest["splits"]:
        rows = list(iter_prepared_rows(cached.output, split))
        assert rows == list(iter_prepared_rows(uncached.output, split))
        assert rows == list(iter_prepared_rows(on_ray.output, split))


def test_one_volume_read_at_two_views_is_two_pictures(ray_local, tmp_path: Path) -> None:
    """The view cache is keyed by file and view: rows at two slices of one NIfTI get two pictures, rows at the
    same slice share one, with or without the views pass."""
    root = tmp_path / "data"
    root.mkdir()
    volume = np.zeros((16, 16, 4), np.int16)
    for k in range(4):
        volume[4 * k : 4 * k + 4, :, k] = 1000  # a band that moves with the slice
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "v.nii.gz")
    rows = [
        _row(rid, "<image>\nWhat is this?", "MRI", image="v.nii.gz", split="test", view={"slice_index": k})
        for rid, k in (("a", 0), ("b", 2), ("c", 2))
    ]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for engine in ("local", "ray"):
        result = prepare(root / "rows.jsonl", tmp_path / engine, PrepareConfig(data_root=root), engine=engine)
        views = {r["sample_id"]: r["vision_view_png"] for r in iter_prepared_rows(result.output, "test")}
        assert views["a"] != views["b"] and views["b"] == views["c"], engine
        assert result.manifest["counts"]["decoded"]["images"] == 2, engine


# ---------------------------------------------------------------------------------------------- bad rows
H, W = 24, 40


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _row(rid: str | None, question: str, answer: str, image: str | None = "images/ct.png", **extra) -> dict:
    row: dict = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if rid is not None:
        row["id"] = rid
    if image is not None:
        row["image"] = image
    return row | extra


@pytest.fixture()
def bad_input(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A data root plus a JSONL (train/val via the `split` field), a JSON array (`*_test.json`) and a broken
    array file; returns (root, expected rejections per reason)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    _png(root / "images/ct.png", rng.integers(0, 256, (H, W), dtype=np.uint8))
    _png(root / "images/xr.png", rng.integers(0, 256, (H, W), dtype=np.uint8))  # referenced without ".png"
    good = rng.integers(0, 256, (H, W), dtype=np.uint8)
    _png(root / "images/cut.png", good)
    (root / "images/cut.png").write_bytes((root / "images/cut.png").read_bytes()[:80])  # header ok, data cut
    organ = np.zeros((H, W), dtype=np.uint8)
    organ[5:15, 8:30] = 255
    _png(root / "masks/organ.png", organ)
    _png(root / "masks/zero.png", np.zeros((H, W), dtype=np.uint8))
    _png(root / "masks/small.png", organ[:10, :10])
    # Other formats medplib.data.image decodes: JPEG, DICOM (pydicom's bundled CT), a NIfTI volume (middle slice).
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images/photo.jpg")
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "images/ct_small.dcm")
    nib.save(nib.Nifti1Image(rng.random((W, H, 5)).astype(np.float32), np.eye(4)), root / "images/mr.nii.gz")
    seg = "Here: <SEG><mask>masks/organ.png</mask>"
    jsonl_rows: list[dict | str] = [
        _row("g1", "<image>\nWhat is shown?", "A CT.", split="train"),
        _row("g2", "Segment the organ.", seg, split="train"),
        '{"id": "broken", "conversations": [',  # malformed_json
        _row("dup", "<image>\nHi", "Hi", image="images/nope.png", split="train"),  # image_missing, loses dup
        _row("dup", "<image>\nHi", "Hi", split="train"),  # first accepted "dup": wins
        _row("g3", "What is <region>?", "The organ.", regions=[{"box": [8, 5, 30, 15]}], split="val"),
        _row("dup", "<image>\nAgain", "Again", split="val"),  # duplicate_id
        _row("cut", "<image>\nHi", "Hi", image="images/cut.png", split="train"),  # image_unreadable (decode)
        _row("zero", "Segment.", "<SEG><mask>masks/zero.png</mask>", split="train"),  # mask_empty
        _row("small", "Segment.", "<SEG><mask>masks/small.png</mask>", split="val"),  # mask_size_mismatch
        _row("esc", "Segment.", "<SEG><mask>../outside.png</mask>", split="train"),  # path_escapes_root
        _row("seg", "Segment.", "Here: <SEG>", split="train"),  # seg_without_mask
        _row("split", "<image>\nHi", "Hi", split="../up"),  # invalid_field (split becomes a folder)
        _row("fix", "<image>\nAny fracture?", "No.", image="images/xr", split="val"),  # repaired suffix
        _row("oob", "What is <region>?", "Nothing.", regions=[{"point": [W + 2, 3]}], split="val"),
        _row("jpeg", "<image>\nWhat is shown?", "A photo.", image="images/photo.jpg", split="train"),
        _row("dicom", "<image>\nWhich modality?", "CT.", image="images/ct_small.dcm", split="train"),
        _row("nifti", "Segment the organ.", seg, image="images/mr.nii.gz", split="train"),  # H x W slice
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in jsonl_rows]
    lines.insert(2, "")  # a blank line is skipped, yet line numbers stay the file's
    (tmp_path / "ann").mkdir()
    data = ("\ufeff" + "".join(line + "\n" for line in lines)).encode()  # with a BOM, as some editors write
    data += b'{"id": "latin-1", "conversations": "caf\xe9"}\n'  # not UTF-8: malformed_json
    (tmp_path / "ann/rows.jsonl").write_bytes(data)
    array_rows = [
        _row(None, "<image>\nDescribe.", "Normal."),  # default id "rows_test:0", split "test" from the name
        "just a string",  # invalid_field
        _row("t2", "Segment.", seg),
        {"id": "no-conv", "image": "images/ct.png"},  # missing_field
    ]
    (tmp_path / "ann/rows_test.json").write_text(json.dumps(array_rows, indent=1))
    (tmp_path / "ann/zz_broken_val.json").write_text('[{"id": "a", "conversations": []}, {')  # malformed_json
    expected = {
        "malformed_json": 3,
        "image_missing": 1,
        "duplicate_id": 1,
        "image_unreadable": 1,
        "mask_empty": 1,
        "mask_size_mismatch": 1,
        "path_escapes_root": 1,
        "seg_without_mask": 1,
        "invalid_field": 2,
        "region_out_of_bounds": 1,
        "missing_field": 1,
    }
    return root, expected


def test_bad_rows_quarantined_exactly_like_the_validator(ray_local, bad_input, tmp_path: Path) -> None:
    from workflows.cli import main

    root, expected = bad_input
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "data",
                "prepare",
                "--input",
                str(tmp_path / "ann"),
                "--output",
                str(out),
                "--data-root",
                str(root),
            ]
        )
        == 0
    )
    manifest = read_manifest(out)
    counts = manifest["counts"]
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]

    # The oracle: the sequential contract validator over the same files.
    # Preprocessing adds one check of its own: a `split` must be usable as a folder name.
    results = list(read_and_validate(tmp_path / "ann", root))
    split_row = next(r for r in results if isinstance(r, Accepted) and r.sample.id == "split")
    results = [r for r in results if r is not split_row]
    results.append(
        Rejection(source=split_row.source, line=split_row.line, reason="invalid_field", message="", raw="")
    )
    want_rejected = Counter(r.reason.value for r in results if isinstance(r, Rejection))
    want_accepted = {r.sample.id for r in results if isinstance(r, Accepted)}
    got_reasons = Counter(r["reason"] for r in quarantine)
    assert got_reasons == want_rejected == Counter(counts["reason"])
    assert {(r["source"], r["line"], r["reason"]) for r in quarantine} == {
        (r.source, r.line, r.reason.value) for r in results if isinstance(r, Rejection)
    }
    for reason, n in expected.items():
        assert got_reasons[reason] >= n, reason
    assert counts["rejected"] == len(quarantine) == sum(want_rejected.values())

    accepted = {
        split: [r["sample_id"] for r in iter_prepared_rows(out, split)] for split in manifest["splits"]
    }
    assert {i for ids in accepted.values() for i in ids} == want_accepted
    assert counts["accepted"] == len(want_accepted) == sum(len(v) for v in accepted.values())
    assert sorted(accepted["train"]) == ["dicom", "dup", "g1", "g2", "jpeg", "nifti"]  # 2nd "dup" won
    assert sorted(accepted["test"]) == ["rows_test:0", "t2"]
    assert sorted(accepted["val"]) == ["fix", "g3"]
    assert counts["fixed_suffix"] == 1
    assert counts["split"] == {"train": 6, "val": 2, "test": 2}
    views = {
        r["sample_id"]: r for r in iter_prepared_rows(out, "train") if r["sample_id"] in ("dicom", "nifti")
    }
    assert list(views["dicom"]["sam_geometry"][:2]) == [128, 128]  # CT_small.dcm is 128 x 128
    assert list(views["nifti"]["sam_geometry"][:2]) == [H, W]
    dup_line = next(r for r in quarantine if r["reason"] == "duplicate_id")
    assert json.loads(dup_line["raw"])["conversations"][0]["value"] == "<image>\nAgain"
    assert {"source", "line", "reason", "message", "raw", "split"} <= set(dup_line)

    # Manifest fields.
    for key in ("schema_version", "input_hash", "config_hash", "model_preset", "counts", "splits", "inputs"):
        assert key in manifest, key
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["model_preset"] == "tiny"
    for key in ("split", "task", "modality", "reason", "fixed_suffix", "accepted", "rejected"):
        assert key in counts, key
    assert counts["task"] == {"vqa": 6, "grounding": 3, "region_vqa": 1}

    # The single-process engine writes the same rows and the same quarantine.
    local = tmp_path / "prepared-local"
    prepare(tmp_path / "ann", local, PrepareConfig(data_root=root), engine="local")
    assert (local / "quarantine.jsonl").read_text() == (out / "quarantine.jsonl").read_text()
    for split in manifest["splits"]:
        by_id = {r["sample_id"]: r for r in iter_prepared_rows(out, split)}
        for row in iter_prepared_rows(local, split):
            assert row == by_id[row["sample_id"]]

    # Ray Data reader for training.
    from workflows.data.prepared import load_prepared

    assert load_prepared(out, "train").count() == 6


def test_second_run_reuses_the_output(ray_local, bad_input, tmp_path: Path, caplog) -> None:
    root, _ = bad_input
    out = tmp_path / "prepared"
    cfg = PrepareConfig(data_root=root, batch_size=4)
    first = prepare(tmp_path / "ann", out, cfg)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    with caplog.at_level(logging.INFO, logger="workflows.data.preprocess"):
        second = prepare(tmp_path / "ann", out, cfg.with_overrides(batch_size=16))  # execution-only knob
    assert not first.reused and second.reused
    assert "reusing" in caplog.text
    assert second.manifest == first.manifest
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == files

    # A change of input bytes or of a row-shaping knob rebuilds, atomically replacing the folder.
    third = prepare(tmp_path / "ann", out, cfg.with_overrides(max_rows=5), engine="local")
    assert not third.reused and third.manifest["counts"]["rows_read"] == 5
    assert third.manifest["config_hash"] != first.manifest["config_hash"]
    with open(tmp_path / "ann/rows.jsonl", "a") as f:
        f.write(json.dumps(_row("new", "<image>\nNew?", "Yes.")) + "\n")
    fourth = prepare(tmp_path / "ann", out, cfg.with_overrides(max_rows=5), engine="local")
    assert not fourth.reused and fourth.manifest["input_hash"] != third.manifest["input_hash"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".prepared")]  # no temp folders left


def test_config_and_split_names(tmp_path: Path) -> None:
    assert split_from_filename("MeCoVQA-mini_test.json", "train") == "test"
    assert split_from_filename("MeCoVQA-mini_test_xsubject.json", "train") == "test_xsubject"
    assert split_from_filename("MeCoVQA_Grounding_val.jsonl", "train") == "val"
    assert split_from_filename("annotations.jsonl", "train") == "train"
    path = tmp_path / "prep.yaml"
    path.write_text("model_preset: tiny\nbatch_size: 0\n")
    with pytest.raises(ValueError, match="(?s)prep.yaml.*batch_size"):
        PrepareConfig.from_yaml(path)
    with pytest.raises(ValueError, match="split name"):
        PrepareConfig(splits=["../x"])
    default = Path(__file__).resolve().parents[1] / "configs/prepare/default.yaml"
    assert PrepareConfig.from_yaml(default) == PrepareConfig()
    assert "medplib data prepare" in default.read_text().splitlines()[2]


def test_refuses_to_replace_a_foreign_folder(bad_input, tmp_path: Path) -> None:
    root, _ = bad_input
    out = tmp_path / "not-prepared"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare(tmp_path / "ann", out, PrepareConfig(data_root=root), engine="local")
    assert (out / "precious.txt").exists()
    assert os.listdir(tmp_path).count("not-prepared") == 1


# ------------------------------------------------------------------------------------ bounded work, nothing leaks
def test_prepare_refuses_what_would_cost_without_bound(ray_local, tmp_path: Path, png_bomb) -> None:
    """An annotation file symlinked out of the input folder, a 12,000 x 12,000 PNG of 140 KB, a question that
    leaves the answer no room, a 5,000-character path, and the temp folders of a run killed with -9."""
    import signal
    import subprocess
    import sys

    from workflows.data.preprocess import remove_stale_temps

    root = tmp_path / "data"
    _png(root / "images/ct.png", np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8))
    (root / "images/huge.png").write_bytes(png_bomb(12000, 12000))
    assert (root / "images/huge.png").stat().st_size < 200_000
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.jsonl").write_text(json.dumps(_row("out", "<image>\nHi", "Hi")) + "\nSECRET LINE\n")
    rows = [
        _row("ok", "<image>\nWhat is shown?", "A CT."),
        _row("huge", "<image>\nWhat is shown?", "A CT.", image="images/huge.png"),
        _row("long", "<image>\n" + "Describe the scan. " * 100, "A CT."),  # 1,900 tokens > max_length 512
        _row("path", "<image>\nWhat is shown?", "A CT.", image="images/" + "a" * 5000 + ".png"),
    ]
    ann = root / "ann"
    ann.mkdir()
    (ann / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ann / "outside.jsonl").symlink_to(elsewhere / "secret.jsonl")

    # The temp folders of two runs killed with -9 (one locked while it lived), one of a run still alive, and the
    # old output a swap left behind.
    out = tmp_path / "prepared"
    live, dead, unlocked, old = (
        tmp_path / f".prepared.{name}" for name in ("tmp-live", "tmp-dead", "tmp-x", "old-1")
    )
    for folder in (live, dead, unlocked, old):
        (folder / "_parts").mkdir(parents=True)
    holder = "import sys, time; from pathlib import Path; from workflows.data.preprocess import _hold\n"
    holder += "locks = [_hold(Path(p)) for p in sys.argv[1:]]; print('held', flush=True); time.sleep(600)"
    procs = [
        subprocess.Popen([sys.executable, "-c", holder, str(folder)], stdout=subprocess.PIPE, text=True)
        for folder in (live, dead)
    ]
    try:
        assert all(p.stdout.readline().strip() == "held" for p in procs)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        hour_ago = time.time() - 3600
        for folder in (live, dead, unlocked, old):
            os.utime(folder, (hour_ago, hour_ago))
        fresh = tmp_path / ".prepared.tmp-fresh"  # no lock yet, a second old: a run starting
        fresh.mkdir()
        result = prepare(ann, out, PrepareConfig(data_root=root))
        assert not dead.exists() and not unlocked.exists() and not old.exists()
        assert live.exists() and fresh.exists()  # a live run's folder is never touched
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert remove_stale_temps(out) == [live]  # its holder is gone now

    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r for r in quarantine}
    assert sorted(by_reason) == ["answer_truncated", "image_too_large", "path_escapes_root", "path_too_long"]
    assert result.manifest["counts"]["reason"] == {k: 1 for k in by_reason}
    assert result.manifest["counts"]["accepted"] == 1
    outside = by_reason["path_escapes_root"]
    assert outside["source"].endswith("outside.jsonl") and outside["line"] == 0 and outside["raw"] == ""
    assert "resolves outside the input folder" in outside["message"]
    assert "SECRET" not in (out / "quarantine.jsonl").read_text()  # nothing of that file is read
    assert "12000x12000" in by_reason["image_too_large"]["message"]
    assert "max_image_pixels" in by_reason["image_too_large"]["message"]
    assert "cuts its answer away entirely" in by_reason["answer_truncated"]["message"]
    assert "image is 5011 characters" in by_reason["path_too_long"]["message"]
    # The sequential validator agrees on the rows it checks (truncation is the encoder's: it knows max_length).
    results = list(read_and_validate(ann, root))
    reasons = sorted(r.reason.value for r in results if isinstance(r, Rejection))
    assert reasons == ["image_too_large", "path_escapes_root", "path_too_long"]
    # The pixel cap is configurable: below ct.png's size every row with an image is refused.
    lowered = prepare(ann, tmp_path / "low", PrepareConfig(data_root=root, max_image_pixels=H * W - 1))
    assert lowered.manifest["counts"]["reason"]["image_too_large"] == 3
