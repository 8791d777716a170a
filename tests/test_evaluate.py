"""Batch evaluation (workflows/eval/evaluate.py) and its report (workflows/eval/report.py).

Fast tests run the evaluator in-process (`engine="local"`) on a small prepared MeCoVQA-mini split with the
random-init `tiny` model; the slow one runs `medplib eval` on a local Ray cluster (one per module, 2 CPUs,
no dashboard) and checks that the actor pool gives the same predictions. The report is opened in headless
Chromium where it is installed (`make system-deps`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from medplib.constants import IGNORE_INDEX
from medplib.data.prepared import iter_prepared_rows
from medplib.data.rows import png_array, png_bytes, row_to_encoded
from medplib.inference import Predictor
from medplib.metrics import mask_dice
from workflows.eval.config import EvalConfig
from workflows.eval.evaluate import (
    deal_by_image,
    evaluate,
    flatten_metrics,
    generation_prompt,
    log_to_mlflow,
    predict_rows,
    split_metrics,
)
from workflows.eval.report import write_comparison_report

UPSTREAM_KEYS = {
    "question_id",
    "image_path",
    "prompt",
    "gt",
    "text",
    "answer_id",
    "model_id",
    "answer_type",
    "metadata",
}
OUR_KEYS = {"task", "modality", "split", "pred_masks", "seg_counts", "iou", "dice"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """MeCoVQA-mini capped at 60 rows, prepared in-process: splits test (17 rows) and test_xsubject (10)."""
    from medplib_datasets.mini.build import build_mini
    from workflows.data.preprocess import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("eval-data")
    build_mini(root / "mini", seed=0, max_samples=60, progress=False)
    cfg = PrepareConfig(model_preset="tiny", splits=["test", "test_xsubject"])
    prepare(root / "mini", root / "prepared", cfg, engine="local")
    return root / "prepared"


@pytest.fixture(scope="module")
def rows(prepared: Path) -> list[dict]:
    return list(iter_prepared_rows(prepared, "test"))


@pytest.fixture()
def model(tiny_cfg):
    from medplib.model.medplib import MedPLIB

    torch.manual_seed(0)
    return MedPLIB(tiny_cfg).eval()


@pytest.fixture(scope="module")
def local_eval(prepared: Path, tmp_path_factory):
    """One in-process evaluation of both splits, shared by the output, report and MLflow tests."""
    out = tmp_path_factory.mktemp("eval-local")
    return evaluate(
        model="tiny",
        data=prepared,
        splits=["test", "test_xsubject"],
        out=out,
        engine="local",
        max_new_tokens=4,
        batch_size=6,
        gallery_size=2,
    )


def _stratified(prepared: Path, *splits: str, **fields) -> dict:
    """The fields of a small stratified evaluation of the random-init `tiny` model (2 grounding rows, 1 VQA row
    a question type) on `splits` (default: test)."""
    return dict(
        model="tiny",
        data=prepared,
        splits=list(splits or ["test"]),
        max_new_tokens=4,
        sample="stratified",
        per_kind={"grounding": 2, "vqa": 1},
        **fields,
    )


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _body_tag(dom: str) -> str:
    start = dom.find("<body")
    assert start >= 0, f"no <body> in the dumped DOM: {dom[:300]!r}"
    return dom[start : dom.find(">", start) + 1]


# ------------------------------------------------------------------------------------------- prompt building
def test_generation_prompt_is_what_encode_sample_builds_for_generation(prepared: Path, rows, tiny_cfg, model):
    """Cutting a prepared row at its first answer token gives exactly the generation prompt built from the
    row's question and image file (so eval needs no image re-read), and keeps the row's region masks."""
    from medplib.data.batch import encode_sample
    from medplib.data.image import load_image
    from medplib.data.prepared import read_manifest
    from medplib.data.schema import Turn

    data_root = Path(read_manifest(prepared)["data_root"])
    vqa = next(r for r in rows if r["task"] == "vqa")
    prompt = generation_prompt(row_to_encoded(vqa, tiny_cfg.vision.image_size_px), model.ids.region_feature)
    rebuilt = encode_sample(
        [Turn(role="human", text=vqa["question"])],
        load_image(data_root / vqa["image_path"]),
        model.tokenizer,
        tiny_cfg,
        for_generation=True,
    )
    assert prompt.input_ids == rebuilt.input_ids
    assert set(prompt.labels) == {IGNORE_INDEX}
    assert model.tokenizer.decode(prompt.input_ids).endswith("ASSISTANT: ")

    region_row = next(r for r in rows if r["task"] == "region_vqa")
    enc = row_to_encoded(region_row, tiny_cfg.vision.image_size_px)
    region_prompt = generation_prompt(enc, model.ids.region_feature)
    assert region_prompt.input_ids.count(model.ids.region_feature) == 1
    assert region_prompt.region_masks.shape[0] == 1
    assert np.array_equal(region_prompt.region_masks, enc.region_masks)
    assert len(region_prompt.input_ids) < len(enc.input_ids)


def test_region_prompts_reach_the_model(rows, model):
    """Upstream eval dropped region masks; here every region row's mask is pooled by the
    region adapter, and moving the region changes the decoder input exactly at the region-feature token."""
    region_rows = [r for r in rows if r["task"] == "region_vqa"][:3]
    assert region_rows, "the fixture split has no region_vqa row"
    adapter_rows: list[int] = []
    model.region_fea_adapter.register_forward_hook(
        lambda _m, args, _out: adapter_rows.append(args[0].shape[0])
    )
    results = predict_rows(Predictor(model), region_rows, max_new_tokens=2, model_id="tiny")
    assert sum(adapter_rows) == len(region_rows)  # one pooled feature per region, in the first decoder step
    for result in results:
        assert result.record["metadata"]["num_regions"] == 1
        assert result.record["metadata"]["num_region_tokens"] == 1

    first_inputs: list[torch.Tensor] = []

    def keep_first(_module, _args, kwargs):
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > 1:
            first_inputs.append(kwargs["inputs_embeds"].detach().clone())

    model.llm.get_decoder().register_forward_pre_hook(keep_first, with_kwargs=True)
    row = region_rows[0]
    size = model.cfg.vision.image_size_px
    mask = png_array(row["region_masks_png"], as_mask=True)
    moved = {
        **row,
        "region_masks_png": png_bytes(np.roll(mask, size // 2, axis=1) | np.roll(mask, size // 2, axis=0)),
    }
    predict_rows(Predictor(model), [row], max_new_tokens=1, model_id="tiny")
    predict_rows(Predictor(model), [moved], max_new_tokens=1, model_id="tiny")
    with_region, with_moved = first_inputs
    differs = (with_region != with_moved).any(-1)[0]
    region_pos = torch.tensor(
        generation_prompt(row_to_encoded(row, size), model.ids.region_feature).input_ids
    )
    assert (
        differs.nonzero().flatten().tolist()
        == (region_pos == model.ids.region_feature).nonzero().flatten().tolist()
    )


def test_every_grounding_row_gets_a_scored_mask(rows, model):
    grounding = [r for r in rows if r["task"] == "grounding"]
    results = predict_rows(Predictor(model), grounding, max_new_tokens=3, model_id="tiny", batch_size=2)
    for row, result in zip(grounding, results, strict=True):
        gt = png_array(row["target_masks_png"][0], as_mask=True)
        assert result.record["question_id"] == row["sample_id"]
        assert result.masks and result.masks[0].shape == gt.shape  # segment=True: a mask even without <SEG>
        assert result.record["metadata"]["segment"] is True
        assert result.record["dice"] == pytest.approx(mask_dice(result.masks[0], gt))
        intersection, union = result.record["seg_counts"][0]
        assert union == int((result.masks[0] | gt).sum()) and intersection == int(
            (result.masks[0] & gt).sum()
        )


def test_teacher_forced_masks_come_from_the_generations_own_pass(rows, model, monkeypatch):
    """The ground-truth answer is teacher-forced on the prompt's KV cache in the generation's pass: its masks are
    those of a whole teacher-forced pass over the row (fp32), without that pass. A row whose greedy answer is
    its answer token for token was fed it already, so its generated masks are its teacher-forced ones."""
    from workflows.eval.evaluate import answer_ids

    seg, eos = model.ids.seg, model.ids.eos
    first, other = [r for r in rows if r["task"] == "grounding"][:2]
    # The first row's answer becomes `<SEG>` alone (one target mask, one `<SEG>`) ...
    ids, labels = list(first["input_ids"]), list(first["labels"])
    start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    end = start + labels[start:].index(eos)
    row = dict(first, input_ids=ids[:start] + [seg] + ids[end:], labels=labels[:start] + [seg] + labels[end:])
    size = model.cfg.vision.image_size_px
    assert answer_ids(row_to_encoded(row, size), eos) == [seg]
    assert answer_ids(row_to_encoded(other, size), eos).index(seg) > 0  # the other's runs on the KV cache

    # ... and the model emits `<SEG>` first whatever it sees (its masks still come from its own hidden states).
    def emit_seg(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., seg] = logits.max() + 100.0
        return logits

    model.llm.get_output_embeddings().register_forward_hook(emit_seg)
    predictor = Predictor(model, autocast=False)  # fp32: a teacher-forced pass gives the very same masks
    passes: list[int] = []
    teacher_forced = predictor.teacher_forced
    monkeypatch.setattr(
        predictor, "teacher_forced", lambda enc: passes.append(len(enc)) or teacher_forced(enc)
    )
    results = predict_rows(
        predictor, [row, other], max_new_tokens=1, model_id="tiny", batch_size=2, teacher_forced=True
    )
    assert passes == []
    reused = results[0].record
    assert reused["tf_seg_counts"] == reused["seg_counts"] and reused["tf_scores"] == [
        m["score"] for m in reused["pred_masks"]
    ]
    for got, source in zip(results, (row, other), strict=True):
        (whole,) = teacher_forced([row_to_encoded(source, size)])
        assert len(whole.masks) == len(got.record["tf_seg_counts"]) == 1
        gt = png_array(source["target_masks_png"][0], as_mask=True)
        assert got.record["tf_seg_counts"][0] == [
            int((whole.masks[0] & gt).sum()),
            int((whole.masks[0] | gt).sum()),
        ]
        assert got.record["tf_scores"][0] == pytest.approx(whole.scores[0], abs=1e-4)


def test_each_answer_family_decodes_within_its_own_budget(rows, model):
    """grounding=2, closed=1, open left at max_new_tokens=5: no row decodes past its family's budget, and the
    record says which budget it had."""
    from workflows.eval.evaluate import answer_family

    budgets = {"grounding": 2, "closed": 1}
    results = predict_rows(
        Predictor(model), rows, max_new_tokens=5, model_id="tiny", batch_size=3, max_new_tokens_by=budgets
    )
    families = [answer_family(row) for row in rows]
    assert {"grounding", "open"} <= set(families)
    for family, result in zip(families, results, strict=True):
        limit = budgets.get(family, 5)
        assert result.record["metadata"]["max_new_tokens"] == limit
        assert result.record["metadata"]["num_generated_tokens"] <= limit


def test_type_budgets_are_a_quarter_over_each_question_types_longest_answer(prepared: Path, rows):
    """Counted by hand from the rows' labels (answer tokens and end of turn): ceil(1.25 x the longest) per question
    type; no split, no budgets; a split the data lacks, none either."""
    from workflows.eval.evaluate import type_budgets

    longest: dict[str, int] = {}
    for row in rows:
        n = sum(1 for t in row["labels"] if t != IGNORE_INDEX)
        longest[row["question_type"]] = max(longest.get(row["question_type"], 0), n)
    assert type_budgets(prepared, "test") == {k: math.ceil(1.25 * n) for k, n in longest.items()}
    assert type_budgets(prepared, None) is None
    assert type_budgets(prepared, "no_such_split") is None


def test_each_question_type_decodes_within_its_own_budget(rows, model, monkeypatch):
    """A type budget below the family's caps that type's rows only, and a generate batch never mixes budgets."""
    from workflows.eval.evaluate import answer_family, token_budget

    capped = next(r["question_type"] for r in rows if r["task"] != "grounding")
    by_type = {capped: 1}
    calls = []
    run = Predictor.run

    def spy(self, prompts, **kw):
        calls.append(kw["max_new_tokens"])
        return run(self, prompts, **kw)

    monkeypatch.setattr(Predictor, "run", spy)
    results = predict_rows(
        Predictor(model),
        rows,
        max_new_tokens=5,
        model_id="tiny",
        batch_size=64,
        max_new_tokens_by_type=by_type,
    )
    for row, result in zip(rows, results, strict=True):
        limit = 1 if row["question_type"] == capped else 5
        assert token_budget(row, 5, None, by_type) == limit
        assert result.record["metadata"]["max_new_tokens"] == limit
        assert result.record["metadata"]["num_generated_tokens"] <= limit
    # one call per (answer family, budget) at a batch size that holds them all
    families = {(answer_family(r), token_budget(r, 5, None, by_type)) for r in rows}
    assert sorted(calls) == sorted(limit for _, limit in families)


def test_cli_reads_answer_family_budgets():
    from workflows.cli.eval import _budgets

    assert _budgets("grounding=16,closed=8") == {"grounding": 16, "closed": 8}
    with pytest.raises(argparse.ArgumentTypeError, match="FAMILY=N"):
        _budgets("grounding")
    with pytest.raises(ValidationError, match="max_new_tokens_by"):
        EvalConfig(model="tiny", data=Path("x"), max_new_tokens_by={"yes_no": 3})


# -------------------------------------------------------------------------------------------------- metrics
def _record(task, modality, answer_type="open", gt="", text="", counts=()):
    return {
        "task": task,
        "modality": modality,
        "answer_type": answer_type,
        "gt": gt,
        "text": text,
        "seg_counts": [list(c) for c in counts],
        "metadata": {"emitted_seg": False, "generate_s": 0.5, "num_generated_tokens": 3},
    }


def test_split_metrics_by_task_and_modality_by_hand():
    records = [
        _record("grounding", "ct", counts=[(5, 10)]),  # IoU 0.5, Dice 2/3
        _record("grounding", "mri", counts=[(0, 4)]),  # IoU 0, Dice 0
        _record("vqa", "ct", "closed", "Yes.", "yes"),  # correct
        _record("region_vqa", "mri", "closed", "Left.", "right"),  # wrong
        _record("vqa", "mri", "open", "the left lingual gyrus", "lingual gyrus"),  # P 1, R 2/3
    ]
    m = split_metrics(records, "zero_shot")
    assert m["kind"] == "zero_shot" and m["rows"] == 5
    assert m["grounding"]["mIoU"] == pytest.approx(0.25)
    assert m["grounding"]["mDice"] == pytest.approx(1 / 3)
    assert m["grounding"]["cIoU"] == pytest.approx(5 / 14)
    assert m["vqa"]["n"] == 3 and m["vqa"]["closed_accuracy"] == pytest.approx(0.5)
    assert m["vqa"]["open_f1"] == pytest.approx(0.8)
    assert set(m["by_task"]) == {"grounding", "vqa", "region_vqa"}
    assert m["by_task"]["grounding"]["vqa"] is None and m["by_task"]["vqa"]["grounding"] is None
    assert m["by_task"]["region_vqa"]["vqa"]["closed_accuracy"] == 0.0
    assert m["by_modality"]["ct"]["grounding"]["mDice"] == pytest.approx(2 / 3)
    assert m["by_modality"]["ct"]["vqa"]["closed_accuracy"] == 1.0
    assert m["by_modality"]["mri"]["vqa"]["n"] == 2
    flat = flatten_metrics({"splits": {"test_xsubject": m}})
    assert flat["eval/test_xsubject/grounding/mDice"] == pytest.approx(1 / 3)
    assert flat["eval/test_xsubject/by_modality/mri/vqa/open_f1"] == pytest.approx(0.8)
    assert not any(key.endswith("/kind") for key in flat)


def test_zero_shot_splits_are_told_apart():
    cfg = EvalConfig(model="tiny", data=Path("."))
    assert cfg.split_kind("test") == "in_distribution"
    assert cfg.split_kind("test_xsubject") == "zero_shot"
    assert cfg.split_kind("test_heldout_ultrasound") == "zero_shot"


def test_unknown_split_fails_before_building_a_model(prepared: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="prepared splits: test, test_xsubject"):
        evaluate(model="tiny", data=prepared, splits=["val"], out=tmp_path, engine="local")


# ------------------------------------------------------------------------------------------ files and report
def test_local_eval_writes_predictions_metrics_and_plots(local_eval, prepared: Path):
    out = local_eval.out
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == local_eval.rows == 27
    for record in records:
        assert UPSTREAM_KEYS | OUR_KEYS <= set(record)
    assert [r["split"] for r in records] == ["test"] * 17 + ["test_xsubject"] * 10
    grounding = [r for r in records if r["task"] == "grounding"]
    assert grounding and all(r["pred_masks"] and r["dice"] is not None for r in grounding)
    for r in grounding:
        mask = np.asarray(Image.open(out / r["pred_masks"][0]["png"]))
        assert list(mask.shape) == r["pred_masks"][0]["size"]

    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN was written as null
    assert list(metrics["splits"]) == ["test", "test_xsubject"]
    test, xsubject = metrics["splits"]["test"], metrics["splits"]["test_xsubject"]
    assert test["kind"] == "in_distribution" and xsubject["kind"] == "zero_shot"
    assert set(test["by_task"]) == {"vqa", "region_vqa", "grounding"}
    assert set(test["by_modality"]) == {"mri", "microscopy", "ct"}
    assert 0.0 <= test["grounding"]["mDice"] <= 1.0 and test["grounding"]["n"] == 5
    assert test["vqa"]["n"] == 12 and "by_answer_type" in test["vqa"]
    for split in ("test", "test_xsubject"):
        chart = out / "plots" / f"{split}_per_modality.png"
        assert chart in local_eval.plots and Image.open(chart).size[0] > 300
    assert any(p.parent.name == "gallery" for p in local_eval.plots)
    html = local_eval.report_path.read_text()
    assert "Zero-shot" in html and html.index('id="split-test"') < html.index('id="split-test_xsubject"')
    assert 'src="http' not in html and 'src="file' not in html  # self-contained


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make system-deps installs it from Debian)"
)
def test_report_renders_in_headless_chromium(local_eval, tmp_path: Path):
    html = local_eval.report_path.read_text()
    expected = html.count("<img")
    assert expected == len(local_eval.plots)  # every PNG written is also inlined

    done = _chromium(["--dump-dom", local_eval.report_path.as_uri()], tmp_path / "profile")
    body = _body_tag(done.stdout)
    assert 'data-images-loaded="true"' in body, (body, done.stderr[-2000:])
    assert f'data-image-count="{expected}"' in body

    broken = tmp_path / "broken.html"  # the check must be able to fail: one image that does not decode
    broken.write_text(html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert 'data-images-loaded="false"' in _body_tag(
        _chromium(["--dump-dom", broken.as_uri()], tmp_path / "p2").stdout
    )

    shot = tmp_path / "report.png"
    _chromium(
        [
            "--hide-scrollbars",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            local_eval.report_path.as_uri(),
        ],
        tmp_path / "p3",
    )
    assert shot.is_file() and Image.open(shot).size == (1280, 2400)


def test_comparison_report_before_and_after(local_eval, tmp_path: Path):
    from workflows.cli import main

    before = tmp_path / "before"
    before.mkdir()
    metrics = json.loads(local_eval.metrics_path.read_text())
    metrics["model_id"] = "untrained"
    metrics["splits"]["test"]["grounding"]["mDice"] = 0.0
    metrics["splits"]["test"]["vqa"]["closed_top_answer_share"] = 1.0
    del metrics["splits"]["test_xsubject"]
    (before / "metrics.json").write_text(json.dumps(metrics))

    html_path = write_comparison_report(
        before, local_eval.out, tmp_path / "cmp", labels=("untrained", "trained")
    )
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(comparison["splits"]) == ["test"] and comparison["only_in_one"] == ["test_xsubject"]
    row = next(r for r in comparison["splits"]["test"]["rows"] if r["label"] == "Grounding mDice")
    after_dice = local_eval.metrics["splits"]["test"]["grounding"]["mDice"]
    assert row["before"] == 0.0 and row["delta"] == pytest.approx(after_dice)
    # The pipeline's table prints the closed answers' top-answer share; so does the before/after page.
    share = next(r for r in comparison["splits"]["test"]["rows"] if r["key"] == "closed_top_answer_share")
    after_share = local_eval.metrics["splits"]["test"]["vqa"]["closed_top_answer_share"]
    assert share["before"] == 1.0 and share["after"] == pytest.approx(after_share)
    assert any(r["label"].startswith("mri: ") for r in comparison["splits"]["test"]["rows"])
    assert (tmp_path / "cmp" / "plots" / "comparison_test.png").is_file()
    assert "untrained" in html_path.read_text() and "base64," in html_path.read_text()

    assert (
        main(
            [
                "eval-compare",
                "--before",
                str(before),
                "--after",
                str(local_eval.out),
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "comparison.html").is_file()
    assert (
        main(
            [
                "eval-compare",
                "--before",
                str(tmp_path),
                "--after",
                str(local_eval.out),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )  # no metrics.json: one clear error line


def test_metrics_and_report_go_to_the_mlflow_run(local_eval, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    cfg = EvalConfig(
        model="tiny", data=Path("."), out=local_eval.out, mlflow_run_id=run.info.run_id, tracking_uri=uri
    )
    log_to_mlflow(local_eval, cfg)
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval/test/grounding/mDice"] == pytest.approx(
        local_eval.metrics["splits"]["test"]["grounding"]["mDice"]
    )
    assert "eval/test_xsubject/by_modality/mri/grounding/mIoU" in logged
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {
        "eval/report.html",
        "eval/metrics.json",
        "eval/predictions.jsonl",
        "eval/plots",
        "eval/gallery",
    } <= names
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "eval/plots")}
    assert "eval/plots/test_per_modality.png" in plots


def test_model_from_an_mlflow_run_uri(prepared: Path, model, tmp_path: Path):
    """`--model runs:/ID/model` is downloaded and the MedPLIB folder found inside it (however the registry nests
    it); the predictions equal those of the same model loaded from its folder."""
    from mlflow.tracking import MlflowClient

    saved = model.save_pretrained(tmp_path / "saved" / "artifacts" / "medplib")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(tmp_path / "saved"), "model")
    common = {
        "data": prepared,
        "splits": ["test"],
        "engine": "local",
        "max_rows": 3,
        "max_new_tokens": 3,
        "gallery_size": 0,
        "examples_per_split": 0,
    }
    from_uri = evaluate(
        model=f"runs:/{run.info.run_id}/model", tracking_uri=uri, out=tmp_path / "a", **common
    )
    from_dir = evaluate(model=str(saved), out=tmp_path / "b", **common)
    texts = [json.loads(line)["text"] for line in from_uri.predictions_path.read_text().splitlines()]
    assert len(texts) == 3
    assert texts == [json.loads(line)["text"] for line in from_dir.predictions_path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- Ray, CLI
@pytest.mark.slow
def test_cli_eval_on_a_ray_actor_pool(ray_local, prepared: Path, local_eval, tmp_path: Path, capsys):
    """`medplib eval` on the actor pool: all files, both split sections, region rows with their region token,
    and the same predictions as the in-process run (every actor seeds the random-init preset alike)."""
    from workflows.cli import main

    out = tmp_path / "ray"
    code = main(
        [
            "eval",
            "--model",
            "tiny",
            "--data",
            str(prepared),
            "--split",
            "test",
            "--split",
            "test_xsubject",
            "--out",
            str(out),
            "--max-rows",
            "8",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "4",
            "--cpus-per-actor",
            "0.5",
            "--gallery-size",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test (in_distribution)" in printed and "test_xsubject (zero_shot)" in printed
    for name in (
        "predictions.jsonl",
        "metrics.json",
        "report.html",
        "plots/test_per_modality.png",
        "plots/test_xsubject_per_modality.png",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(UPSTREAM_KEYS | OUR_KEYS <= set(r) for r in records)
    for r in records:
        if r["task"] == "region_vqa":
            assert r["metadata"]["num_region_tokens"] == r["metadata"]["num_regions"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"by_task", "by_modality", "grounding", "vqa"} <= set(metrics["splits"]["test_xsubject"])
    local = {
        r["question_id"]: r for r in map(json.loads, local_eval.predictions_path.read_text().splitlines())
    }
    for r in records:
        assert r["text"] == local[r["question_id"]]["text"]
        assert r["seg_counts"] == local[r["question_id"]]["seg_counts"]


# ------------------------------------------------------------------------------------- the evaluation protocol
def test_stratified_sample_is_deterministic_and_covers_every_kind():
    from workflows.data.prepared import RowInfo
    from workflows.eval.sample import stratified_ids

    kinds = {"brain": 30, "bone": 3, "structure": 400}
    rows = [RowInfo(f"{k}-{i}", "grounding", 50, k) for k, n in kinds.items() for i in range(n)]
    rows += [RowInfo(f"q-{i}", "vqa", 50, "presence" if i % 2 else None) for i in range(20)]
    chosen = stratified_ids(rows, {"grounding": 8, "vqa": 4}, seed=0)
    assert chosen == stratified_ids(list(reversed(rows)), {"grounding": 8, "vqa": 4}, seed=0)  # order-free
    assert chosen != stratified_ids(rows, {"grounding": 8, "vqa": 4}, seed=1)
    picked = [next(r for r in rows if r.sample_id == s) for s in chosen]
    per_kind = {}
    for r in picked:
        key = r.question_type or r.task
        per_kind[key] = per_kind.get(key, 0) + 1
    # Every kind present, capped per family: rare kinds whole, a row without a question type under its task.
    assert per_kind == {"bone": 3, "brain": 8, "structure": 8, "presence": 4, "vqa": 4}
    assert stratified_ids(rows, {"grounding": 8}, seed=0) == [s for s in chosen if not s.startswith("q-")]


def test_question_only_baseline_is_the_majority_closed_answer_per_kind():
    from workflows.eval.sample import majority_answers

    rows = [
        ("presence", "vqa", "closed", "Yes."),
        ("presence", "vqa", "closed", "no"),
        ("presence", "vqa", "closed", "No."),
        ("plane", "vqa", "closed", "Axial."),
        ("plane", "vqa", "closed", "Coronal."),
        ("describe", "vqa", "open", "A long answer."),
        (None, "vqa", "closed", "CT."),
    ]
    # "no" wins presence 2:1 after normalisation; the plane tie breaks by text; open rows do not count.
    assert majority_answers(rows) == {"presence": "no", "plane": "axial", "vqa": "ct"}


def test_closed_answers_per_kind_report_the_models_most_common_answer_and_its_share():
    records = [
        {**_record("region_vqa", "mri", "closed", gt, text), "kind": "hemisphere"}
        for gt, text in [("Left.", "Left."), ("Right.", "left"), ("Right.", "Left."), ("Left.", "Left")]
    ] + [
        {**_record("vqa", "mri", "closed", gt, text), "kind": "plane"}
        for gt, text in [("Axial.", "Axial."), ("Coronal.", "Sagittal."), ("Axial.", "coronal")]
    ]
    vqa = split_metrics(records, baseline={"hemisphere": "right", "plane": "axial"})["vqa"]
    hemisphere, plane = vqa["closed_by_kind"]["hemisphere"], vqa["closed_by_kind"]["plane"]
    # One answer whatever the image: its accuracy (0.5) is the answer prior's, as the baseline's is.
    assert (hemisphere["top_answer"], hemisphere["top_answer_share"]) == ("left", 1.0)
    assert (hemisphere["accuracy"], hemisphere["baseline"]) == (0.5, 0.5)
    assert plane["top_answer_share"] == pytest.approx(1 / 3) and plane["accuracy"] == pytest.approx(1 / 3)
    assert vqa["closed_top_answer_share"] == pytest.approx((1.0 + 1 / 3) / 2)


def test_stratified_eval_scores_teacher_forced_masks_and_a_baseline(prepared: Path, tmp_path):
    result = evaluate(**_stratified(prepared, out=tmp_path, engine="local", baseline_split="test"))
    records = [json.loads(line) for line in result.predictions_path.read_text().splitlines()]
    grounding = [r for r in records if r["task"] == "grounding"]
    assert grounding and all(r["tf_seg_counts"] and r["tf_dice"] is not None for r in grounding)
    assert all(len(r["tf_scores"]) == len(r["tf_seg_counts"]) for r in grounding)
    kinds = {r["kind"] for r in records}
    assert all(sum(r["kind"] == k for r in records) <= 2 for k in kinds)
    section = result.metrics["splits"]["test"]
    seg = section["grounding"]
    assert seg["teacher_forced"]["n"] == sum(len(r["tf_seg_counts"]) for r in grounding)
    assert seg["teacher_forced_mDice"] == pytest.approx(
        np.mean(
            [d for r in grounding for d in [2 * i / (i + u) if u else 0.0 for i, u in r["tf_seg_counts"]]]
        )
    )
    assert set(seg["by_kind"]) == {r["kind"] for r in grounding}
    assert seg["seg_token_rate"] + seg["forced_mask_rate"] == pytest.approx(1.0)
    vqa = section["vqa"]
    if vqa and vqa["n_closed"]:
        assert 0.0 <= vqa["baseline_closed_accuracy"] <= 1.0 and vqa["closed_by_kind"]
    # The same call scores the same rows.
    again = evaluate(**_stratified(prepared, out=tmp_path / "again", engine="local"))
    again_ids = sorted(
        json.loads(line)["question_id"] for line in again.predictions_path.read_text().splitlines()
    )
    assert again_ids == sorted(r["question_id"] for r in records)


def test_rows_are_dealt_to_actors_by_image_and_evenly():
    rows = [
        {"sample_id": f"r{i}", "image_path": f"img{i % 7}.png", "task": task, "question_type": f"q{i % 3}"}
        for i, task in enumerate(["grounding", "vqa"] * 20)
    ] + [{"sample_id": "text-only", "image_path": None, "task": "vqa"}]
    parts = deal_by_image(rows, 3)
    assert sorted(r["sample_id"] for part in parts for r in part) == sorted(r["sample_id"] for r in rows)
    for part in parts:
        assert [rows.index(r) for r in part] == sorted(rows.index(r) for r in part)  # input order kept
    part_of = {r["image_path"]: k for k, part in enumerate(parts) for r in part}
    assert all(
        r["image_path"] in part_of and r in parts[part_of[r["image_path"]]] for r in rows
    )  # one per image
    assert max(map(len, parts)) - min(map(len, parts)) <= 6  # at most one image's rows apart
    assert deal_by_image(rows, 1) == [rows]


def test_a_stratified_sample_on_two_actors_answers_as_one_process(
    ray_local, prepared: Path, tmp_path, caplog
):
    fields = _stratified(prepared, "test", "test_xsubject")
    local = evaluate(out=tmp_path / "local", engine="local", **fields)
    with caplog.at_level("INFO", logger="workflows.eval.evaluate"):
        pool = evaluate(out=tmp_path / "pool", engine="ray", concurrency=2, **fields)
    assert "eval: 2 actor(s) on CPU" in caplog.text  # the sample was dealt into two calls, one per actor

    def records(result):
        return [json.loads(line) for line in result.predictions_path.read_text().splitlines()]

    assert [(r["split"], r["question_id"]) for r in records(pool)] == [
        (r["split"], r["question_id"]) for r in records(local)
    ]
    for a, b in zip(records(pool), records(local), strict=True):
        assert a["text"] == b["text"] and a["tf_seg_counts"] == b["tf_seg_counts"], a["question_id"]


def test_evaluations_run_together_on_one_pool_answer_as_each_alone(
    ray_local, prepared: Path, tmp_path, caplog
):
    """`evaluate_all`: two models' evaluations on one actor pool (the pipeline's untrained and trained model)
    give each one's records as evaluating it alone, and the second compares with the first's folder."""
    from workflows.eval.evaluate import evaluate_all

    fields = _stratified(prepared)
    # Two random-init models (seed 0 and 1) stand for the untrained and the trained one.
    alone = [evaluate(out=tmp_path / f"alone{seed}", engine="local", seed=seed, **fields) for seed in (0, 1)]
    configs = [
        EvalConfig(out=tmp_path / "first", engine="ray", concurrency=2, seed=0, **fields),
        EvalConfig(
            out=tmp_path / "second",
            engine="ray",
            concurrency=2,
            seed=1,
            compare_with=tmp_path / "first",  # written by this same call, before the second's outputs
            **fields,
        ),
    ]
    with caplog.at_level("INFO", logger="workflows.eval.evaluate"):
        together = evaluate_all(configs)
    assert caplog.text.count("eval: 2 actor(s) on CPU") == 1  # one pool for both

    def records(result):
        return [json.loads(line) for line in result.predictions_path.read_text().splitlines()]

    assert [r.out for r in together] == [tmp_path / "first", tmp_path / "second"]
    assert records(alone[0]) != records(alone[1])  # the two models answer differently
    for mine, reference in zip(together, alone, strict=True):
        assert [(r["question_id"], r["text"], r["tf_seg_counts"]) for r in records(mine)] == [
            (r["question_id"], r["text"], r["tf_seg_counts"]) for r in records(reference)
        ]
    assert together[1].comparison_path is not None and together[1].comparison_path.is_file()
    with pytest.raises(ValueError, match="concurrency differs"):
        evaluate_all([configs[0], configs[1].model_copy(update={"concurrency": 1})])


def test_vqa_rows_decode_no_masks_for_the_seg_tokens_they_emit(rows, model):
    """Masks are scored on grounding rows only: a VQA answer full of `<SEG>` (a babbling model) decodes none in
    evaluation, while a grounding row still gets one per `<SEG>`; `Predictor.run` decodes them by default."""
    seg = model.ids.seg

    def emit_seg(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., seg] = logits.max() + 100.0
        return logits

    model.llm.get_output_embeddings().register_forward_hook(emit_seg)
    predictor = Predictor(model, autocast=False)
    vqa = next(r for r in rows if r["task"] == "vqa")
    grounding = next(r for r in rows if r["task"] == "grounding")
    results = predict_rows(predictor, [vqa, grounding], max_new_tokens=3, model_id="tiny", batch_size=2)
    by_task = {r.record["task"]: r for r in results}
    assert by_task["vqa"].record["text"].count("<SEG>") == 3 and by_task["vqa"].masks == []
    assert len(by_task["grounding"].masks) == 3
    prompt = generation_prompt(row_to_encoded(vqa, model.cfg.vision.image_size_px), model.ids.region_feature)
    assert len(predictor.run([prompt], max_new_tokens=3)[0].masks) == 3


def test_stage_samples_decode_within_the_eval_budgets_and_fill_the_encoder_cache(rows, model, tmp_path):
    """The pipeline's per-stage sample predictions use the evaluation's per-family budgets and its encoder cache."""
    import json

    from workflows.eval.evaluate import answer_family
    from workflows.train.samples import sample_predictions

    model.save_pretrained(tmp_path / "model")
    picked = [next(r for r in rows if answer_family(r) == f) for f in ("grounding", "open")]
    cache = tmp_path / "embeddings"
    n = sample_predictions(
        tmp_path / "model",
        picked,
        tmp_path / "samples",
        9,
        max_new_tokens_by={"grounding": 1},
        embedding_cache=cache,
    )
    assert n == 2
    lines = [json.loads(x) for x in (tmp_path / "samples" / "predictions.jsonl").read_text().splitlines()]
    tokens = [len(model.tokenizer(line["answer"], add_special_tokens=False)["input_ids"]) for line in lines]
    # the random model babbles on an open question, and stops at the grounding budget on a grounding one
    assert tokens[0] <= 1 < tokens[1]
    assert list(cache.rglob("*.npy"))


def test_prefetch_encodes_the_images_an_eval_actor_would_and_the_evaluation_reads_them(
    prepared: Path, tmp_path
):
    """`workflows.eval.prefetch`: the sample's images go into the embedding cache, each as a one-thread eval actor
    encodes it (the same bytes), and the evaluation then encodes none; with no idle core it encodes nothing and
    stops when told."""
    from workflows.eval.evaluate import evaluation_rows
    from workflows.eval.prefetch import start_prefetch, stop_prefetch

    fields = _stratified(prepared, "test", "test_xsubject", engine="local")
    images = {r["image_path"] for r in evaluation_rows(EvalConfig(**fields))}
    assert len(images) > 1

    busy = tmp_path / "busy"
    prefetch = start_prefetch(EvalConfig(embedding_cache=busy, **fields), min_idle_cores=1e9)
    assert prefetch is not None and prefetch.ready.wait(60)  # its model is loaded: it waits for an idle core
    stop_prefetch(prefetch, timeout_s=60)
    assert prefetch.process.exitcode == 0  # it stopped by itself, not killed
    assert not list(busy.rglob("*.npy"))

    prefetched = tmp_path / "prefetched"
    prefetch = start_prefetch(EvalConfig(embedding_cache=prefetched, **fields), min_idle_cores=0.0)
    assert prefetch is not None
    prefetch.process.join(120)  # it ends by itself once every image is encoded
    assert prefetch.process.exitcode == 0
    files = {f.name: f.read_bytes() for f in prefetched.rglob("*.npy")}
    assert len(files) == len(images)
    written = {f.name: f.stat().st_mtime_ns for f in prefetched.rglob("*.npy")}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an eval actor encodes
    try:
        evaluate(EvalConfig(embedding_cache=tmp_path / "own", out=tmp_path / "own-eval", **fields))
        evaluate(EvalConfig(embedding_cache=prefetched, out=tmp_path / "eval", **fields))
    finally:
        torch.set_num_threads(threads)
    assert {f.name: f.read_bytes() for f in (tmp_path / "own").rglob("*.npy")} == files
    assert {f.name: f.stat().st_mtime_ns for f in prefetched.rglob("*.npy")} == written  # none encoded again
