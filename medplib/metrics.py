"""Evaluation metrics: pixel grounding (IoU, Dice, gIoU, cIoU) and medical VQA (accuracy, token F1, BLEU).

Pure numpy/torch; no Ray, no network, no nltk. Every score is a fraction in [0, 1] (upstream prints x100).
The definitions follow upstream MedPLIB's evaluation (`model/eval/vqa_infer.py::validate_seg`,
`model/eval/cal_metric.py`, `evaluate_metrics.py`, LLaVA-Med's `glossary.normalize_word`) and LISA's
training-time `validate` (gIoU/cIoU); where we differ from upstream the docstring says so.

Segmentation, per sample, on binary masks P (prediction, already thresholded by the caller, upstream
`sigmoid(logit) > 0.1` at the original image size) and G (ground truth), with I = |P & G| and U = |P | G|:

    IoU  = I / U, and 0 when U == 0                     (upstream `calculate_iou`)
    Dice = 2I / (|P| + |G|) = 2I / (I + U), 0 when U == 0 (= upstream's 2*IoU / (1 + IoU), the same number)

and over a data set of N samples:

    mIoU  = mean of IoU            (upstream's headline; an empty-on-empty sample scores 0)
    mDice = mean of Dice           (upstream's headline; likewise 0 for empty-on-empty)
    gIoU  = mean of IoU, but a sample with U == 0 scores 1.0   (LISA: `acc_iou[union_i == 0] += 1.0`)
    cIoU  = sum(I) / sum(U), 0 when sum(U) == 0                (LISA: `intersection.sum / union.sum`)

A missing prediction (`None`: the model emitted no `<SEG>`) is scored as an all-empty mask. Upstream's
`validate_seg` scores it IoU 0, which is what an empty mask gets for mIoU/mDice too; for gIoU an empty
prediction on an empty target earns 1.0, as LISA would give it.

VQA: answers are lower-cased and normalised by `normalize_answer` (see there). "closed" / "yes/no" questions
score exact string equality of the normalised answers; "open" / "other" / "number" questions score upstream's
"exact match" (`answer_exact_match`), token precision / recall / F1 (`token_precision_recall_f1`), and BLEU
(`bleu_score`): cumulative 4-gram BLEU plus single-order BLEU-1..4, with the same smoothing for all of them.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

MaskLike = np.ndarray | torch.Tensor

# ------------------------------------------------------------------------------------------------------------
# Grouping
# ------------------------------------------------------------------------------------------------------------


def group_indices(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of each distinct key, in first-seen order: `["ct", "mr", "ct"]` -> `{"ct": [0, 2], "mr": [1]}`.

    The one grouping rule behind every per-modality / per-task / per-answer-type breakdown in this module.
    """
    groups: dict[Hashable, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return groups


def modality_from_image_path(image_path: str) -> str:
    """Upstream's per-modality key for grounding: the file name up to its first `_`.

    SA-Med2D-20M names start with the modality: `ct_00--AbdomenCT1K--...png` -> "ct",
    `x_ray--Chest...png` -> "x" (upstream's key, kept as is), `ultrasound_00--...png` -> "ultrasound".
    """
    return os.path.basename(image_path).split("_")[0]


# ------------------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------------------


def _as_bool_mask(mask: Any, name: str) -> MaskLike:
    """`mask` as a bool numpy array or bool tensor; anything other than bool or values in {0, 1} is an error."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            return mask
        not_binary = (mask != 0) & (mask != 1)
        if bool(not_binary.any()):
            example = mask[not_binary].flatten()[0].item()
            raise ValueError(
                f"{name} must be a binary mask (bool or 0/1), found value {example!r}; threshold it first"
            )
        return mask != 0
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"{name} must be a numeric or bool array, got dtype {array.dtype}")
    not_binary = (array != 0) & (array != 1)
    if not_binary.any():
        example = array[not_binary].flat[0].item()
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1), found value {example!r}; threshold it first"
        )
    return array != 0


def mask_intersection_union(pred: MaskLike | None, gt: MaskLike) -> tuple[int, int]:
    """Pixel counts (|P & G|, |P | G|) of two binary masks of the same shape.

    `pred` and `gt` may be numpy arrays or torch tensors (on any device; mixed is fine), bool or 0/1 valued;
    other values raise ValueError (threshold probabilities first). `pred=None` means "no mask predicted" and
    counts as an all-empty mask. Shapes must match exactly (no squeezing, no resizing), else ValueError.
    These two integers are all the data-set scores need, so a distributed eval can ship them instead of masks.
    """
    gt_mask = _as_bool_mask(gt, "gt")
    if pred is None:
        return 0, int(gt_mask.sum())
    pred_mask = _as_bool_mask(pred, "pred")
    if tuple(pred_mask.shape) != tuple(gt_mask.shape):
        raise ValueError(
            f"pred shape {tuple(pred_mask.shape)} does not match gt shape {tuple(gt_mask.shape)}; "
            "masks must be compared at the same (original image) size"
        )
    if isinstance(pred_mask, torch.Tensor) or isinstance(gt_mask, torch.Tensor):
        device = pred_mask.device if isinstance(pred_mask, torch.Tensor) else gt_mask.device
        pred_mask = torch.as_tensor(pred_mask, device=device)
        gt_mask = torch.as_tensor(gt_mask, device=device)
        intersection = int(torch.logical_and(pred_mask, gt_mask).sum())
        union = int(torch.logical_or(pred_mask, gt_mask).sum())
    else:
        intersection = int(np.count_nonzero(pred_mask & gt_mask))
        union = int(np.count_nonzero(pred_mask | gt_mask))
    return intersection, union


def mask_iou(pred: MaskLike | None, gt: MaskLike) -> float:
    """IoU = |P & G| / |P | G|, and 0.0 when the union is empty (upstream MedPLIB `calculate_iou`).

    Upstream meant 0 for an empty union (its code would in fact crash there, calling `.item()` on an int).
    Same value as `torchmetrics.functional.classification.binary_jaccard_index` with its default
    `zero_division=0`. For the LISA convention (empty union = 1.0) see `segmentation_scores`' gIoU.
    """
    intersection, union = mask_intersection_union(pred, gt)
    return intersection / union if union > 0 else 0.0


def mask_dice(pred: MaskLike | None, gt: MaskLike) -> float:
    """Dice = 2|P & G| / (|P| + |G|), and 0.0 when both masks are empty.

    Equal to upstream's `2 * IoU / (1 + IoU)` (an identity, not an approximation) and to
    `torchmetrics.functional.classification.binary_f1_score` with `zero_division=0`.
    """
    intersection, union = mask_intersection_union(pred, gt)
    return 2 * intersection / (intersection + union) if union > 0 else 0.0


def segmentation_scores_from_counts(intersections: Sequence[int], unions: Sequence[int]) -> dict[str, float]:
    """Data-set scores from per-sample (|P & G|, |P | G|) counts; see the module docstring for definitions.

    Returns `{"mIoU", "mDice", "gIoU", "cIoU", "n"}` (n = number of samples, an int). With no samples every
    score is NaN. Differences from LISA's code, all below 1e-5 relative: LISA divides by `union + 1e-5`
    per sample and by `sum(union) + 1e-10` for cIoU; we divide exactly. LISA's `ignore_index=255` pixels
    (excluded from both counts) have no counterpart here: zero them in both masks before counting.
    """
    inter = np.asarray(intersections, dtype=np.float64).reshape(-1)
    union = np.asarray(unions, dtype=np.float64).reshape(-1)
    if inter.shape != union.shape:
        raise ValueError(
            f"got {inter.size} intersections but {union.size} unions; need one of each per sample"
        )
    if inter.size == 0:
        nan = float("nan")
        return {"mIoU": nan, "mDice": nan, "gIoU": nan, "cIoU": nan, "n": 0}
    bad = np.flatnonzero((inter < 0) | (inter > union))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sample {i}: need 0 <= intersection <= union, got {inter[i]:g} and {union[i]:g}")
    nonempty = union > 0
    safe_union = np.where(nonempty, union, 1.0)
    iou = np.where(nonempty, inter / safe_union, 0.0)
    dice = np.where(nonempty, 2 * inter / (inter + safe_union), 0.0)
    giou = np.where(nonempty, iou, 1.0)
    union_total = union.sum()
    return {
        "mIoU": float(iou.mean()),
        "mDice": float(dice.mean()),
        "gIoU": float(giou.mean()),
        "cIoU": float(inter.sum() / union_total) if union_total > 0 else 0.0,
        "n": int(inter.size),
    }


def _counts_per_sample(
    preds: Sequence[MaskLike | None], gts: Sequence[MaskLike]
) -> tuple[list[int], list[int]]:
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions but {len(gts)} ground-truth masks")
    intersections, unions = [], []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        try:
            intersection, union = mask_intersection_union(pred, gt)
        except ValueError as err:
            raise ValueError(f"sample {i}: {err}") from err
        intersections.append(intersection)
        unions.append(union)
    return intersections, unions


def segmentation_scores(preds: Sequence[MaskLike | None], gts: Sequence[MaskLike]) -> dict[str, float]:
    """mIoU, mDice (upstream MedPLIB), gIoU, cIoU (LISA) and n over paired binary masks.

    `preds[i]` is the thresholded prediction for `gts[i]` (same shape; `None` = no mask predicted, scored as
    empty). Definitions in the module docstring. Errors name the sample index.
    """
    return segmentation_scores_from_counts(*_counts_per_sample(preds, gts))


def segmentation_scores_by(
    preds: Sequence[MaskLike | None], gts: Sequence[MaskLike], groups: Sequence[Hashable]
) -> dict[Hashable, dict[str, float]]:
    """`segmentation_scores` per group, e.g. per modality (`modality_from_image_path`) or per task.

    `groups[i]` is sample i's key; the result is keyed in first-seen order. Each group's scores are computed
    on that group alone (so a group's cIoU is its own sum(I) / sum(U)).
    """
    if len(groups) != len(gts):
        raise ValueError(f"got {len(groups)} group keys for {len(gts)} samples")
    intersections, unions = _counts_per_sample(preds, gts)
    return {
        key: segmentation_scores_from_counts([intersections[i] for i in idx], [unions[i] for i in idx])
        for key, idx in group_indices(groups).items()
    }


# ------------------------------------------------------------------------------------------------------------
# VQA: answer normalisation
# ------------------------------------------------------------------------------------------------------------

# The punctuation the VQA / LLaVA-Med normaliser touches. Not in the list, so kept: ' : . (handled apart)
# % * # & $ ~ ^ |.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Upstream writes "(?!<=\d)(\.)(?!\d)": a typo for a look-behind that makes the first group a look-ahead for the
# text "<=" + digit, always true at a period. The rule that runs is "a period not followed by a digit"
# ("3." -> "3", "3.5" and ".5" kept), and that is the rule we keep, so our numbers compare with its tables.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
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
_ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> str:
    """Lower-case and normalise an answer the way upstream does before every VQA metric.

    1. Lower-case.
    2. Punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted if it touches a
       space anywhere in the text ("yes, it" -> "yes it") or if the text has a digit-comma-digit anywhere
       ("1,000" -> "1000"); otherwise it becomes a space ("left-sided" -> "left sided").
    3. Periods are deleted unless a digit follows ("3.5 cm" keeps its point, "yes." -> "yes", "3." -> "3").
    4. Split on whitespace; number words zero..ten become digits and "none" becomes "0"; articles a/an/the
       are dropped; words re-joined by single spaces.
    Colons, apostrophes and % # & * $ ~ ^ | are kept, as upstream keeps them.

    Two deliberate differences from upstream's `normalize_word`: it deletes at most 32 periods (it passes
    `re.UNICODE` where `re.sub` takes a count), we delete all; and it expands apostrophe-less contractions
    with the VQA table ("dont" -> "don't"), which we skip, so "dont" and "don't" stay different words.
    The function is idempotent, so normalising twice (as upstream does) changes nothing.
    """
    text = text.lower()
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in _PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        cleaned = cleaned.replace(mark, "" if (delete_marks or touches_space) else " ")
    cleaned = _PERIOD_NOT_BEFORE_DIGIT.sub("", cleaned)
    words = (_NUMBER_WORDS.get(word, word) for word in cleaned.split())
    return " ".join(word for word in words if word not in _ARTICLES)


# ------------------------------------------------------------------------------------------------------------
# VQA: per-answer scores
# ------------------------------------------------------------------------------------------------------------


class TokenScores(NamedTuple):
    """Token-overlap scores of one prediction against one reference (upstream `calculate_f1score`)."""

    precision: float
    recall: float
    f1: float


def closed_answer_correct(prediction: str, reference: str) -> bool:
    """Closed (yes/no) accuracy for one answer: the normalised strings are equal (upstream `gt == pred`).

    "Yes." matches "yes", but "yes, it is" does not match "yes".
    """
    return normalize_answer(prediction) == normalize_answer(reference)


def answer_exact_match(prediction: str, reference: str) -> float:
    """Upstream's "exact match acc score" (`calculate_exactmatch`), despite the name a soft score:

        (number of distinct reference words that occur in the prediction) / (number of prediction words)

    on normalised, whitespace-split answers, 0.0 for an empty prediction. Prediction words are counted with
    repetition, reference words without: prediction "liver liver", reference "liver" -> 1/2; prediction
    "liver", reference "liver liver" -> 1/1.
    """
    predicted = normalize_answer(prediction).split()
    if not predicted:
        return 0.0
    return sum(1 for word in set(normalize_answer(reference).split()) if word in predicted) / len(predicted)


def token_precision_recall_f1(prediction: str, reference: str) -> TokenScores:
    """Token precision, recall and F1 exactly as upstream's `calculate_f1score` (normalised, whitespace-split).

    With prediction word counts C and reference word counts R:
        tp = sum of C[w] over words in both, fp = sum of C[w] over prediction-only words,
        fn = sum of R[w] over reference-only words;
        precision = tp / (tp + fp) (= tp / prediction length), recall = tp / (tp + fn), F1 = 2PR / (P + R);
        all three 0.0 when either answer is empty or tp == 0.
    Note tp counts *prediction* occurrences, so a repeated matching word raises recall above the usual
    (SQuAD) value: prediction "liver liver", reference "liver lesion" -> tp 2, fn 1, recall 2/3 (SQuAD: 1/2).
    We keep upstream's formula so our numbers compare with its tables.
    """
    predicted = Counter(normalize_answer(prediction).split())
    referenced = Counter(normalize_answer(reference).split())
    if not predicted or not referenced:
        return TokenScores(0.0, 0.0, 0.0)
    tp = sum(count for word, count in predicted.items() if word in referenced)
    if tp == 0:
        return TokenScores(0.0, 0.0, 0.0)
    fp = sum(count for word, count in predicted.items() if word not in referenced)
    fn = sum(count for word, count in referenced.items() if word not in predicted)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return TokenScores(precision, recall, 2 * precision * recall / (precision + recall))


BleuSmoothing = Literal["none", "epsilon"]
BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu": (0.25, 0.25, 0.25, 0.25),
    "bleu_1": (1.0, 0.0, 0.0, 0.0),
    "bleu_2": (0.0, 1.0, 0.0, 0.0),
    "bleu_3": (0.0, 0.0, 1.0, 0.0),
    "bleu_4": (0.0, 0.0, 0.0, 1.0),
}
"""The BLEU variants `vqa_scores` reports: cumulative 4-gram ("bleu", nltk's default) and single orders."""


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_score(
    hypothesis: Sequence[str],
    reference: Sequence[str],
    weights: Sequence[float] = BLEU_WEIGHTS["bleu"],
    smoothing: BleuSmoothing = "none",
    epsilon: float = 0.1,
) -> float:
    """Sentence BLEU of token lists against one reference; matches `nltk.translate.bleu_score.sentence_bleu`.

        BLEU = BP * exp(sum_n w_n * log p_n),   BP = 1 if c > r, else exp(1 - r / c)   (c, r: lengths)

    p_n is the modified (clipped) n-gram precision: matches clipped to the reference's n-gram counts, over
    max(1, number of hypothesis n-grams). BLEU is 0.0 when the hypothesis shares no unigram with the reference
    (this covers an empty hypothesis or reference), as in nltk. For an order n with no matching n-gram:

    * smoothing="none" (upstream's choice: nltk without a smoothing function): the score is 0.0 if w_n > 0,
      and the order is ignored if w_n == 0. nltk gets ~1e-77 here by substituting the smallest float and
      warns; we return 0.0 exactly and never warn. So any answer shorter than 4 words scores 0 on the
      default 4-gram BLEU and on BLEU-4 — that is what upstream's tables measure.
    * smoothing="epsilon": p_n = epsilon / max(1, hypothesis n-grams) (nltk `SmoothingFunction().method1`,
      epsilon 0.1): a correct one-word answer scores 0.1 ** 0.75 ~= 0.178 on 4-gram BLEU instead of 0.

    Never NaN, never a warning.
    """
    if smoothing not in ("none", "epsilon"):
        raise ValueError(f"smoothing must be 'none' or 'epsilon', got {smoothing!r}")
    if len(weights) == 0 or any(w < 0 for w in weights):
        raise ValueError(
            f"weights must be a non-empty sequence of non-negative numbers, got {tuple(weights)}"
        )
    hyp, ref = list(hypothesis), list(reference)
    log_terms = []
    for n, weight in enumerate(weights, start=1):
        hyp_counts, ref_counts = _ngram_counts(hyp, n), _ngram_counts(ref, n)
        matches = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        total = max(1, sum(hyp_counts.values()))
        if n == 1 and matches == 0:
            return 0.0
        if matches > 0:
            log_terms.append(weight * math.log(matches / total))
        elif smoothing == "epsilon":
            log_terms.append(weight * math.log(epsilon / total))
        elif weight > 0:
            return 0.0
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(math.fsum(log_terms))


# ------------------------------------------------------------------------------------------------------------
# VQA: records and data-set scores
# ------------------------------------------------------------------------------------------------------------

OPEN_ANSWER_TYPES = frozenset({"open", "other", "number"})
CLOSED_ANSWER_TYPES = frozenset({"closed", "yes/no"})
_OPEN_KEYS = ("exact_match", "precision", "recall", "f1", *BLEU_WEIGHTS)


def _record_field(record: Mapping[str, Any], key: str, index: int) -> str:
    if key not in record or record[key] is None:
        raise ValueError(f"VQA record {index} has no {key!r}; need 'text', 'gt' and 'answer_type'")
    return str(record[key])


def score_vqa_record(record: Mapping[str, Any], smoothing: BleuSmoothing = "none", index: int = 0) -> dict:
    """Per-answer scores of one record `{"text": prediction, "gt": reference, "answer_type": ...}`.

    answer_type (case-insensitive) "closed" / "yes/no" -> `{"kind": "closed", "correct": 0.0 or 1.0}`;
    "open" / "other" / "number" -> `{"kind": "open", "exact_match", "precision", "recall", "f1", "bleu",
    "bleu_1".."bleu_4"}`. Any other answer_type raises ValueError (upstream silently skips it). `index` only
    labels error messages.
    """
    prediction = _record_field(record, "text", index)
    reference = _record_field(record, "gt", index)
    answer_type = _record_field(record, "answer_type", index).lower()
    if answer_type in CLOSED_ANSWER_TYPES:
        return {"kind": "closed", "correct": float(closed_answer_correct(prediction, reference))}
    if answer_type not in OPEN_ANSWER_TYPES:
        known = sorted(CLOSED_ANSWER_TYPES | OPEN_ANSWER_TYPES)
        raise ValueError(f"VQA record {index}: answer_type {answer_type!r} is not one of {known}")
    tokens = token_precision_recall_f1(prediction, reference)
    hyp, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    scores = {
        "kind": "open",
        "exact_match": answer_exact_match(prediction, reference),
        "precision": tokens.precision,
        "recall": tokens.recall,
        "f1": tokens.f1,
    }
    for name, weights in BLEU_WEIGHTS.items():
        scores[name] = bleu_score(hyp, ref, weights, smoothing=smoothing)
    return scores


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def _summarise_vqa(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    closed = [row["correct"] for row in rows if row["kind"] == "closed"]
    open_rows = [row for row in rows if row["kind"] == "open"]
    summary: dict[str, float] = {
        "n": len(rows),
        "n_closed": len(closed),
        "n_open": len(open_rows),
        "closed_accuracy": _mean(closed),
    }
    for key in _OPEN_KEYS:
        summary[f"open_{key}"] = _mean([row[key] for row in open_rows])
    return summary


def vqa_scores(records: Sequence[Mapping[str, Any]], smoothing: BleuSmoothing = "none") -> dict[str, Any]:
    """Data-set VQA scores of prediction records (upstream's answer JSONL rows work as they are).

    Each record needs `text` (prediction), `gt` (reference) and `answer_type` (see `score_vqa_record`);
    `modality` is optional. Returns the overall summary

        n, n_closed, n_open, closed_accuracy,
        open_exact_match, open_precision, open_recall, open_f1, open_bleu, open_bleu_1 .. open_bleu_4

    (plain means over the closed resp. open records; NaN where there are none — upstream prints 0 instead)
    plus `by_answer_type` (the same summary per lower-cased answer_type as written, e.g. "yes/no", "number")
    and `by_modality` (per `modality`, over the records that have one). `smoothing` applies to every BLEU
    variant; "none" reproduces upstream (see `bleu_score`).
    """
    rows = [score_vqa_record(record, smoothing=smoothing, index=i) for i, record in enumerate(records)]
    result: dict[str, Any] = _summarise_vqa(rows)
    answer_types = [str(record["answer_type"]).lower() for record in records]
    result["by_answer_type"] = {
        key: _summarise_vqa([rows[i] for i in idx]) for key, idx in group_indices(answer_types).items()
    }
    with_modality = [i for i, record in enumerate(records) if record.get("modality") is not None]
    modalities = [records[i]["modality"] for i in with_modality]
    result["by_modality"] = {
        key: _summarise_vqa([rows[with_modality[j]] for j in idx])
        for key, idx in group_indices(modalities).items()
    }
    return result
