"""The evaluation report: `report.html` (self-contained: every image inlined as base64 PNG), its charts and
gallery as PNG files, and the before/after comparison (`write_comparison_report`).

Layout of an eval folder after `workflows.eval.evaluate.evaluate`::

    OUT/report.html                    summary table, then one section per split (in-distribution first, then the
                                       zero-shot cross-subject / held-out splits): tables per task and per
                                       modality, a bar chart, the best and worst grounding cases, VQA examples
    OUT/plots/<split>_per_modality.png  mDice, VQA closed accuracy and open token F1 per modality (x100)
    OUT/gallery/<split>_{best,worst}_<i>.png  image with ground truth (green) and prediction (magenta) overlaid
    OUT/comparison.{html,json}, OUT/plots/comparison_<split>.png   with `compare_with` / `medplib eval-compare`

Charts are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no display). The
HTML sets `document.body.dataset.imagesLoaded` to "true" once every `<img>` has decoded (the browser test reads
it from the dumped DOM).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from workflows.eval.config import REPORT_NAME, EvalConfig

logger = logging.getLogger(__name__)

GT_RGB = (0, 220, 0)  # ground truth: green
PRED_RGB = (255, 0, 255)  # prediction: magenta
FILL_ALPHA = 0.35
GALLERY_DISPLAY_PX = 256
CHART_DPI = 110
# (section, key, label) of the headline numbers in tables and in the before/after comparison.
KEY_METRICS = (
    ("grounding", "teacher_forced_mDice", "Grounding mDice, teacher-forced"),
    ("grounding", "mDice", "Grounding mDice"),
    ("grounding", "seg_token_rate", "<SEG> emitted (rate)"),
    ("grounding", "mIoU", "Grounding mIoU"),
    ("grounding", "gIoU", "Grounding gIoU"),
    ("grounding", "cIoU", "Grounding cIoU"),
    ("vqa", "closed_accuracy", "VQA closed accuracy"),
    ("vqa", "baseline_closed_accuracy", "VQA closed accuracy, question-only baseline"),
    ("vqa", "closed_top_answer_share", "VQA closed, the most common answer's share (mean over kinds)"),
    ("vqa", "open_f1", "VQA open token F1"),
    ("vqa", "open_recall", "VQA open recall"),
    ("vqa", "open_bleu_1", "VQA open BLEU-1"),
)
KIND_TITLES = {
    "in_distribution": "In-distribution",
    "zero_shot": "Zero-shot (cross-subject / held-out)",
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 34px 0 8px; border-bottom: 2px solid #e3e6eb;
     padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; color: #39414f; }
.meta { color: #5b6474; margin: 2px 0; } code { background: #f0f2f5; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #dde1e7; padding: 4px 8px; } th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.na { color: #9aa2ae; text-align: center; }
.badge { display: inline-block; font-size: 12px; padding: 1px 8px; border-radius: 10px; margin-left: 8px;
         vertical-align: middle; } .in_distribution { background: #e3f1ff; color: #0b4f8a; }
.zero_shot { background: #fff1d6; color: #8a5a00; }
.note { color: #5b6474; font-size: 13px; max-width: 900px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 268px; border: 1px solid #dde1e7; border-radius: 6px; padding: 6px; font-size: 12px; }
.card img { width: 256px; height: auto; display: block; margin: 0 auto 4px; image-rendering: auto; }
.card .q { font-weight: 600; } .card .score { float: right; font-weight: 700; }
.legend span { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin: 0 4px 0 10px; }
img.chart { max-width: 100%; border: 1px solid #eef0f3; }
.pos { color: #167a2e; } .neg { color: #b3261e; }
td.text { max-width: 360px; overflow-wrap: anywhere; }
"""

# Sets data-images-loaded on <body> once every <img> has loaded: "true" if all decoded, "false" otherwise.
IMAGES_LOADED_JS = """
(function () {
  function check() {
    var imgs = Array.prototype.slice.call(document.images);
    if (!imgs.every(function (i) { return i.complete; })) { setTimeout(check, 25); return; }
    var ok = imgs.every(function (i) { return i.naturalWidth > 0; });
    document.body.dataset.imageCount = String(imgs.length);
    document.body.dataset.imagesLoaded = ok ? "true" : "false";
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
"""


@dataclass
class ReportFiles:
    html: Path
    pngs: list[Path] = field(default_factory=list)


@dataclass
class GalleryCase:
    """One grounding row for the gallery: its record and the arrays to draw (original image size)."""

    record: dict[str, Any]
    image: np.ndarray  # (H, W, 3) uint8
    gt: np.ndarray  # (H, W) bool, union of the row's target masks
    pred: np.ndarray  # (H, W) bool, union of the predicted masks


# ------------------------------------------------------------------------------------------------ formatting
def _text(value: Any) -> str:
    """HTML-escaped text; control characters (a random-init model emits them) shown as \\xNN."""
    text = "" if value is None else str(value)
    text = "".join(
        f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text
    )
    return html.escape(text)


def _num(value: Any, scale: float = 100.0, digits: int = 1) -> str:
    """A table cell: the score x100 (as the paper prints it), or a grey dash when there is no such row."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="na">&ndash;</td>'
    return f'<td class="num">{value * scale:.{digits}f}</td>'


def _int(value: Any) -> str:
    return '<td class="na">&ndash;</td>' if value is None else f'<td class="num">{int(value)}</td>'


def _get(section: dict[str, Any] | None, key: str) -> Any:
    return None if not section else section.get(key)


def png_bytes_rgb(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _img_tag(data: bytes, alt: str, cls: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


# -------------------------------------------------------------------------------------------------- drawing
def overlay(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, display_px: int = GALLERY_DISPLAY_PX
) -> np.ndarray:
    """The image (scaled so its longer side is `display_px`) with the prediction tinted and outlined in magenta
    and the ground truth in green; where both lie the tints mix, and both outlines stay visible."""
    h, w = gt.shape
    scale = display_px / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(Image.fromarray(image).convert("L").convert("RGB").resize(size, Image.BILINEAR))
    out = base.astype(np.float32) * 0.85
    layers = []
    for mask, rgb in ((pred, PRED_RGB), (gt, GT_RGB)):
        big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
        out[big] = out[big] * (1 - FILL_ALPHA) + np.asarray(rgb, np.float32) * FILL_ALPHA
        layers.append((big & ~ndimage.binary_erosion(big, iterations=2, border_value=0), rgb))
    for edge, rgb in layers:  # outlines over both tints, the ground truth's on top
        out[edge] = rgb
    return np.clip(out, 0, 255).astype(np.uint8)


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=CHART_DPI)
    FigureCanvasAgg(fig)
    return fig


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CHART_DPI, bbox_inches="tight")
    return buf.getvalue()


def _bars(ax, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None], str]]) -> None:
    """Grouped bars (values x100); a missing value leaves a gap marked n/a."""
    n = len(series)
    width = 0.8 / max(1, n)
    x = np.arange(len(groups))
    for j, (label, values, color) in enumerate(series):
        offsets = x - 0.4 + width * (j + 0.5)
        heights = [0.0 if v is None else 100 * v for v in values]
        bars = ax.bar(offsets, heights, width * 0.92, label=label, color=color)
        for bar, v in zip(bars, values, strict=True):
            text = "n/a" if v is None else f"{100 * v:.1f}"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
                color="#555" if v is None else "#222",
            )
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylim(0, 109)
    ax.set_ylabel("score x100")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def per_modality_chart(split: str, section: dict[str, Any]) -> bytes:
    """mDice (grounding), VQA closed accuracy and open token F1 per modality, as PNG bytes."""
    by_modality = section.get("by_modality") or {}
    names = list(by_modality)
    labels = []
    for name in names:
        g, v = by_modality[name].get("grounding"), by_modality[name].get("vqa")
        labels.append(f"{name}\nG {(g or {}).get('rows', 0)} / VQA {(v or {}).get('n', 0)}")
    series = [
        ("grounding mDice", [_get(by_modality[m].get("grounding"), "mDice") for m in names], "#3b7dd8"),
        (
            "VQA closed accuracy",
            [_get(by_modality[m].get("vqa"), "closed_accuracy") for m in names],
            "#e08a1e",
        ),
        ("VQA open token F1", [_get(by_modality[m].get("vqa"), "open_f1") for m in names], "#4aa564"),
    ]
    fig = _figure(max(5.0, 1.5 + 1.4 * len(names)), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    _bars(ax, labels or ["(no rows)"], series if names else [(s[0], [None], s[2]) for s in series])
    kind = "zero-shot" if section.get("kind") == "zero_shot" else "in-distribution"
    ax.set_title(f"{split} ({kind}): scores per modality", fontsize=10)
    return _fig_png(fig)


def comparison_chart(split: str, rows: Sequence[dict[str, Any]], labels: tuple[str, str]) -> bytes:
    """Before/after bars of the headline metrics of one split, as PNG bytes."""
    names = [r["label"].replace("Grounding ", "G ").replace("VQA ", "") for r in rows]
    series = [
        (labels[0], [r["before"] for r in rows], "#9aa7b8"),
        (labels[1], [r["after"] for r in rows], "#3b7dd8"),
    ]
    fig = _figure(max(6.0, 1.2 + 1.1 * len(rows)), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    _bars(ax, names, series)
    ax.set_title(f"{split}: {labels[0]} vs {labels[1]}", fontsize=10)
    return _fig_png(fig)


# ------------------------------------------------------------------------------------------------- gallery
def pick_gallery(records: Sequence[dict[str, Any]], k: int) -> tuple[list[dict], list[dict]]:
    """(best, worst) scored grounding records by Dice, at most k each and never the same row twice."""
    scored = sorted(
        (r for r in records if r.get("dice") is not None), key=lambda r: (-r["dice"], r["question_id"])
    )
    best = scored[: min(k, math.ceil(len(scored) / 2))]
    worst = list(reversed(scored[len(best) :]))[:k]
    return best, worst


def _sam_view_image(row: dict[str, Any]) -> np.ndarray | None:
    """The original-size image rebuilt from the stored SAM view (used when the image file is not reachable)."""
    if not row.get("sam_view_png") or row.get("sam_geometry") is None:
        return None
    from medplib.data.rows import png_array

    orig_h, orig_w, _, rh, rw, top, left = (int(v) for v in row["sam_geometry"])
    view = png_array(row["sam_view_png"])[top : top + rh, left : left + rw]
    return np.asarray(Image.fromarray(view).resize((orig_w, orig_h), Image.BILINEAR))


def load_gallery_cases(cfg: EvalConfig, split: str, chosen: Sequence[dict[str, Any]]) -> list[GalleryCase]:
    """Images and target masks of the chosen records from the prepared split; predictions from `masks/`."""
    if not chosen:
        return []
    from medplib.data.image import depends_on_view, load_image
    from medplib.data.prepared import iter_prepared_rows, read_manifest
    from medplib.data.rows import png_array

    wanted = {r["question_id"]: r for r in chosen}
    data_root = Path(read_manifest(cfg.data).get("data_root") or cfg.data)
    found: dict[str, GalleryCase] = {}
    columns = ["sample_id", "image_path", "sam_view_png", "sam_geometry", "target_masks_png"]
    for row in iter_prepared_rows(cfg.data, split, columns=columns):
        record = wanted.get(str(row["sample_id"]))
        if record is None:
            continue
        targets = [png_array(m, as_mask=True) for m in row["target_masks_png"] or []]
        if not targets:
            continue
        gt = np.logical_or.reduce(targets)
        image = None
        image_file = data_root / str(row.get("image_path") or "")
        # A DICOM/NIfTI row was rendered at its own view (slice, window): the stored view shows that picture.
        if row.get("image_path") and image_file.is_file() and not depends_on_view(image_file):
            try:
                image = load_image(image_file)
            except (OSError, ValueError) as err:
                logger.warning("gallery: cannot read %s (%s); using the stored view", image_file, err)
        if image is None or image.shape[:2] != gt.shape:
            image = _sam_view_image(row)
        if image is None:
            continue
        pred = np.zeros_like(gt)
        for mask in record["pred_masks"]:
            if mask.get("png") and (cfg.out / mask["png"]).is_file():
                loaded = png_array((cfg.out / mask["png"]).read_bytes(), as_mask=True)
                if loaded.shape == gt.shape:
                    pred |= loaded
        found[record["question_id"]] = GalleryCase(record, image, gt, pred)
        if len(found) == len(wanted):
            break
    return [found[r["question_id"]] for r in chosen if r["question_id"] in found]


# ----------------------------------------------------------------------------------------------------- HTML
def _score_columns(section: dict[str, Any] | None) -> str:
    g = (section or {}).get("grounding")
    v = (section or {}).get("vqa")
    return "".join(
        [
            _int(_get(g, "rows")),
            _num(_get(g, "mDice")),
            _num(_get(g, "mIoU")),
            _num(_get(g, "gIoU")),
            _num(_get(g, "cIoU")),
            _int(_get(v, "n_closed")),
            _num(_get(v, "closed_accuracy")),
            _int(_get(v, "n_open")),
            _num(_get(v, "open_f1")),
            _num(_get(v, "open_recall")),
            _num(_get(v, "open_bleu_1")),
        ]
    )


SCORE_HEADER = (
    '<tr><th rowspan="2">{first}</th><th rowspan="2">rows</th><th colspan="5">grounding</th>'
    '<th colspan="2">VQA closed</th><th colspan="4">VQA open</th></tr>'
    "<tr><th>rows</th><th>mDice</th><th>mIoU</th><th>gIoU</th><th>cIoU</th><th>n</th><th>accuracy</th>"
    "<th>n</th><th>token F1</th><th>recall</th><th>BLEU-1</th></tr>"
)


def _score_table(first: str, sections: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_text(name)}</td>{_int(section.get('rows'))}{_score_columns(section)}</tr>"
        for name, section in sections.items()
    )
    return f"<table>{SCORE_HEADER.format(first=_text(first))}{rows}</table>"


def _summary_table(metrics: dict[str, Any]) -> str:
    rows = []
    for split, section in metrics["splits"].items():
        kind = section.get("kind", "in_distribution")
        seg_rate = _get(section.get("grounding"), "seg_token_rate")
        gen = section.get("generation") or {}
        rows.append(
            f'<tr><td><a href="#split-{html.escape(split)}">{_text(split)}</a></td>'
            f'<td><span class="badge {kind}">{_text(KIND_TITLES.get(kind, kind))}</span></td>'
            f"{_int(section.get('rows'))}{_score_columns(section)}{_num(seg_rate)}"
            f"{_num(gen.get('rows_per_generate_s'), 1.0, 2)}</tr>"
        )
    header = SCORE_HEADER.format(first="split").replace(
        '<th rowspan="2">rows</th>', '<th rowspan="2">kind</th><th rowspan="2">rows</th>', 1
    )
    header = header.replace(
        "</th></tr><tr>",
        '</th><th rowspan="2">&lt;SEG&gt; emitted %</th><th rowspan="2">rows / generate s</th></tr><tr>',
        1,
    )
    return f"<table>{header}{''.join(rows)}</table>"


def _kinds_html(section: dict[str, Any]) -> str:
    """Grounding per kind (teacher-forced and generated Dice, <SEG> emission) and closed VQA per kind beside the
    question-only baseline: where the model learned, and whether it uses the image."""
    out = []
    kinds = (section.get("grounding") or {}).get("by_kind") or {}
    if kinds:
        rows = "".join(
            f"<tr><td>{_text(k)}</td>{_int(v.get('rows'))}{_num(v.get('teacher_forced_mDice'))}"
            f"{_num(v.get('mDice'))}{_num(v.get('seg_token_rate'))}</tr>"
            for k, v in kinds.items()
        )
        out.append(
            "<h3>Grounding by kind</h3><table><tr><th>kind</th><th>rows</th><th>mDice, teacher-forced</th>"
            f"<th>mDice, generated</th><th>&lt;SEG&gt; emitted %</th></tr>{rows}</table>"
        )
    closed = (section.get("vqa") or {}).get("closed_by_kind") or {}
    if closed:
        rows = "".join(
            f"<tr><td>{_text(k)}</td>{_int(v.get('n'))}{_num(v.get('accuracy'))}{_num(v.get('baseline'))}"
            f"<td>{_text(v.get('top_answer') or '')}</td>{_num(v.get('top_answer_share'))}</tr>"
            for k, v in closed.items()
        )
        out.append(
            "<h3>Closed questions by kind</h3><p>A most common answer at 100% is one answer whatever the image: "
            "its accuracy is the answer prior's.</p><table><tr><th>kind</th><th>n</th><th>accuracy</th>"
            "<th>question-only baseline</th><th>model's most common answer</th><th>its share %</th></tr>"
            f"{rows}</table>"
        )
    return "".join(out)


def _gallery_html(title: str, cases: Sequence[GalleryCase], images: Sequence[bytes]) -> str:
    if not cases:
        return ""
    cards = []
    for case, data in zip(cases, images, strict=True):
        r = case.record
        cards.append(
            f'<div class="card">{_img_tag(data, "grounding case " + r["question_id"])}'
            f'<div><span class="score">Dice {100 * r["dice"]:.1f}</span>{_text(r.get("modality"))}'
            f" &middot; IoU {100 * (r['iou'] or 0):.1f}</div>"
            f'<div class="q">{_text(r.get("prompt"))}</div>'
            f"<div>expected: {_text(r.get('gt'))}</div><div>model: {_text(r.get('text'))}</div>"
            f'<div class="meta">{_text(r["question_id"])}</div></div>'
        )
    return f'<h3>{_text(title)}</h3><div class="gallery">{"".join(cards)}</div>'


def _examples_html(records: Sequence[dict[str, Any]], n: int) -> str:
    from medplib.metrics import score_vqa_record

    vqa = [r for r in records if r["task"] != "grounding" and not r["seg_counts"]][:n]
    if not vqa:
        return ""
    rows = []
    for r in vqa:
        scores = score_vqa_record(r)
        score = (
            ("correct" if scores["correct"] else "wrong")
            if scores["kind"] == "closed"
            else f"F1 {100 * scores['f1']:.1f}"
        )
        rows.append(
            f"<tr><td>{_text(r['task'])}</td><td>{_text(r['answer_type'])}</td>"
            f'<td class="text">{_text(r["prompt"])}</td><td class="text">{_text(r["gt"])}</td>'
            f'<td class="text">{_text(r["text"])}</td><td>{score}</td></tr>'
        )
    return (
        f"<h3>VQA predictions (first {len(vqa)})</h3><table><tr><th>task</th><th>answer type</th><th>question</th>"
        f"<th>expected</th><th>model</th><th>score</th></tr>{''.join(rows)}</table>"
    )


def _comparison_section(comparison: dict[str, Any], charts: dict[str, bytes]) -> str:
    labels = comparison["labels"]
    parts = [
        f'<p class="note">{_text(labels[0])}: <code>{_text(comparison["before"]["model_id"])}</code> '
        f"({_text(comparison['before']['dir'])}); {_text(labels[1])}: <code>{_text(comparison['after']['model_id'])}"
        f"</code> ({_text(comparison['after']['dir'])}). Scores x100; delta = {_text(labels[1])} &minus; "
        f"{_text(labels[0])}.</p>"
    ]
    for split, entry in comparison["splits"].items():
        rows = []
        for row in entry["rows"]:
            delta = row["delta"]
            if delta is None:
                delta_cell = '<td class="na">&ndash;</td>'
            else:
                cls = "pos" if delta > 0 else "neg" if delta < 0 else ""
                delta_cell = f'<td class="num {cls}">{100 * delta:+.1f}</td>'
            rows.append(
                f"<tr><td>{_text(row['label'])}</td>{_num(row['before'])}{_num(row['after'])}{delta_cell}</tr>"
            )
        kind = entry.get("kind", "in_distribution")
        parts.append(
            f'<h3>{_text(split)} <span class="badge {kind}">{_text(KIND_TITLES.get(kind, kind))}</span></h3>'
            f"<table><tr><th>metric</th><th>{_text(labels[0])}</th><th>{_text(labels[1])}</th><th>delta</th></tr>"
            f"{''.join(rows)}</table>"
        )
        if split in charts:
            parts.append(_img_tag(charts[split], f"{split}: {labels[0]} vs {labels[1]}", "chart"))
    if comparison.get("only_in_one"):
        parts.append(
            f'<p class="note">Splits evaluated on one side only: {_text(", ".join(comparison["only_in_one"]))}'
            "</p>"
        )
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_text(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body><main>{body}</main><script>{IMAGES_LOADED_JS}</script></body></html>\n"
    )


def _budget_note(budgets: dict[str, int] | None, split: str | None = None) -> str:
    notes = [f"{_text(family)} {int(n)}" for family, n in sorted((budgets or {}).items())]
    if split:
        notes.append(f"each question type a quarter more than its longest {_text(split)} answer")
    return f" ({'; '.join(notes)})" if notes else ""


def write_report(
    cfg: EvalConfig,
    metrics: dict[str, Any],
    records: Sequence[dict[str, Any]],
    comparison: dict[str, Any] | None = None,
    extra_html: str = "",
) -> ReportFiles:
    """Write `report.html`, `plots/<split>_per_modality.png` and the gallery PNGs into `cfg.out`; `extra_html`
    (e.g. the 3-D section) goes at the end."""
    out = cfg.out
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    ordered = sorted(metrics["splits"], key=lambda s: metrics["splits"][s].get("kind") == "zero_shot")

    total_rows = sum(section["rows"] for section in metrics["splits"].values())
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    max_rows = metrics.get("max_rows")
    limit_note = "" if max_rows is None else f" &middot; first {int(max_rows)} rows per split"
    body = [
        "<h1>MedPLIB evaluation</h1>",
        f'<p class="meta">model <code>{_text(metrics["model_id"])}</code> &middot; data <code>{_text(metrics["data"])}'
        f"</code> &middot; {total_rows} rows &middot; greedy decoding, at most {metrics['max_new_tokens']} new tokens"
        f"{_budget_note(metrics.get('max_new_tokens_by'), metrics.get('budget_split'))}"
        f"{limit_note} &middot; {metrics.get('elapsed_s') or 0:.1f} s &middot; {created}</p>",
        '<p class="note">Scores are x100. Grounding: mIoU and mDice are means over samples as upstream MedPLIB '
        "computes them (an empty union scores 0), gIoU counts an empty union as 1 (LISA), cIoU is total "
        "intersection over total union; every grounding row gets a mask (segment=True, as upstream's eval). "
        "VQA: closed questions score exact match after upstream's answer normalisation, open questions token F1, "
        "recall and BLEU-1. Zero-shot splits (other subjects or a held-out modality) are reported on their own, "
        "never averaged with in-distribution ones.</p>",
        "<h2>Summary</h2>",
        _summary_table(metrics),
    ]
    if comparison is not None:
        charts = {}
        for split in comparison["splits"]:
            path = out / "plots" / f"comparison_{split}.png"
            if path.is_file():
                charts[split] = path.read_bytes()
        body += [
            f"<h2>{_text(comparison['labels'][0])} vs {_text(comparison['labels'][1])}</h2>",
            _comparison_section(comparison, charts),
        ]
    current_kind = None
    for split in ordered:
        section = metrics["splits"][split]
        kind = section.get("kind", "in_distribution")
        if kind != current_kind:
            current_kind = kind
            body.append(f"<h2>{_text(KIND_TITLES.get(kind, kind))}</h2>")
            if kind == "zero_shot":
                body.append(
                    '<p class="note">These splits come from subjects (or a modality) that no training row '
                    "comes from; grounding here is zero-shot, as the paper reports it.</p>"
                )
        body.append(
            f'<h3 id="split-{html.escape(split)}">Split <code>{_text(split)}</code>'
            f'<span class="badge {kind}">{_text(KIND_TITLES.get(kind, kind))}</span> &middot; {section["rows"]} rows</h3>'
        )
        if not section["rows"]:
            body.append('<p class="note">No rows were evaluated in this split.</p>')
            continue
        body += [
            _kinds_html(section),
            "<h3>By task</h3>",
            _score_table("task", section["by_task"]),
            "<h3>By modality</h3>",
            _score_table("modality", section["by_modality"]),
        ]
        chart = per_modality_chart(split, section)
        chart_path = out / "plots" / f"{split}_per_modality.png"
        chart_path.write_bytes(chart)
        pngs.append(chart_path)
        body.append(_img_tag(chart, f"{split}: scores per modality", "chart"))

        best, worst = pick_gallery(by_split.get(split, []), cfg.gallery_size)
        cases = load_gallery_cases(cfg, split, best + worst)
        case_by_id = {c.record["question_id"]: c for c in cases}
        if cases:
            body.append(
                '<h3>Grounding cases</h3><p class="legend note">'
                f'<span style="background: rgb{GT_RGB}"></span>ground truth'
                f'<span style="background: rgb{PRED_RGB}"></span>prediction (outline and tint; where both '
                "lie the tints mix)</p>"
            )
        for title, chosen, tag in (("Best Dice", best, "best"), ("Worst Dice", worst, "worst")):
            shown = [case_by_id[r["question_id"]] for r in chosen if r["question_id"] in case_by_id]
            images = []
            for i, case in enumerate(shown):
                data = png_bytes_rgb(overlay(case.image, case.gt, case.pred))
                path = out / "gallery" / f"{split}_{tag}_{i}.png"
                path.write_bytes(data)
                pngs.append(path)
                images.append(data)
            body.append(_gallery_html(title, shown, images))
        body.append(_examples_html(by_split.get(split, []), cfg.examples_per_split))

    body.append(extra_html)
    html_path = out / REPORT_NAME
    html_path.write_text(
        _page(f"MedPLIB evaluation: {metrics['model_id']}", "\n".join(body)), encoding="utf-8"
    )
    return ReportFiles(html_path, pngs)


# ---------------------------------------------------------------------------------------------- comparison
def _metric_rows(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for section, key, label in KEY_METRICS:
        b = _get((before or {}).get(section), key)
        a = _get((after or {}).get(section), key)
        if b is None and a is None:
            continue
        rows.append(
            {
                "label": label,
                "section": section,
                "key": key,
                "before": b,
                "after": a,
                "delta": None if a is None or b is None else a - b,
            }
        )
    return rows


def compare_metrics(before: dict[str, Any], after: dict[str, Any], labels: tuple[str, str]) -> dict[str, Any]:
    """Headline metrics of two `metrics.json` side by side, per split both evaluated (and per modality)."""
    splits = {}
    for split, a in after["splits"].items():
        b = before["splits"].get(split)
        if b is None:
            continue
        rows = _metric_rows(b, a)
        for kind, after_kind in ((a.get("grounding") or {}).get("by_kind") or {}).items():
            before_kind = ((b.get("grounding") or {}).get("by_kind") or {}).get(kind) or {}
            values = before_kind.get("teacher_forced_mDice"), after_kind.get("teacher_forced_mDice")
            if any(v is not None for v in values):
                rows.append(
                    {
                        "label": f"{kind}: grounding mDice, teacher-forced",
                        "section": "grounding",
                        "key": "teacher_forced_mDice",
                        "before": values[0],
                        "after": values[1],
                        "delta": None if None in values else values[1] - values[0],
                    }
                )
        for modality in a.get("by_modality", {}):
            b_mod = b.get("by_modality", {}).get(modality)
            a_mod = a["by_modality"][modality]
            for row in _metric_rows(b_mod, a_mod):
                if row["key"] in ("mDice", "closed_accuracy", "open_f1"):
                    rows.append({**row, "label": f"{modality}: {row['label']}"})
        splits[split] = {"kind": a.get("kind", "in_distribution"), "rows": rows}
    only = sorted(set(before["splits"]) ^ set(after["splits"]))
    return {
        "labels": list(labels),
        "before": {"model_id": before.get("model_id"), "dir": None},
        "after": {"model_id": after.get("model_id"), "dir": None},
        "splits": splits,
        "only_in_one": only,
    }


def write_comparison_report(
    before_dir: str | Path,
    after_dir: str | Path,
    out: str | Path,
    labels: Sequence[str] = ("before", "after"),
) -> Path:
    """Compare two eval folders (each with `metrics.json`): writes `OUT/comparison.html` (self-contained),
    `OUT/comparison.json` and `OUT/plots/comparison_<split>.png`; returns the HTML path.

    Per split evaluated on both sides: the headline grounding and VQA metrics overall, then mDice, closed
    accuracy and open F1 per modality, with the difference (after - before).
    """
    before_dir, after_dir, out = Path(before_dir), Path(after_dir), Path(out)
    if len(labels) != 2:
        raise ValueError(f"labels must name the two sides, got {list(labels)}")
    sides = []
    for folder in (before_dir, after_dir):
        path = folder / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {folder} is not an eval output folder (run `medplib eval`)"
            )
        sides.append(json.loads(path.read_text()))
    comparison = compare_metrics(sides[0], sides[1], (labels[0], labels[1]))
    comparison["before"]["dir"], comparison["after"]["dir"] = str(before_dir), str(after_dir)
    if not comparison["splits"]:
        raise ValueError(
            f"{before_dir} ({', '.join(sides[0]['splits'])}) and {after_dir} ({', '.join(sides[1]['splits'])}) "
            "have no split in common"
        )
    (out / "plots").mkdir(parents=True, exist_ok=True)
    charts = {}
    for split, entry in comparison["splits"].items():
        headline = [r for r in entry["rows"] if ":" not in r["label"]]
        if headline:
            charts[split] = comparison_chart(split, headline, (labels[0], labels[1]))
            (out / "plots" / f"comparison_{split}.png").write_bytes(charts[split])
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    body = f"<h1>MedPLIB evaluation: {_text(labels[0])} vs {_text(labels[1])}</h1>" + _comparison_section(
        comparison, charts
    )
    html_path = out / "comparison.html"
    html_path.write_text(_page(f"MedPLIB: {labels[0]} vs {labels[1]}", body), encoding="utf-8")
    return html_path
