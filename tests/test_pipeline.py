"""The training pipeline end to end on the `tiny` preset, on one local Ray cluster (2 CPUs), checked through the
MLflow client: a full run, a rerun that trains nothing, a failure injected in `moe` (test hook
MEDPLIB_TEST_FAIL="moe:<steps>") and the rerun that starts at `moe`, in which a training worker is killed
mid-stage.

About 5 minutes on 2 shared cores (each stage is one Ray Train run of ~30-60 s, mostly worker start-up).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow_servers import free_port

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")

from medplib.inference import resolve_model_source  # noqa: E402
from medplib.model.config import configs_dir  # noqa: E402
from medplib.model.medplib import MedPLIB  # noqa: E402
from medplib_datasets.toy import write_toy_prepared  # noqa: E402
from workflows.pipeline import run_pipeline  # noqa: E402
from workflows.tracking import PARENT_TAG, STAGE_TAG, child_runs  # noqa: E402
from workflows.train.config import PipelineConfig, load_pipeline_config  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # MEDPLIB_PIPELINE_TEST_DIR keeps the work between runs while debugging (the first run is then a rerun).
    keep = os.environ.get("MEDPLIB_PIPELINE_TEST_DIR")
    return Path(keep) if keep else tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def base_cfg(workdir: Path) -> PipelineConfig:
    prepared = workdir / "prepared"
    if not (prepared / "manifest.json").exists():
        write_toy_prepared(prepared, "tiny", {"train": 24, "val": 6})
    cfg = load_pipeline_config(configs_dir() / "pipeline" / "tiny.yaml", workdir=str(workdir / "run"))
    return cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"prepared": str(prepared), "input": None})}
    )


def _with_moe(cfg: PipelineConfig, **update) -> PipelineConfig:
    stages = {**cfg.stages, "moe": cfg.stages["moe"].model_copy(update=update)}
    return PipelineConfig.model_validate(
        {**cfg.model_dump(), "stages": {k: v.model_dump() for k, v in stages.items()}}
    )


def _client(cfg: PipelineConfig):
    return mlflow.MlflowClient(cfg.resolved_tracking_uri(), registry_uri=cfg.resolved_tracking_uri())


def _experiment(cfg: PipelineConfig) -> str:
    return _client(cfg).get_experiment_by_name(cfg.experiment).experiment_id


@pytest.fixture(scope="module")
def first_run(ray_local, base_cfg: PipelineConfig):
    started = time.perf_counter()
    result = run_pipeline(base_cfg)
    return result, time.perf_counter() - started


def test_full_pipeline_tracked_in_mlflow(base_cfg: PipelineConfig, first_run) -> None:
    result, seconds = first_run
    print(f"full tiny pipeline: {seconds:.0f} s")
    client = _client(base_cfg)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = child_runs(client, _experiment(base_cfg), result.parent_run_id)
    by_stage = {r.data.tags[STAGE_TAG]: r for r in children}
    assert sorted(by_stage) == ["grounding", "moe", "vl"] and len(children) == 3
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags[PARENT_TAG] == result.parent_run_id
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len({m.step for m in history}) > 1, f"{stage}: step metrics need more than one point"
        for key in ("lr", "tokens_per_s", "samples_per_s", "mfu", "ce", "dice"):
            assert key in run.data.metrics, f"{stage} run lacks metric {key}"
        assert run.data.params["stage"] == stage and "lora.r" in run.data.params
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model", "samples", "config"} <= artifacts
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert any(p.endswith(".png") for p in samples) and "samples/predictions.jsonl" in samples
    # Registered models with their aliases; the final one is the first champion.
    for stage, name in (("vl", "medplib-vl"), ("grounding", "medplib-grounding"), ("moe", "medplib")):
        model = client.get_registered_model(name)
        assert str(model.aliases["latest-tiny"]) == result.stages[stage].version
        version = client.get_model_version(name, result.stages[stage].version)
        assert version.run_id == by_stage[stage].info.run_id
    assert str(client.get_registered_model("medplib").aliases["champion"]) == result.stages["moe"].version
    assert result.champion and "score" in result.eval
    # The untrained starting model was scored on the same split and rows; the report compares both sides.
    before, after = result.before_dir, result.eval_dir
    assert before is not None and after is not None and before != after
    before_metrics = json.loads((before / "metrics.json").read_text())
    after_metrics = json.loads((after / "metrics.json").read_text())
    assert list(before_metrics["splits"]) == list(after_metrics["splits"]) == [base_cfg.data.eval_split]
    assert before_metrics["splits"]["val"]["rows"] == after_metrics["splits"]["val"]["rows"] > 0
    # Both sides decode within the train split's budget per question type (eval.type_budgets).
    for side in (before_metrics, after_metrics):
        assert side["budget_split"] == base_cfg.data.train_split and side["max_new_tokens_by_type"]
    comparison = json.loads((after / "comparison.json").read_text())
    rows = comparison["splits"]["val"]["rows"]
    assert rows and all(
        r["before"] is not None and r["after"] is not None for r in rows if ":" not in r["label"]
    )
    assert (after / "comparison.html").is_file() and "before training" in (after / "report.html").read_text()
    assert any(k.startswith("eval_before/val/") for k in parent.data.metrics)
    assert {"eval/comparison.html", "eval/report.html"} <= {
        a.path for a in client.list_artifacts(result.parent_run_id, "eval")
    }
    from workflows.pipeline import summary_text

    text = summary_text(result)
    print(text)
    for needle in (
        result.parent_run_id,
        "grounding mDice",
        "closed accuracy",
        "closed: top answer's share",
        "open F1",
        "report.html",
        "mlflow ui --backend-store-uri",
        "medplib serve run --model",
        "medplib predict --endpoint",
    ):
        assert needle in text, needle


def test_the_untrained_start_skips_the_champion_split_unless_it_is_the_only_one() -> None:
    from workflows.pipeline import untrained_splits

    assert untrained_splits(["val", "test", "test_xsubject"], "val") == ["test", "test_xsubject"]
    assert untrained_splits(["val"], "val") == ["val"]  # what the first_run above scores on both sides


def test_turning_the_prefetch_off_keeps_the_evaluations_fingerprints(base_cfg: PipelineConfig) -> None:
    """`eval.prefetch` moves when the evaluation's images are encoded, not what it scores: a run with it off
    finds the evaluations a run with it on did; a setting that changes the scores does not."""
    from workflows.data.prepared import row_index
    from workflows.pipeline import stage_fingerprints

    rows = row_index(base_cfg.data.prepared, base_cfg.data.train_split)

    def fps(**update) -> dict[str, str]:
        cfg = base_cfg.model_copy(update={"eval": base_cfg.eval.model_copy(update=update)})
        return stage_fingerprints(cfg, "data", rows)

    on = fps(prefetch=True)
    assert fps(prefetch=False) == on
    other = fps(max_new_tokens=base_cfg.eval.max_new_tokens + 1)
    assert other["eval"] != on["eval"] and other["before"] != on["before"]


def test_moe_experts_are_the_grounding_and_vl_ffns(base_cfg: PipelineConfig, first_run) -> None:
    result, _ = first_run
    uri = base_cfg.resolved_tracking_uri()
    # models:/NAME@latest-tiny through medplib's resolver, with this store's URI (a registered version is an
    # MLflow pyfunc model; the resolver finds the export inside it).
    models = {
        name: MedPLIB.from_pretrained(resolve_model_source(f"models:/{name}@latest-tiny", uri))
        for name in ("medplib-vl", "medplib-grounding", "medplib")
    }
    vl, grounding, final = models["medplib-vl"], models["medplib-grounding"], models["medplib"]
    init = MedPLIB.from_pretrained(
        result.stages["moe"].stage_dir / "init_model"
    )  # what the moe stage started from
    for i, layer in enumerate(init.decoder_layers):
        for expert, source in zip(layer.mlp.experts, (grounding, vl), strict=True):
            ref = dict(source.decoder_layers[i].mlp.named_parameters())
            for name, p in expert.named_parameters():
                assert torch.equal(p, ref[name]), f"layer {i} {name}"
        assert torch.equal(layer.self_attn.o_proj.weight, vl.decoder_layers[i].self_attn.o_proj.weight)
    assert torch.equal(init.text_hidden_fcs[2].weight, grounding.text_hidden_fcs[2].weight)
    assert torch.equal(init.region_fea_adapter.weight, vl.region_fea_adapter.weight)
    # The registered final model is an MoE model, and its LoRA-merged experts moved away from the start.
    assert final.cfg.moe.enabled and len(final.decoder_layers[0].mlp.experts) == 2
    assert not torch.equal(
        final.decoder_layers[0].mlp.experts[0].gate_proj.weight,
        init.decoder_layers[0].mlp.experts[0].gate_proj.weight,
    )


def test_registered_model_is_an_mlflow_pyfunc_model_with_card_and_dataset(
    base_cfg: PipelineConfig, first_run, monkeypatch, tmp_path: Path
) -> None:
    """models:/medplib@champion loads with mlflow.pyfunc and predicts on its input example; `mlflow models serve`
    (local env, 127.0.0.1) answers; the export has its card; the runs have the dataset input and the eval table."""
    import subprocess
    import sys

    import httpx
    import pandas as pd

    result, _ = first_run
    uri, client = base_cfg.resolved_tracking_uri(), _client(base_cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the autouse fixture puts the previous one back
    model = mlflow.pyfunc.load_model("models:/medplib@champion")
    example = model.input_example
    assert list(example.columns)[:2] == ["image", "question"] and len(example) == 1
    out = model.predict(example, params={"max_new_tokens": 4})
    assert list(out.columns) == ["answer", "masks", "scores"] and isinstance(out["answer"][0], str)
    assert isinstance(json.loads(out["masks"][0]), list)
    assert model.metadata.get_params_schema() is not None

    # The same version through medplib's resolver: downloaded once, then served from the cache.
    first = resolve_model_source("models:/medplib@champion", uri)
    assert resolve_model_source("models:/medplib@champion", uri) == first
    assert (Path(first) / "README.md").is_file() and (Path(first) / "tokenizer").is_dir()

    card = (result.stages["moe"].stage_dir / "export" / "README.md").read_text()
    for needle in ("not a medical device", "## Base weights", "## Training data", "### moe", "| val |"):
        assert needle in card, needle
    manifest = json.loads((Path(base_cfg.data.prepared) / "manifest.json").read_text())
    assert manifest["input_hash"] in card

    moe_run = client.get_run(result.stages["moe"].run_id)
    (dataset,) = {d.dataset.digest: d for d in moe_run.inputs.dataset_inputs}.values()
    assert json.loads(dataset.dataset.profile)["input_hash"] == manifest["input_hash"]
    tables = {a.path for a in client.list_artifacts(moe_run.info.run_id, "eval")}
    assert "eval/predictions.json" in tables

    # examples/mlflow_run.py reads the same run back as a user would.
    script = Path(__file__).resolve().parents[1] / "examples" / "mlflow_run.py"
    shown = subprocess.run(
        [sys.executable, str(script), "--tracking-uri", uri], capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    for needle in (
        "models:/medplib@champion is version",
        "input dataset",
        "eval predictions:",
        "pyfunc on its",
    ):
        assert needle in shown.stdout, needle

    port = free_port()
    # As in an activated venv: `mlflow models serve` starts `uvicorn` from PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/medplib@champion"]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read()[-3000:]
            time.sleep(0.5)
        body = {"dataframe_split": example.to_dict(orient="split"), "params": {"max_new_tokens": 3}}
        body["dataframe_split"].pop("index", None)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        (prediction,) = pd.DataFrame(r.json()["predictions"]).to_dict("records")
        assert set(prediction) == {"answer", "masks", "scores"}
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_rerun_of_a_finished_pipeline_trains_nothing(base_cfg: PipelineConfig, first_run) -> None:
    result, _ = first_run
    client = _client(base_cfg)
    runs_before = len(client.search_runs([_experiment(base_cfg)]))
    started, started_wall = time.perf_counter(), time.time()
    again = run_pipeline(base_cfg)
    seconds = time.perf_counter() - started
    assert {s: o.status for s, o in again.stages.items()} == {
        "vl": "skipped",
        "grounding": "skipped",
        "moe": "skipped",
    }
    assert again.parent_run_id == result.parent_run_id
    assert len(client.search_runs([_experiment(base_cfg)])) == runs_before
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"
    assert seconds < 30, f"a rerun with nothing to do took {seconds:.0f} s"
    # Neither eval ran again: the same folders, untouched.
    assert again.before_dir == result.before_dir and again.eval_dir == result.eval_dir
    assert (again.before_dir / "pipeline_metrics.json").stat().st_mtime < started_wall


def test_failed_moe_reruns_from_its_checkpoint_and_survives_a_killed_worker(
    base_cfg: PipelineConfig, first_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in moe (the test hook) marks the stage and the pipeline FAILED and leaves vl and grounding as they
    were; the rerun continues the same MLflow run from the checkpoint written before the failure, and when a
    training worker is SIGKILLed mid-stage, Ray Train restarts the worker group from the last committed
    checkpoint. One moe run covers both recoveries (each costs a stage start-up, ~45 s on 2 cores)."""
    result, _ = first_run
    # A new moe fingerprint, and a longer moe (8 epochs of 6 steps, capped at 40) so that the kill lands mid-stage.
    cfg = _with_moe(base_cfg, seed=7, epochs=8, checkpoint_every_steps=4).model_copy(
        update={"max_steps": 40, "max_failures": 0}
    )
    monkeypatch.setenv("MEDPLIB_TEST_FAIL", "moe:2")
    with pytest.raises(Exception, match="fails on purpose|MEDPLIB_TEST_FAIL|Training"):
        run_pipeline(cfg)
    client = _client(cfg)
    parents = client.search_runs([_experiment(cfg)], filter_string="attributes.status = 'FAILED'")
    assert len(parents) >= 2  # the pipeline run and its moe run
    failed_moe = [r for r in parents if r.data.tags.get(STAGE_TAG) == "moe"]
    assert len(failed_moe) == 1 and "fails on purpose" in failed_moe[0].data.tags["error"]
    # vl and grounding are untouched: still registered, still FINISHED.
    for stage, name in (("vl", "medplib-vl"), ("grounding", "medplib-grounding")):
        assert str(client.get_registered_model(name).aliases["latest-tiny"]) == result.stages[stage].version
        assert client.get_run(result.stages[stage].run_id).info.status == "FINISHED"
    monkeypatch.delenv("MEDPLIB_TEST_FAIL")

    killed: dict[str, int] = {}
    stop = threading.Event()
    started = time.time()

    def committed_step(stage_dir: Path) -> int:
        # A checkpoint counts once Ray has registered it (after every worker reported it): its snapshot says so.
        try:
            snapshot = json.loads((stage_dir / "checkpoint_manager_snapshot.json").read_text())
            return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].split("_")[-1])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def killer() -> None:
        # Watch the rerun's progress files (newer than the rerun); SIGKILL rank 1 of the worker group that resumed
        # from the failure's checkpoint (step 2) once it has gone past a later committed checkpoint.
        while not stop.is_set():
            for path in Path(cfg.workdir_path / "stages").glob("moe-*/progress/rank1.json"):
                try:
                    info = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                fresh = info["time"] > started and info["resumed_from"] == 2
                if fresh and 2 < committed_step(path.parent.parent) < info["step"] < 40:
                    try:
                        os.kill(info["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed.update(info)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        again = run_pipeline(cfg.model_copy(update={"max_failures": 2}))
    finally:
        stop.set()
        thread.join()
    # The killer only fires on a worker group that resumed from step 2, the checkpoint before the failure.
    assert killed, "no rerun worker resumed from step 2 and passed a later checkpoint before step 40"
    assert again.stages["vl"].status == "skipped" and again.stages["grounding"].status == "skipped"
    moe = again.stages["moe"]
    assert moe.status == "trained" and moe.run_id == failed_moe[0].info.run_id  # the same run, continued
    run = client.get_run(moe.run_id)
    assert (
        run.info.status == "FINISHED" and "error" not in run.data.tags and "previous_error" in run.data.tags
    )
    assert run.data.tags["final_step"] == "40"
    runs = [
        r
        for r in child_runs(client, _experiment(cfg), again.parent_run_id)
        if r.data.tags[STAGE_TAG] == "moe"
    ]
    assert [r.info.run_id for r in runs] == [moe.run_id]
    progress = json.loads((moe.stage_dir / "progress" / "rank1.json").read_text())
    assert progress["pid"] != killed["pid"] and progress["step"] == 40
    assert 4 <= progress["resumed_from"] <= killed["step"]  # the last checkpoint, not the failure's step 2
    history = client.get_metric_history(moe.run_id, "loss")
    steps = [m.step for m in history]
    assert max(steps) == 40 and len(set(steps)) == 40
    # Only the steps between the last checkpoint and the kill ran (and were logged) twice.
    assert len(steps) <= 40 + killed["step"] + 1 - progress["resumed_from"]
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"


def test_from_stage_redoes_that_stage_and_the_eval_of_its_model(base_cfg: PipelineConfig, first_run) -> None:
    """`--from-stage moe` after a code change: vl and grounding stay, moe trains again, and the final model is
    scored again (the eval folder is keyed by the configs, so without moving it aside the new model would
    inherit the old model's scores)."""
    result, _ = first_run
    started = time.time()
    again = run_pipeline(base_cfg, from_stage="moe")
    assert {s: o.status for s, o in again.stages.items()} == {
        "vl": "skipped",
        "grounding": "skipped",
        "moe": "trained",
    }
    assert again.eval_dir == result.eval_dir
    assert (again.eval_dir / "pipeline_metrics.json").stat().st_mtime >= started
    aside = [p.name for p in again.eval_dir.parent.glob(f"{again.eval_dir.name}.old-*")]
    assert aside and list(
        again.stages["moe"].stage_dir.parent.glob(f"{again.stages['moe'].stage_dir.name}.old-*")
    )
    assert (again.before_dir / "pipeline_metrics.json").stat().st_mtime < started  # the untrained side stays
