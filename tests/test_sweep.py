"""A Ray Tune sweep with two trials over the tiny `vl` stage runs within 2 CPUs and records both trials (MLflow
child runs of the sweep run) and the best one (best_vl.yaml, `best.*` params). About 1-2 minutes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")

from medplib.model.config import configs_dir  # noqa: E402
from medplib_datasets.toy import write_toy_prepared  # noqa: E402
from workflows.tracking import PARENT_TAG  # noqa: E402
from workflows.train.config import load_stage_config  # noqa: E402
from workflows.tune.sweep import load_sweep_config, run_sweep  # noqa: E402


def test_sweep_with_two_trials(ray_local, tmp_path: Path) -> None:
    prepared = write_toy_prepared(tmp_path / "prepared", "tiny", {"train": 24, "val": 6})
    pipeline = yaml.safe_load((configs_dir() / "pipeline" / "tiny.yaml").read_text())
    pipeline.update(workdir=str(tmp_path / "run"), data={"prepared": str(prepared)})
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    sweep = yaml.safe_load((configs_dir() / "sweeps" / "tiny-vl.yaml").read_text())
    sweep["pipeline"] = str(tmp_path / "pipeline.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cfg = load_sweep_config(tmp_path / "sweep.yaml")

    out = run_sweep(cfg)

    assert len(out["trials"]) == 2
    # No CPU stays reserved for the next job on the cluster (a stopped trial's worker group included).
    assert not [pg for pg in ray_local.util.placement_group_table().values() if pg["state"] == "CREATED"]
    assert {t["status"] for t in out["trials"]} <= {"FINISHED", "KILLED"}
    assert sorted(t["params"]["lr"] for t in out["trials"]) == [1e-3, 1e-2]
    best = load_stage_config(out["best_config_path"])
    assert best.lr == out["best_params"]["lr"] and best.stage == "vl"
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    sweep_run = client.get_run(out["sweep_run_id"])
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.params["best.lr"] == str(out["best_params"]["lr"])
    assert f"best_{cfg.metric}" in sweep_run.data.metrics
    assert "best_vl.yaml" in {a.path for a in client.list_artifacts(out["sweep_run_id"])}
    children = client.search_runs(
        [sweep_run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{out['sweep_run_id']}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        assert "search.lr" in child.data.params
        assert len(client.get_metric_history(child.info.run_id, "loss")) >= 2
