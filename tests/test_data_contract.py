"""The data contract: image I/O, the two input forms, and validation with a reason for every rejected row."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clinical_files import dicom_dataset, save
from PIL import Image

from medplib.constants import MODALITIES
from medplib.data import validate as validate_module
from medplib.data.image import ImageReadError, image_size, load_image, load_mask
from medplib.data.parse import ParseError, modality_from_filename, normalize_modality, parse_row
from medplib.data.schema import Box, MaskRef, Point, Sample
from medplib.data.validate import (
    Accepted,
    Limits,
    Reason,
    Rejection,
    RootPaths,
    count_reasons,
    read_and_validate,
    summarize,
    validate_row,
    write_quarantine,
)

H, W = 32, 48  # every fixture image is 32 rows x 48 columns

CT = "images/ct_00--AMOS2022--amos_0001--x_0020.png"
MR = "images/mr_t1--BraTS--case_02--z_0010.png"
XRAY_NO_SUFFIX = "images/x_ray--ChestXray--case_03--2d_none"  # only the ".png" version exists


# ----------------------------------------------------------------------------------------------- fixture files
def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _square_mask(height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[8:20, 10:30] = 1  # MeCoVQA masks store foreground as 1 (any value >= 1 counts)
    return mask


def _write_dicom(path: Path, pixels: np.ndarray, **elements: object) -> None:
    save(dicom_dataset(pixels, **elements), path)


def _write_nifti(path: Path, volume: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine=np.eye(4)), path)


@pytest.fixture()
def data_root(tmp_path: Path, png_bomb) -> Path:
    """A tiny MeCoVQA-style tree: good images/masks plus one broken file for every failure mode."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    _save_png(root / CT, gray)
    _save_png(root / MR, np.stack([gray] * 3, axis=2))
    _save_png(root / (XRAY_NO_SUFFIX + ".png"), gray)
    _write_dicom(
        root / "images/ct_00--Lung--case_04--z_0001.dcm",
        rng.integers(0, 2000, (H, W)),
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    _write_nifti(root / "images/mr_00--Brain--case_05.nii.gz", rng.random((W, H, 5)).astype(np.float32))
    (root / "images/corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8))
    )
    (root / "images/empty.png").write_bytes(b"")
    (root / "images/huge.png").write_bytes(png_bomb(12000, 12000))  # 140 KB that decode to 144 M pixels
    # A header that declares an 8192x8192 slice (over ReadLimits' 4096x4096) and no voxels: refused from the header.
    huge = nib.Nifti1Header()
    huge.set_data_shape((8192, 8192, 1))
    huge.set_data_dtype(np.uint8)
    (root / "images/huge.nii").write_bytes(huge.binaryblock + b"\0" * 4)

    _save_png(root / "masks/organ.png", _square_mask())
    _save_png(root / "masks/region.png", _square_mask() * 255)
    _save_png(root / "masks/zero.png", np.zeros((H, W), dtype=np.uint8))
    _save_png(root / "masks/small.png", _square_mask(16, 16))
    (root / "masks/corrupt.png").write_bytes(b"not a png at all")
    for i in range(5):
        _save_png(root / f"masks/part_{i}.png", _square_mask())

    outside = tmp_path / "outside"
    _save_png(outside / "secret.png", _square_mask())
    os.symlink(outside / "secret.png", root / "masks/link.png")
    return root


# --------------------------------------------------------------------------------------------- fixture rows
def _row(row_id: str | None, question: str, answer: str, image: str | None = CT, **extra: object) -> dict:
    row: dict = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if row_id is not None:
        row["id"] = row_id
    if image is not None:
        row["image"] = image
    row.update(extra)
    return row


GOOD_ROWS = [
    _row(
        "vqa-1",
        "<image>\nWhat's your diagnostic analysis of the entire image?",
        "A CT of the abdomen.",
        answer_type="open",
    ),
    _row("region-1", "What organ is <region>masks/region.png</region>? <image>", "The liver."),
    _row("ground-1", "Segment the liver.", "Here it is: <SEG><mask>masks/organ.png</mask>"),
    {
        "id": "explicit-1",
        "image": MR,
        "modality": "MR",
        "split": "train",
        "regions": [{"point": [5, 6]}, {"box": [1, 2, 10, 12]}],
        "masks": ["masks/organ.png"],
        "conversations": [
            {"from": "user", "value": "<image>\nCompare <region> and <region></region>."},
            {"from": "assistant", "value": "Both lie in the liver <SEG>"},
        ],
    },
    _row(
        "dicom-1",
        "<image>\nSegment the lesion.",
        "<SEG><mask>masks/organ.png</mask>",
        image="images/ct_00--Lung--case_04--z_0001.dcm",
    ),
    _row(
        "nifti-1",
        "<image>\nSegment the lesion.",
        "<SEG><mask>masks/organ.png</mask>",
        image="images/mr_00--Brain--case_05.nii.gz",
    ),
    _row("suffix-1", "<image>\nAny fracture?", "No.", image=XRAY_NO_SUFFIX),
    _row("text-1", "What is a CT scan?", "Computed tomography.", image=None),
    _row(None, "<image>\nDescribe.", "Normal."),  # default id "<stem>:<line>"
]

# (reason, row or raw line); each reason at least once, a few more than once.
BAD_ROWS: list[tuple[Reason, dict | str]] = [
    (Reason.MALFORMED_JSON, '{"id": "bad-json", "conversations": ['),
    (Reason.MISSING_FIELD, {"id": "no-conv", "image": CT}),
    (
        Reason.MISSING_FIELD,
        _row("no-gpt", "<image>\nHi", "", image=CT)
        | {"conversations": [{"from": "human", "value": "<image>\nHi"}]},
    ),
    (Reason.MISSING_FIELD, _row("no-image", "<image>\nWhat is this?", "A CT.", image=None)),
    (
        Reason.INVALID_FIELD,
        _row("bad-role", "<image>\nHi", "Hi")
        | {"conversations": [{"from": "system", "value": "be nice"}, {"from": "gpt", "value": "ok"}]},
    ),
    (Reason.IMAGE_MISSING, _row("img-missing", "<image>\nHi", "Hi", image="images/nope.png")),
    (Reason.IMAGE_UNREADABLE, _row("img-corrupt", "<image>\nHi", "Hi", image="images/corrupt.png")),
    (Reason.IMAGE_EMPTY, _row("img-empty", "<image>\nHi", "Hi", image="images/empty.png")),
    (Reason.IMAGE_TOO_LARGE, _row("img-huge", "<image>\nHi", "Hi", image="images/huge.nii")),
    (Reason.MASK_MISSING, _row("mask-missing", "Segment.", "<SEG><mask>masks/nope.png</mask>")),
    (Reason.MASK_UNREADABLE, _row("mask-corrupt", "Segment.", "<SEG><mask>masks/corrupt.png</mask>")),
    (Reason.MASK_EMPTY, _row("mask-zero", "Segment.", "<SEG><mask>masks/zero.png</mask>")),
    (Reason.MASK_SIZE_MISMATCH, _row("mask-small", "Segment.", "<SEG><mask>masks/small.png</mask>")),
    (Reason.MASK_SIZE_MISMATCH, _row("region-small", "What is <region>masks/small.png</region>?", "Liver.")),
    (Reason.SEG_WITHOUT_MASK, _row("seg-no-mask", "Segment.", "Here: <SEG>")),
    (Reason.MASK_WITHOUT_SEG, _row("mask-no-seg", "Segment.", "Here: <mask>masks/organ.png</mask>")),
    (
        Reason.REGION_COUNT_MISMATCH,
        _row("region-count", "What is <region>?", "Liver.", regions=[{"point": [1, 1]}, {"point": [2, 2]}]),
    ),
    (
        Reason.TOO_MANY_TAGS,
        _row("too-many", "Segment all.", " ".join(f"<SEG><mask>masks/part_{i}.png</mask>" for i in range(5))),
    ),
    (Reason.PATH_ESCAPES_ROOT, _row("escape-dotdot", "Segment.", "<SEG><mask>../outside/secret.png</mask>")),
    (Reason.PATH_ESCAPES_ROOT, _row("escape-abs", "<image>\nHi", "Hi", image="/etc/passwd")),
    (Reason.PATH_ESCAPES_ROOT, _row("escape-link", "Segment.", "<SEG><mask>masks/link.png</mask>")),
    (Reason.PATH_TOO_LONG, _row("long-path", "<image>\nHi", "Hi", image="images/" + "a" * 5000 + ".png")),
    (Reason.IMAGE_TOO_LARGE, _row("huge", "<image>\nHi", "Hi", image="images/huge.png")),
    (Reason.DUPLICATE_ID, _row("vqa-1", "<image>\nAgain?", "Again.")),
    (
        Reason.REGION_OUT_OF_BOUNDS,
        _row("oob", "What is <region>?", "Nothing.", regions=[{"point": [W + 3, 5]}]),
    ),
    (
        Reason.REGION_OUT_OF_BOUNDS,
        _row("oob-box", "What is <region>?", "Nothing.", regions=[{"box": [0, 0, W, H + 1]}]),
    ),
]


def _write_jsonl(path: Path) -> dict[int, tuple[Reason | None, str]]:
    """Interleave good and bad rows (plus a blank line); returns {line number: (expected reason or None, text)}."""
    lines: list[tuple[Reason | None, str]] = []
    bad = iter(BAD_ROWS)
    for good in GOOD_ROWS:
        lines.append((None, json.dumps(good)))
        for reason, row in [next(bad, (None, None)), next(bad, (None, None))]:
            if reason is not None:
                lines.append((reason, row if isinstance(row, str) else json.dumps(row)))
    lines.extend((reason, row if isinstance(row, str) else json.dumps(row)) for reason, row in bad)
    lines.insert(3, (None, ""))  # a blank line is skipped, yet the numbering stays the file's
    path.write_text("".join(line + "\n" for _, line in lines))
    return {number: item for number, item in enumerate(lines, start=1) if item[1]}


# ---------------------------------------------------------------------------------------------- validation
def test_validation_counts_every_reason_and_quarantines_with_lines(data_root: Path, tmp_path: Path) -> None:
    annotations = tmp_path / "MeCoVQA_mixed.jsonl"
    expected = _write_jsonl(annotations)
    results = list(read_and_validate(annotations, data_root))

    accepted = [r for r in results if isinstance(r, Accepted)]
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert len(accepted) == len(GOOD_ROWS) == 9
    assert len(rejected) == len(BAD_ROWS) == 26
    expected_counts: dict[str, int] = {}
    for reason, _ in BAD_ROWS:
        expected_counts[reason.value] = expected_counts.get(reason.value, 0) + 1
    assert dict(count_reasons(rejected)) == expected_counts
    # unexpected_error is a reader's bug; answer_truncated is found by the encoder, which knows max_length.
    assert set(expected_counts) == {r.value for r in Reason} - {"unexpected_error", "answer_truncated"}

    for rejection in rejected:  # each rejection points at its own line, with the line's text and a message
        reason, line = expected[rejection.line]
        assert rejection.reason == reason, (rejection.line, rejection.message)
        assert rejection.raw == line
        assert rejection.source == str(annotations)
        assert rejection.message
    malformed = next(r for r in rejected if r.reason == Reason.MALFORMED_JSON)
    assert "column 38" in malformed.message
    for good in accepted:
        assert expected[good.line][0] is None

    summary = summarize(results)
    assert (summary.total, summary.accepted, summary.rejected, summary.fixed_suffix) == (35, 9, 26, 1)
    assert summary.by_reason == expected_counts

    quarantine = tmp_path / "out" / "quarantine.jsonl"
    assert write_quarantine(rejected, quarantine) == 26
    records = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [r["line"] for r in records] == [r.line for r in rejected]
    assert all(set(r) == {"source", "line", "reason", "message", "raw"} for r in records)
    assert {r["reason"] for r in records} == set(expected_counts)


def test_accepted_samples_are_normalised(data_root: Path, tmp_path: Path) -> None:
    annotations = tmp_path / "MeCoVQA_mixed.jsonl"
    _write_jsonl(annotations)
    samples = {r.sample.id: r for r in read_and_validate(annotations, data_root) if isinstance(r, Accepted)}

    region = samples["region-1"].sample
    assert region.turns[0].text == "<image>\nWhat organ is <region></region>?"
    assert region.regions == [MaskRef(path="masks/region.png")] and region.task == "region_vqa"
    assert region.modality == "ct"
    ground = samples["ground-1"].sample
    assert ground.turns[0].text == "<image>\nSegment the liver."  # <image> prepended when missing
    assert ground.turns[1].text == "Here it is: <SEG>" and ground.masks == ["masks/organ.png"]
    assert ground.task == "grounding"
    explicit = samples["explicit-1"].sample
    assert explicit.regions == [Point(x=5, y=6), Box(x0=1, y0=2, x1=10, y1=12)]
    assert explicit.turns[0].text == "<image>\nCompare <region></region> and <region></region>."
    assert (explicit.modality, explicit.split, explicit.task) == ("mri", "train", "grounding")
    fixed = samples["suffix-1"]
    assert fixed.sample.image == XRAY_NO_SUFFIX + ".png" and fixed.fixed_suffix == [XRAY_NO_SUFFIX]
    assert fixed.sample.modality == "xray"
    assert samples["text-1"].sample.image is None and samples["text-1"].sample.task == "vqa"
    assert any(key.startswith("MeCoVQA_mixed:") for key in samples)  # the row without an id
    assert samples["vqa-1"].sample.answer_type == "open"


def test_json_array_file_and_folder(data_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(GOOD_ROWS[:3] + [BAD_ROWS[5][1], "a string"], indent=2))
    (folder / "b.json").write_text('[{"id": "x", ')  # broken array: one rejection for the whole file
    (folder / "c.jsonl").write_bytes(b'{"id": "\xff"}\n' + json.dumps(GOOD_ROWS[3]).encode() + b"\n")
    (folder / "notes.txt").write_text("ignored")
    results = list(read_and_validate(folder, data_root))
    brief = [
        (Path(r.source).name, r.line, r.reason.value if isinstance(r, Rejection) else "ok") for r in results
    ]
    assert brief == [
        ("a.json", 0, "ok"),
        ("a.json", 1, "ok"),
        ("a.json", 2, "ok"),
        ("a.json", 3, "image_missing"),
        ("a.json", 4, "invalid_field"),
        ("b.json", 1, "malformed_json"),
        ("c.jsonl", 1, "malformed_json"),
        ("c.jsonl", 2, "ok"),
    ]
    with pytest.raises(FileNotFoundError, match="nope"):
        list(read_and_validate(tmp_path / "nope.jsonl", data_root))
    with pytest.raises(FileNotFoundError, match="data root"):
        list(read_and_validate(folder, tmp_path / "no_root"))


def test_limits_are_configurable(data_root: Path) -> None:
    row = BAD_ROWS[[r for r, _ in BAD_ROWS].index(Reason.TOO_MANY_TAGS)][1]
    assert isinstance(validate_row(row, "t.jsonl", 1, data_root, Limits(max_masks=5)), Accepted)
    rejected = validate_row(row, "t.jsonl", 1, data_root, Limits(max_masks=4))
    assert isinstance(rejected, Rejection) and "5 <SEG>" in rejected.message
    region_row = GOOD_ROWS[3]
    assert (
        validate_row(region_row, "t.jsonl", 1, data_root, Limits(max_regions=1)).reason
        == Reason.TOO_MANY_TAGS
    )
    # header-only mode still accepts good rows and gives the same sizes
    assert isinstance(
        validate_row(GOOD_ROWS[5], "t.jsonl", 1, data_root, Limits(decode_images=False)), Accepted
    )
    no_fix = validate_row(GOOD_ROWS[6], "t.jsonl", 1, data_root, Limits(fix_missing_suffix=False))
    assert no_fix.reason == Reason.IMAGE_MISSING


def test_unexpected_errors_become_rejections(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("reader bug")

    monkeypatch.setattr(validate_module, "load_image", broken)
    result = validate_row(GOOD_ROWS[0], "t.jsonl", 7, data_root)
    assert (
        isinstance(result, Rejection)
        and result.reason == Reason.UNEXPECTED_ERROR
        and "reader bug" in result.message
    )


# ------------------------------------------------------------------------------------------------ parsing
def test_both_forms_parse_to_the_same_sample() -> None:
    released = {
        "id": "s1",
        "image": CT,
        "answer_type": "open",
        "conversations": [
            {"from": "human", "value": "Where is <region>masks/region.png</region>?\n<image>"},
            {"from": "gpt", "value": "Here <SEG><mask>masks/organ.png</mask>"},
            {"from": "human", "value": "And <region>masks/organ.png</region>?"},
            {"from": "gpt", "value": "There <SEG><mask>masks/part_0.png</mask>"},
        ],
    }
    explicit = {
        "id": "s1",
        "image": CT,
        "answer_type": "open",
        "modality": "ct",
        "task": "grounding",
        "regions": [{"mask": "masks/region.png"}, {"mask": "masks/organ.png"}],
        "masks": ["masks/organ.png", "masks/part_0.png"],
        "conversations": [
            {"from": "user", "value": "<image>\nWhere is <region>?"},
            {"from": "assistant", "value": "Here <SEG>"},
            {"from": "user", "value": "And <region></region>?"},
            {"from": "assistant", "value": "There <SEG>"},
        ],
    }
    a, b = parse_row(released), parse_row(explicit)
    assert a == b and a.question_type is None
    assert parse_row(released | {"question_type": "structure"}).question_type == "structure"
    assert a.turns[0].text == "<image>\nWhere is <region></region>?"
    assert a.masks == ["masks/organ.png", "masks/part_0.png"]
    # a dumped Sample's regions are accepted back
    assert parse_row(explicit | {"regions": [r.model_dump() for r in a.regions]}) == a
    assert Sample.model_validate_json(a.model_dump_json()) == a


@pytest.mark.parametrize(
    ("row", "reason", "words"),
    [
        ({"image": CT, "conversations": []}, "missing_field", "empty"),
        ({"image": CT, "conversations": [{"from": "human"}]}, "missing_field", "'value'"),
        ({"image": CT, "conversations": [{"from": "gpt", "value": "x"}]}, "invalid_field", "alternate"),
        (
            {"image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "invalid_field",
            "'image'",
        ),
        (
            _row("a", "q", "a <SEG>", masks=["m.png"])
            | {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a <SEG><mask>x.png</mask>"},
                ]
            },
            "invalid_field",
            "one form",
        ),
        (_row("a", "q", "a <SEG>", masks=["m.png", "n.png"]), "mask_without_seg", "'masks' lists 2"),
        (_row("a", "q <SEG>", "a"), "invalid_field", "gpt turns"),
        (_row("a", "q", "a <region>m.png</region>"), "invalid_field", "human turns"),
        (_row("a", "q <region></region>", "a"), "region_count_mismatch", "lists 0"),
        (_row("a", "q", "a", regions=[{"box": [5, 5, 1, 1]}]), "invalid_field", "x0 < x1"),
        (_row("a", "q", "a", regions=[{"point": [1]}]), "invalid_field", "regions[0].point"),
        (_row("a", "q", "a", modality="sonar"), "invalid_field", "unknown modality"),
        (_row("a", "q", "a", task="caption"), "invalid_field", "'task'"),
        (_row("a", "q", "a <SEG><mask>m.png</mask>", image=None), "missing_field", "no 'image'"),
        ("not a dict", "invalid_field", "JSON object"),
    ],
)
def test_parse_errors(row: object, reason: str, words: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_row(row)  # type: ignore[arg-type]
    assert caught.value.reason == reason
    assert words in str(caught.value)


def test_parse_details() -> None:
    sample = parse_row(
        {"image": CT, "conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": 7}]},
        source="dir/MeCoVQA_Complex_VQA_test.json",
        index=3,
    )
    assert sample.id == "MeCoVQA_Complex_VQA_test:3"
    assert [t.text for t in sample.turns] == ["<image>\n42", "7"]  # non-str values cast, <image> prepended
    twice = parse_row(_row("a", "Look <image> here <image>", "ok"))
    assert twice.turns[0].text == "<image>\nLook  here"  # duplicates collapse to one, as LLaVA does


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("images/ct_00--AbdomenCT1K--Case_00220--x_0359.png", "ct"),
        ("mr_t1--BraTS2021--x--y.png", "mri"),
        ("mr_flair--ISLES--a--b.png", "mri"),
        ("x_ray--ChestX--a--2d_none.png", "xray"),
        ("ultrasound_00--Breast--a--b.png", "ultrasound"),
        ("us_00--Thyroid--a--b.png", "ultrasound"),
        ("pet_00--AutoPET--a--b.png", "pet"),
        ("fundus_photography--IDRiD--a--b.png", "fundus"),
        ("dermoscopy_00--ISIC--a--b.png", "dermoscopy"),
        ("endoscopy_00--Kvasir--a--b.png", "endoscopy"),
        ("cat_00--Pets--a--b.png", "other"),
        ("ct_scan.png", "other"),  # not the SA-Med2D naming scheme
    ],
)
def test_modality_from_filename(name: str, modality: str) -> None:
    assert modality_from_filename(name) == modality
    assert modality in MODALITIES


def test_normalize_modality() -> None:
    assert [normalize_modality(m) for m in ("CT", "MR", "MRI", "X-Ray", "x_ray", "US", "Fundus")] == [
        "ct",
        "mri",
        "mri",
        "xray",
        "xray",
        "ultrasound",
        "fundus",
    ]


# ---------------------------------------------------------------------------------------------- image I/O
def _assert_rgb(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.dtype == np.uint8 and image.shape == (*shape, 3)


def test_load_image_formats(data_root: Path, tmp_path: Path) -> None:
    for rel in (CT, MR, "images/ct_00--Lung--case_04--z_0001.dcm", "images/mr_00--Brain--case_05.nii.gz"):
        image = load_image(data_root / rel)
        _assert_rgb(image, (H, W))
        assert image_size(data_root / rel) == (H, W)
    gray = load_image(data_root / CT)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    # 16-bit PNG, RGBA PNG, palette PNG
    _save_png(tmp_path / "sixteen.png", (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 7))
    sixteen = load_image(tmp_path / "sixteen.png")
    _assert_rgb(sixteen, (H, W))
    assert sixteen.min() == 0 and sixteen.max() == 255
    _save_png(tmp_path / "rgba.png", np.full((H, W, 4), 200, dtype=np.uint8))
    _assert_rgb(load_image(tmp_path / "rgba.png"), (H, W))
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).convert("P").save(tmp_path / "palette.png")
    _assert_rgb(load_image(tmp_path / "palette.png"), (H, W))
    # JPEG
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    _assert_rgb(load_image(tmp_path / "photo.jpg"), (H, W))

    # arrays of any dtype and PIL images
    _assert_rgb(load_image(np.random.default_rng(0).random((5, 7))), (5, 7))
    _assert_rgb(load_image(np.ones((5, 7, 1), dtype=np.int32)), (5, 7))
    _assert_rgb(load_image(np.zeros((5, 7, 4), dtype=np.uint8)), (5, 7))
    _assert_rgb(load_image(np.ones((5, 7), dtype=bool)), (5, 7))
    assert load_image(np.array([[0.0, 0.5], [1.0, np.nan]]))[..., 0].tolist() == [[0, 128], [255, 0]]
    _assert_rgb(load_image(Image.new("L", (7, 5))), (5, 7))
    _assert_rgb(load_image(Image.new("I;16", (7, 5))), (5, 7))

    # the bytes of a file (an upload): the format is sniffed from the content
    for rel in (CT, "images/ct_00--Lung--case_04--z_0001.dcm", "images/mr_00--Brain--case_05.nii.gz"):
        data = (data_root / rel).read_bytes()
        assert (load_image(data) == load_image(data_root / rel)).all(), rel
    _write_nifti(tmp_path / "plain.nii", np.ones((W, H, 3), dtype=np.int16))
    _assert_rgb(load_image((tmp_path / "plain.nii").read_bytes()), (H, W))
    with pytest.raises(ImageReadError, match="<bytes>"):
        load_image(b"")
    with pytest.raises(ImageReadError, match="<bytes>.*not a recognised"):
        load_image(b"garbage")


def test_dicom_windowing_and_bundled_file(tmp_path: Path) -> None:
    raw = np.array([[0, 1024, 1264], [864, 1100, 3000]])  # HU = raw - 1024: -1024, 0, 240, -160, 76, 1976
    _write_dicom(
        tmp_path / "w.dcm", raw, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    windowed = load_image(tmp_path / "w.dcm")[..., 0]  # window [-160, 240] HU, DICOM's LINEAR function
    assert windowed.tolist() == [[0, 102, 255], [0, 151, 255]]
    _write_dicom(tmp_path / "nowindow", raw)  # no suffix: found by the DICM preamble; min-max scaled
    assert load_image(tmp_path / "nowindow")[..., 0].tolist() == [[0, 87, 107], [73, 94, 255]]
    bundled = Path(__import__("pydicom").__file__).parent / "data/test_files/CT_small.dcm"
    if bundled.exists():
        _assert_rgb(load_image(bundled), (128, 128))


def test_nifti_slices_and_neurological_view(tmp_path: Path) -> None:
    volume = np.zeros(
        (4, 3, 5), dtype=np.float32
    )  # RAS voxel order: x = left->right, y = posterior->anterior
    volume[0, 2, 1] = 10.0  # patient-left, anterior, on axial slice 1
    _write_nifti(tmp_path / "v.nii", volume)
    axial = load_image(tmp_path / "v.nii", slice_index=1)
    assert axial.shape == (3, 4, 3)
    assert axial[0, 0, 0] == 255 and axial.sum() == 255 * 3  # anterior at the top, patient-left on the left
    assert load_image(tmp_path / "v.nii").max() == 0  # default: the middle slice (2)
    assert load_image(tmp_path / "v.nii", slice_index=0, axis=0).shape == (5, 3, 3)
    assert image_size(tmp_path / "v.nii", axis=0) == (5, 3)
    with pytest.raises(ImageReadError, match="out of range"):
        load_image(tmp_path / "v.nii", slice_index=9)


def test_bad_images_raise_naming_the_file(data_root: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.png"
    full = (data_root / CT).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"not nifti"))
    cases = [
        (data_root / "images/nope.png", "missing"),
        (data_root / "images/empty.png", "empty"),
        (data_root / "images/corrupt.png", "unreadable"),
        (truncated, "unreadable"),
        (tmp_path / "bad.dcm", "unreadable"),
        (tmp_path / "bad.nii.gz", "unreadable"),
    ]
    for path, problem in cases:
        with pytest.raises(ImageReadError) as caught:
            load_image(path)
        assert caught.value.problem == problem, path
        assert str(path) in str(caught.value)
    with pytest.raises(ImageReadError, match="zero size"):
        load_image(np.zeros((0, 4)))
    with pytest.raises(ImageReadError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ImageReadError, match="empty.png"):
        image_size(data_root / "images/empty.png")
    assert isinstance(ImageReadError("x", "missing", "y"), ValueError)


def test_load_mask(data_root: Path, tmp_path: Path) -> None:
    mask = load_mask(data_root / "masks/organ.png")
    assert mask.dtype == np.bool_ and mask.shape == (H, W) and mask.sum() == 12 * 20
    assert (load_mask(data_root / "masks/region.png") == mask).all()  # 255 and 1 both count
    assert not load_mask(data_root / "masks/zero.png").any()
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[1, 2, 2] = 1  # foreground in one channel only
    _save_png(tmp_path / "colour.png", colour)
    assert load_mask(tmp_path / "colour.png").sum() == 1
    _save_png(tmp_path / "alpha.png", np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)]))
    assert not load_mask(tmp_path / "alpha.png").any()  # alpha is not foreground
    with pytest.raises(ImageReadError, match="corrupt.png"):
        load_mask(data_root / "masks/corrupt.png")


def test_rows_sharing_root_paths_get_the_verdict_each_gets_alone(data_root: Path, tmp_path: Path) -> None:
    """A prepare chunk checks its rows' paths with one `RootPaths`, which resolves each directory once: a linked
    directory that leaves the root, a link as the last component, a name with a NUL byte and a linked directory
    inside the root are each judged as a row alone judges them, whatever row came first."""
    outside = tmp_path / "outside"
    (data_root / "leaves").symlink_to(outside, target_is_directory=True)
    (data_root / "stays").symlink_to(data_root / "masks", target_is_directory=True)
    rows = [
        _row("in-dir", "Segment.", "<SEG><mask>stays/organ.png</mask>"),
        _row("out-dir", "Segment.", "<SEG><mask>leaves/secret.png</mask>"),
        _row("plain", "Segment.", "<SEG><mask>masks/organ.png</mask>"),
        _row("out-file", "Segment.", "<SEG><mask>masks/link.png</mask>"),
        _row("nul", "Segment.", "<SEG><mask>masks/or\u0000gan.png</mask>"),
    ]
    expected = {"in-dir": None, "out-dir": "path_escapes_root", "plain": None}
    expected |= {"out-file": "path_escapes_root", "nul": "invalid_field"}

    def verdict(result: Accepted | Rejection) -> str | None:
        return result.reason.value if isinstance(result, Rejection) else None

    alone = {row["id"]: verdict(validate_row(row, "a.jsonl", 1, data_root)) for row in rows}
    assert alone == expected
    for order in (rows, rows[::-1]):
        paths = RootPaths(data_root)
        shared = {
            row["id"]: verdict(validate_row(row, "a.jsonl", 1, data_root, paths=paths)) for row in order
        }
        assert shared == expected
    with pytest.raises(ValueError, match="data root"):
        validate_row(rows[0], "a.jsonl", 1, tmp_path, paths=RootPaths(data_root))


def test_load_mask_checks_its_limits_before_decoding_and_reuses_what_it_decoded(data_root: Path) -> None:
    from medplib.data.image import DecodedFiles, ReadLimits, reusing

    with pytest.raises(ImageReadError, match="max_pixels"):
        load_mask(data_root / "images/huge.png")  # 144 M pixels declared: refused from its header
    path, small = data_root / "masks/organ.png", ReadLimits(max_pixels=H * W - 1)
    with pytest.raises(ImageReadError, match="max_pixels") as err:
        load_mask(path, limits=small)
    assert err.value.problem == "too_large"
    files = DecodedFiles(2**20)
    with reusing(files):
        assert load_mask(path, limits=ReadLimits(max_pixels=H * W)).shape == (H, W)  # validation's limits
        assert load_mask(path, limits=small).sum() == 12 * 20  # decoded already: nothing left to bound
    assert files.masks_decoded == 1


def test_png_bytes_are_pngs_any_reader_decodes_to_the_same_pixels() -> None:
    import io

    from medplib.data.rows import png_array, png_bytes

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (7, 5, 3), (7, 5, 4), (1, 9, 3), (33, 2)]:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        data = png_bytes(array)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # chunk CRCs and structure
        assert np.array_equal(png_array(data), array), shape
    mask = rng.random((6, 11)) > 0.5
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(mask)))), mask.astype(np.uint8) * 255)
    assert np.array_equal(png_array(png_bytes(mask), as_mask=True), mask)
    for bad in (np.zeros((3, 3), np.float32), np.zeros((3, 3, 2), np.uint8), np.zeros((0, 3), np.uint8)):
        with pytest.raises(ValueError, match="png_bytes takes"):
            png_bytes(bad)


def test_row_masks_are_one_bit_pngs_that_read_back_as_the_same_mask() -> None:
    import io

    from medplib.data.rows import mask_png_bytes, png_array, png_bytes

    rng = np.random.default_rng(0)
    # widths around a byte's 8 pixels: the last byte of a row is padded
    for shape in [(1, 1), (1, 8), (3, 9), (7, 15), (16, 16), (40, 33)]:
        mask = rng.random(shape) > 0.5
        data = mask_png_bytes(mask)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == "1" and image.size == shape[::-1]
        back = png_array(data, as_mask=True)
        assert back.dtype == bool and np.array_equal(back, mask), shape
        # what `png_bytes` writes (prediction files): 0/255 grey
        assert np.array_equal(png_array(png_bytes(mask), as_mask=True), mask)
    block = np.zeros((256, 256), bool)
    block[60:140, 30:200] = True
    assert len(mask_png_bytes(block)) < len(png_bytes(block))
    for bad in (np.zeros((3, 3), np.uint8), np.zeros((3, 3, 1), bool), np.zeros((0, 3), bool)):
        with pytest.raises(ValueError, match="mask_png_bytes takes"):
            mask_png_bytes(bad)


def test_file_key_stats_a_path_once_within_a_reusing_block(tmp_path: Path) -> None:
    from medplib.data.image import DecodedFiles, file_key, reusing

    path = tmp_path / "m.png"
    path.write_bytes(b"1")
    files = DecodedFiles(2**20)
    with reusing(files):
        first = file_key(path)
        path.write_bytes(b"12")  # the block keeps what it saw first
        assert file_key(path) == first and first[1] == 1
        assert file_key(tmp_path / "missing.png") is None
    assert file_key(path)[1] == 2  # outside a block: the file as it is now
    with reusing(files):
        assert file_key(path)[1] == 2  # a new block looks again


def test_bounded_cache_keeps_the_recently_used_within_its_budget() -> None:
    from medplib.data.lru import BoundedCache

    cache: BoundedCache[str] = BoundedCache(max_bytes=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert cache.get("a") == "A"  # now "b" is the least recently used
    cache.put("c", "C", 4)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C") and cache.nbytes == 8
    cache.put("big", "X", 11)  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get("big") is None and len(cache) == 2


def test_a_model_whose_views_are_alike_makes_stores_and_reads_one_view() -> None:
    """Where the vision tower reads the SAM view (the `small` preset), an image's two views are one array, one
    PNG in the row, decoded once; otherwise (`tiny`) two, each as `to_square` makes it."""
    from medplib.data.batch import image_views
    from medplib.data.rows import StoredViews, row_to_encoded
    from medplib.data.transforms import to_square
    from medplib.model.config import load_model_config

    tiny = load_model_config("tiny")
    s = tiny.sam
    alike = tiny.model_copy(
        update={
            "vision": tiny.vision.model_copy(
                update={"image_size_px": s.image_size_px, "pad_mode": s.pad_mode, "pad_value": (0, 0, 0)}
            )
        }
    )
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    for cfg, one in ((alike, True), (tiny, False)):
        vision, sam, geo = image_views(image, cfg)
        v = cfg.vision
        assert np.array_equal(vision, to_square(image, v.image_size_px, v.pad_mode, v.pad_value)[0])
        assert np.array_equal(sam, to_square(image, s.image_size_px, s.pad_mode, 0)[0])
        assert (vision is sam) == one
        views = StoredViews.of(vision, sam, geo)
        assert (views.vision_view_png == views.sam_view_png) == one
        row = {
            "sample_id": "x",
            "input_ids": [1],
            "labels": [1],
            "vision_view_png": views.vision_view_png,
            "sam_view_png": views.sam_view_png,
            "sam_geometry": views.sam_geometry,
            "num_regions": 0,
            "region_masks_png": None,
            "target_masks_png": [],
        }
        enc = row_to_encoded(row, v.image_size_px)
        assert np.array_equal(enc.vision_view, vision) and np.array_equal(enc.sam_view, sam)
        assert (enc.vision_view is enc.sam_view) == one
