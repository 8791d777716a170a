"""medplib.metrics: hand-computed cases for every metric, plus cross-checks against torchmetrics and nltk."""

from __future__ import annotations

import math
import random
import re
import warnings

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index
from torchmetrics.functional.segmentation import mean_iou

from medplib.metrics import (
    BLEU_WEIGHTS,
    answer_exact_match,
    bleu_score,
    closed_answer_correct,
    group_indices,
    mask_dice,
    mask_intersection_union,
    mask_iou,
    modality_from_image_path,
    normalize_answer,
    segmentation_scores,
    segmentation_scores_by,
    token_precision_recall_f1,
    vqa_scores,
)

approx = pytest.approx


def _mask(rows: list[str]) -> np.ndarray:
    """A binary mask from strings of '0'/'1', e.g. ["110", "000"]."""
    return np.array([[int(c) for c in row] for row in rows], dtype=np.uint8)


EMPTY = _mask(["000", "000"])
# pred has 3 pixels, gt 2, they share 1: I = 1, U = 4 -> IoU 1/4, Dice 2*1/(3+2) = 2/5.
PARTIAL_PRED = _mask(["111", "000"])
PARTIAL_GT = _mask(["100", "100"])

# ------------------------------------------------------------------------------------------------------------
# Segmentation: single masks
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "inter_union", "iou", "dice"),
    [
        pytest.param(PARTIAL_GT, PARTIAL_GT, (2, 2), 1.0, 1.0, id="perfect"),
        pytest.param(_mask(["110", "000"]), _mask(["000", "011"]), (0, 4), 0.0, 0.0, id="disjoint"),
        pytest.param(PARTIAL_PRED, PARTIAL_GT, (1, 4), 1 / 4, 2 / 5, id="partial"),
        pytest.param(_mask(["011", "011"]), _mask(["001", "000"]), (1, 4), 1 / 4, 2 / 5, id="gt-inside-pred"),
        pytest.param(EMPTY, PARTIAL_GT, (0, 2), 0.0, 0.0, id="empty-pred"),
        pytest.param(PARTIAL_PRED, EMPTY, (0, 3), 0.0, 0.0, id="empty-gt"),
        pytest.param(EMPTY, EMPTY, (0, 0), 0.0, 0.0, id="both-empty"),  # upstream: empty union -> 0
        pytest.param(None, PARTIAL_GT, (0, 2), 0.0, 0.0, id="no-prediction"),
        pytest.param(None, EMPTY, (0, 0), 0.0, 0.0, id="no-prediction-empty-gt"),
    ],
)
def test_mask_iou_and_dice_hand_computed(pred, gt, inter_union, iou, dice):
    assert mask_intersection_union(pred, gt) == inter_union
    assert mask_iou(pred, gt) == approx(iou, abs=1e-15)
    assert mask_dice(pred, gt) == approx(dice, abs=1e-15)
    # Upstream writes Dice as 2*IoU/(1+IoU); it is the same number.
    assert mask_dice(pred, gt) == approx(2 * iou / (1 + iou), abs=1e-15)


def test_mask_inputs_numpy_torch_bool_float_mixed_agree():
    expected = (1, 4)
    pred_t, gt_t = torch.from_numpy(PARTIAL_PRED), torch.from_numpy(PARTIAL_GT)
    assert mask_intersection_union(PARTIAL_PRED.astype(bool), PARTIAL_GT.astype(np.float32)) == expected
    assert mask_intersection_union(pred_t, gt_t) == expected
    assert mask_intersection_union(pred_t.bool(), gt_t.float()) == expected
    assert mask_intersection_union(pred_t, PARTIAL_GT) == expected  # torch vs numpy
    assert mask_intersection_union(PARTIAL_PRED, gt_t.bool()) == expected
    assert mask_intersection_union(PARTIAL_PRED.tolist(), PARTIAL_GT.tolist()) == expected


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"pred shape \(2, 3\) does not match gt shape \(3, 2\)"):
        mask_iou(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"\(1, 2, 3\).*\(2, 3\)"):
        mask_dice(torch.zeros(1, 2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"sample 1: pred shape \(2, 2\) does not match gt shape \(2, 3\)"):
        segmentation_scores([PARTIAL_PRED, np.zeros((2, 2))], [PARTIAL_GT, PARTIAL_GT])


def test_non_binary_masks_are_rejected():
    with pytest.raises(ValueError, match="pred must be a binary mask.*0.3"):
        mask_iou(np.array([[0.3, 1.0]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="gt must be a binary mask.*255"):
        mask_iou(torch.tensor([[0, 1]]), torch.tensor([[0, 255]]))


# ------------------------------------------------------------------------------------------------------------
# Segmentation: data-set scores
# ------------------------------------------------------------------------------------------------------------

# (pred, gt, group) with (I, U): partial (1, 4); empty-on-empty (0, 0); perfect (2, 2); missing pred (0, 3).
SAMPLES = [
    (PARTIAL_PRED, PARTIAL_GT, "ct"),
    (EMPTY, EMPTY, "mr"),
    (PARTIAL_GT, PARTIAL_GT, "ct"),
    (None, _mask(["111", "000"]), "mr"),
]


def test_segmentation_scores_hand_computed():
    preds, gts, _ = zip(*SAMPLES, strict=True)
    scores = segmentation_scores(preds, gts)
    assert scores["n"] == 4
    assert scores["mIoU"] == approx((1 / 4 + 0 + 1 + 0) / 4)  # 5/16: empty-on-empty scores 0
    assert scores["mDice"] == approx((2 / 5 + 0 + 1 + 0) / 4)  # 7/20
    assert scores["gIoU"] == approx((1 / 4 + 1 + 1 + 0) / 4)  # 9/16: empty-on-empty scores 1 (LISA)
    assert scores["cIoU"] == approx((1 + 0 + 2 + 0) / (4 + 0 + 2 + 3))  # 1/3


def test_segmentation_scores_by_group_hand_computed():
    preds, gts, groups = zip(*SAMPLES, strict=True)
    by = segmentation_scores_by(preds, gts, groups)
    assert list(by) == ["ct", "mr"]
    assert by["ct"] == approx({"mIoU": 5 / 8, "mDice": 7 / 10, "gIoU": 5 / 8, "cIoU": 1 / 2, "n": 2})
    assert by["mr"] == approx({"mIoU": 0.0, "mDice": 0.0, "gIoU": 1 / 2, "cIoU": 0.0, "n": 2})


def test_segmentation_scores_edge_cases():
    empty = segmentation_scores([], [])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("mIoU", "mDice", "gIoU", "cIoU"))
    all_empty = segmentation_scores([EMPTY, None], [EMPTY, EMPTY])
    assert all_empty == {"mIoU": 0.0, "mDice": 0.0, "gIoU": 1.0, "cIoU": 0.0, "n": 2}
    with pytest.raises(ValueError, match="2 predictions but 1 ground-truth"):
        segmentation_scores([EMPTY, EMPTY], [EMPTY])


def test_group_indices_and_modality_key():
    assert group_indices(["ct", "mr", "ct", "x"]) == {"ct": [0, 2], "mr": [1], "x": [3]}
    assert modality_from_image_path("data/ct_00--AbdomenCT1K--Case_00220--x_0359.png") == "ct"
    assert modality_from_image_path("/a/b/x_ray--Chest_Image_Pneum--1.2.276--2d_none.png") == "x"
    assert modality_from_image_path("ultrasound_00--nerve--19_3--2d_none.png") == "ultrasound"


def _random_mask_pairs(seed: int, n: int = 60, shape: tuple[int, int] = (17, 23)):
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        pred_density, gt_density = torch.rand(2, generator=generator).tolist()
        if i % 10 == 0:
            pred_density = 0.0  # empty prediction
        if i % 15 == 0:
            gt_density = 0.0  # empty target; i == 0 and 30 make both empty
        pred = (torch.rand(shape, generator=generator) < pred_density).long()
        gt = (torch.rand(shape, generator=generator) < gt_density).long()
        pairs.append((pred, gt))
    return pairs


def test_iou_dice_match_torchmetrics_on_random_masks():
    # torchmetrics.functional.classification.binary_jaccard_index / binary_f1_score (integer 0/1 inputs are
    # taken as labels, no thresholding) with their default zero_division=0 give 0 for an empty union, the
    # same as upstream, so per sample they must agree everywhere, empty cases included. Over the stacked
    # batch ("global" reduction) binary_jaccard_index is sum(I) / sum(U), i.e. our cIoU.
    # torchmetrics.functional.segmentation.mean_iou (index input, num_classes=2, no background) gives one
    # IoU per sample but NaN for an empty union: NaN -> 0 averages to our mIoU, NaN -> 1 to our gIoU.
    pairs = _random_mask_pairs(seed=0)
    preds = [p for p, _ in pairs]
    gts = [g for _, g in pairs]
    for pred, gt in pairs:
        assert mask_iou(pred, gt) == approx(binary_jaccard_index(pred, gt).item(), abs=1e-6)
        assert mask_dice(pred, gt) == approx(binary_f1_score(pred, gt).item(), abs=1e-6)
    scores = segmentation_scores(preds, gts)
    stacked_pred, stacked_gt = torch.stack(preds), torch.stack(gts)
    assert scores["cIoU"] == approx(binary_jaccard_index(stacked_pred, stacked_gt).item(), abs=1e-6)
    per_sample = mean_iou(
        stacked_pred, stacked_gt, num_classes=2, include_background=False, input_format="index"
    )
    assert int(per_sample.isnan().sum()) == 2  # the two empty-on-empty samples
    assert scores["mIoU"] == approx(per_sample.nan_to_num(0.0).mean().item(), abs=1e-6)
    assert scores["gIoU"] == approx(per_sample.nan_to_num(1.0).mean().item(), abs=1e-6)
    dice_per_sample = binary_f1_score(stacked_pred, stacked_gt, multidim_average="samplewise")
    assert scores["mDice"] == approx(dice_per_sample.mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# VQA: normalisation and per-answer scores
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes.", "yes"),
        ("The liver, and two kidneys!", "liver and 2 kidneys"),
        ("left-sided", "left sided"),  # a mark touching no space becomes a space
        ("left - sided", "left sided"),  # one touching a space is deleted
        ("3.5 cm.", "3.5 cm"),  # a period before a digit stays
        ("3.", "3"),  # ... and one after a digit goes
        ("yes.", "yes"),
        (".5 mm", ".5 mm"),
        ("1,000 ml", "1000 ml"),  # a digit-comma-digit anywhere deletes every mark
        ("None", "0"),
        ("(CT)", "ct"),
        ("T2: weighted", "t2: weighted"),  # colons are kept
        ("it's an MRI", "it's mri"),  # apostrophes are kept, articles dropped
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised
    assert normalize_answer(normalised) == normalised  # idempotent


def _upstream_normalize(text: str) -> str:
    """The VQA/LLaVA-Med normaliser upstream's `cal_metric.py` calls, restated from its rules (periodStrip with its
    look-ahead typo, commaStrip, the punctuation list, the number map and articles; contractions left out)."""
    period, comma = re.compile(r"(?!<=\d)(\.)(?!\d)"), re.compile(r"(\d)(\,)(\d)")
    text = text.lower()
    out = text
    for p in ';/[]"{}()=+\\_-><@`,?!':
        if (p + " " in text or " " + p in text) or comma.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = period.sub("", out)
    numbers = {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
    words = [numbers.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in ("a", "an", "the"))


@pytest.mark.parametrize(
    "raw",
    [
        "3.",
        "3.5",
        "yes.",
        "Yes.",
        "No.",
        "3.5 cm.",
        ".5 mm",
        "v2.0.",
        "The left putamen.",
        "2, 3 and 4.",
        "1,000.5",
        "T1-weighted MRI.",
        "a.b",
        "(CT).",
        "It is 12.",
        "e.g. the brain",
        "...",
    ],
)
def test_normalize_answer_matches_upstream(raw):
    assert normalize_answer(raw) == _upstream_normalize(raw)


def test_closed_answer_correct():
    assert closed_answer_correct("Yes.", "yes")
    assert closed_answer_correct("NO", "no")
    assert not closed_answer_correct("yes, it is", "yes")
    assert not closed_answer_correct("", "no")


@pytest.mark.parametrize(
    ("prediction", "reference", "score"),
    [
        ("liver", "liver", 1.0),
        ("liver liver", "liver", 1 / 2),  # prediction words counted with repetition
        ("liver", "liver liver", 1.0),  # reference words counted once
        ("the liver lesion", "liver", 1 / 2),  # article dropped: 1 of 2 prediction words
        ("kidney", "liver", 0.0),
        ("", "liver", 0.0),
        ("liver", "", 0.0),
        ("", "", 0.0),
    ],
)
def test_answer_exact_match(prediction, reference, score):
    assert answer_exact_match(prediction, reference) == approx(score, abs=1e-15)


@pytest.mark.parametrize(
    ("prediction", "reference", "prf"),
    [
        ("liver", "liver", (1.0, 1.0, 1.0)),
        ("right kidney cyst", "left kidney cyst", (2 / 3, 2 / 3, 2 / 3)),
        ("kidney cyst", "left kidney cyst", (1.0, 2 / 3, 4 / 5)),
        # upstream counts tp per prediction occurrence: tp 2, fn 1 -> recall 2/3 (SQuAD would say 1/2)
        ("liver liver", "liver lesion", (1.0, 2 / 3, 4 / 5)),
        ("kidney", "liver", (0.0, 0.0, 0.0)),
        ("", "liver", (0.0, 0.0, 0.0)),
        ("liver", "", (0.0, 0.0, 0.0)),
        ("", "", (0.0, 0.0, 0.0)),
    ],
)
def test_token_precision_recall_f1(prediction, reference, prf):
    scores = token_precision_recall_f1(prediction, reference)
    assert (scores.precision, scores.recall, scores.f1) == approx(prf, abs=1e-15)


E = math.e


@pytest.mark.parametrize(
    ("hyp", "ref", "weights", "smoothing", "expected"),
    [
        ("a b c d".split(), "a b c d".split(), BLEU_WEIGHTS["bleu"], "none", 1.0),
        # c = 2 < r = 3 -> BP = e^(1 - 3/2); p1 = p2 = 1; no trigram at all
        (["x", "y"], ["x", "y", "z"], BLEU_WEIGHTS["bleu_1"], "none", E**-0.5),
        (["x", "y"], ["x", "y", "z"], BLEU_WEIGHTS["bleu_2"], "none", E**-0.5),
        (["x", "y"], ["x", "y", "z"], BLEU_WEIGHTS["bleu_3"], "none", 0.0),
        (["x", "y"], ["x", "y", "z"], BLEU_WEIGHTS["bleu"], "none", 0.0),
        (["x", "y"], ["x", "y", "z"], BLEU_WEIGHTS["bleu"], "epsilon", 0.1**0.5 * E**-0.5),
        # clipping: "a" counted once against the reference; c = 3 > r = 2 -> BP = 1
        (["a", "a", "b"], ["a", "b"], BLEU_WEIGHTS["bleu_1"], "none", 2 / 3),
        (["a", "a", "b"], ["a", "b"], BLEU_WEIGHTS["bleu_2"], "none", 1 / 2),
        # a correct one-word answer: 0 on 4-gram BLEU without smoothing, 0.1^(3/4) with epsilon smoothing
        (["liver"], ["liver"], BLEU_WEIGHTS["bleu"], "none", 0.0),
        (["liver"], ["liver"], BLEU_WEIGHTS["bleu_1"], "none", 1.0),
        (["liver"], ["liver"], BLEU_WEIGHTS["bleu"], "epsilon", 0.1**0.75),
        ([], ["liver"], BLEU_WEIGHTS["bleu_1"], "epsilon", 0.0),
        (["liver"], [], BLEU_WEIGHTS["bleu_1"], "epsilon", 0.0),
        ([], [], BLEU_WEIGHTS["bleu"], "none", 0.0),
        (["kidney"], ["liver"], BLEU_WEIGHTS["bleu"], "epsilon", 0.0),  # no unigram match -> 0, as nltk
    ],
)
def test_bleu_hand_computed(hyp, ref, weights, smoothing, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bleu_score(hyp, ref, weights, smoothing=smoothing) == approx(expected, abs=1e-15)


def test_bleu_matches_nltk_sentence_bleu_on_random_sentences():
    rng = random.Random(0)
    vocab = ["liver", "lesion", "left", "right", "kidney", "cyst", "ct", "2", "mass", "no"]
    # the "none" smoothing equals nltk without a smoothing function (method0), except that nltk returns
    # ~1e-77 instead of 0 when a weighted order has no match: hence abs=1e-12.
    nltk_smoothing = {"none": None, "epsilon": SmoothingFunction(epsilon=0.1).method1}
    checked = 0
    for _ in range(150):
        ref = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        hyp = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        if rng.random() < 0.3:  # near-copies give non-trivial 3- and 4-gram precision
            hyp = ref[: rng.randint(0, len(ref))] + hyp[:2]
        for weights in BLEU_WEIGHTS.values():
            for smoothing, nltk_fn in nltk_smoothing.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # nltk's method0 warns on zero counts
                    expected = sentence_bleu([ref], hyp, weights=weights, smoothing_function=nltk_fn)
                assert bleu_score(hyp, ref, weights, smoothing=smoothing) == approx(
                    float(expected), rel=1e-12, abs=1e-12
                ), (hyp, ref, weights, smoothing)
                checked += expected > 0.01
    assert checked > 300  # the comparison is not just zeros against zeros


def test_bleu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        bleu_score(["a"], ["a"], smoothing="method7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        bleu_score(["a"], ["a"], weights=())


# ------------------------------------------------------------------------------------------------------------
# VQA: data-set scores
# ------------------------------------------------------------------------------------------------------------

RECORDS = [
    {"text": "Yes.", "gt": "yes", "answer_type": "closed", "modality": "ct"},  # correct
    {"text": "no", "gt": "yes", "answer_type": "yes/no", "modality": "mr"},  # wrong
    # open: exact 1/2, P 1, R 2/3, F1 4/5; BLEU-1 = 1/2 (BP 1), no bigram match -> BLEU, BLEU-2..4 = 0
    {"text": "liver liver", "gt": "liver lesion", "answer_type": "open", "modality": "ct"},
    # normalises to "2 lesions" both sides: exact/P/R/F1 1, BLEU-1 = BLEU-2 = 1, no trigram -> BLEU-3/4 = 0
    {"text": "two lesions", "gt": "2 lesions", "answer_type": "Number"},
]


def test_vqa_scores_hand_computed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = vqa_scores(RECORDS)
    nan = float("nan")
    expected_overall = {
        "n": 4,
        "n_closed": 2,
        "n_open": 2,
        "closed_accuracy": 1 / 2,
        "open_exact_match": (1 / 2 + 1) / 2,
        "open_precision": 1.0,
        "open_recall": (2 / 3 + 1) / 2,
        "open_f1": (4 / 5 + 1) / 2,
        "open_bleu": 0.0,
        "open_bleu_1": (1 / 2 + 1) / 2,
        "open_bleu_2": 1 / 2,
        "open_bleu_3": 0.0,
        "open_bleu_4": 0.0,
    }
    overall = {k: v for k, v in scores.items() if not k.startswith("by_")}
    assert overall == approx(expected_overall)

    by_type = scores["by_answer_type"]
    assert list(by_type) == ["closed", "yes/no", "open", "number"]
    assert by_type["closed"]["closed_accuracy"] == 1.0 and math.isnan(by_type["closed"]["open_f1"])
    assert by_type["yes/no"]["closed_accuracy"] == 0.0
    assert by_type["open"]["open_f1"] == approx(4 / 5) and math.isnan(by_type["open"]["closed_accuracy"])
    assert by_type["number"]["open_bleu_2"] == approx(1.0)

    by_modality = scores["by_modality"]
    assert list(by_modality) == ["ct", "mr"]  # the record without a modality is only in the overall numbers
    assert by_modality["ct"]["n"] == 2
    assert by_modality["ct"]["closed_accuracy"] == 1.0
    assert by_modality["ct"]["open_recall"] == approx(2 / 3)
    assert by_modality["mr"] == approx(
        {"n": 1, "n_closed": 1, "n_open": 0, "closed_accuracy": 0.0}
        | {f"open_{k}": nan for k in ("exact_match", "precision", "recall", "f1")}
        | {f"open_{k}": nan for k in BLEU_WEIGHTS},
        nan_ok=True,
    )


def test_vqa_scores_epsilon_smoothing_matches_nltk():
    scores = vqa_scores(RECORDS, smoothing="epsilon")
    method1 = SmoothingFunction(epsilon=0.1).method1
    liver = sentence_bleu([["liver", "lesion"]], ["liver", "liver"], smoothing_function=method1)
    lesions = sentence_bleu([["2", "lesions"]], ["2", "lesions"], smoothing_function=method1)
    assert liver == approx(0.5**0.25 * 0.1**0.75)
    assert lesions == approx(0.1**0.5)
    assert scores["open_bleu"] == approx((liver + lesions) / 2)
    assert scores["open_f1"] == approx((4 / 5 + 1) / 2)  # smoothing touches BLEU only


def test_vqa_scores_errors_name_the_record():
    with pytest.raises(ValueError, match=r"record 1: answer_type 'choice'"):
        vqa_scores([RECORDS[0], {"text": "a", "gt": "b", "answer_type": "choice"}])
    with pytest.raises(ValueError, match=r"record 0 has no 'gt'"):
        vqa_scores([{"text": "a", "answer_type": "open"}])
    empty = vqa_scores([])
    assert empty["n"] == 0 and math.isnan(empty["closed_accuracy"]) and empty["by_modality"] == {}
