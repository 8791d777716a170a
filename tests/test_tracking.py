"""Model files on a local MLflow store (`medplib.artifact_files`): weights hard-linked into the store by the tracker
and out of it, by alias for the next stage and into the medplib cache for a `models:/` URI; small files copied; any
other store left to MLflow."""

from __future__ import annotations

import os
from pathlib import Path

from medplib.artifact_files import LINK_MIN_BYTES, local_artifact_dir
from medplib.inference import resolve_model_source
from workflows.tracking import FINGERPRINT_TAG, Tracker


def _model(folder: Path) -> Path:
    """A pyfunc-like folder around an export: config and card (small) and weights (over the link threshold)."""
    export = folder / "artifacts" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text('{"model_type": "medplib"}')
    (export / "README.md").write_text("card v1")
    (export / "model.safetensors").write_bytes(os.urandom(LINK_MIN_BYTES + 1))
    return export


def test_weights_are_linked_into_a_local_store_and_out_of_it(tmp_path: Path, monkeypatch) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    run_id = tracker.client.create_run(tracker.experiment_id("t")).info.run_id
    export = _model(tmp_path / "mlflow_model")
    tracker.log_artifacts(run_id, tmp_path / "mlflow_model", "model")

    store = (
        local_artifact_dir(tracker.client.get_run(run_id).info.artifact_uri)
        / "model"
        / "artifacts"
        / "export"
    )
    assert {a.path for a in tracker.client.list_artifacts(run_id, "model/artifacts/export")} == {
        "model/artifacts/export/config.json",
        "model/artifacts/export/README.md",
        "model/artifacts/export/model.safetensors",
    }
    assert (store / "model.safetensors").stat().st_ino == (export / "model.safetensors").stat().st_ino
    # The card is a copy: rewriting the staged one in place (as the eval does) leaves the logged one as it was.
    (export / "README.md").write_text("card v2, after the eval")
    assert (store / "README.md").read_text() == "card v1"

    version = tracker.register("m", run_id, "model", {FINGERPRINT_TAG: "fp"})
    tracker.set_alias("m", "latest-t", version.version)
    got = tracker.download_by_alias("m", "latest-t", tmp_path / "inputs" / "m", "fp")
    assert got == tmp_path / "inputs" / "m" and (got / "config.json").is_file()
    assert (got / "model.safetensors").stat().st_ino == (store / "model.safetensors").stat().st_ino
    assert (got / "README.md").read_text() == "card v1"
    assert not list((tmp_path / "inputs").glob(".*download*"))  # the staging folder is gone

    # A served `models:/` URI: the medplib cache holds the same weights.
    monkeypatch.setenv("MEDPLIB_CACHE", str(tmp_path / "cache"))
    served = Path(resolve_model_source("models:/m@latest-t", tracker.uri))
    assert served.is_relative_to(tmp_path / "cache") and (served / "README.md").read_text() == "card v1"
    assert (served / "model.safetensors").stat().st_ino == (store / "model.safetensors").stat().st_ino


def test_only_file_uris_and_plain_paths_are_local(tmp_path: Path) -> None:
    assert local_artifact_dir(tmp_path.as_uri()) == tmp_path
    assert local_artifact_dir(str(tmp_path)) == tmp_path
    for remote in (
        "mlflow-artifacts:/1/abc/artifacts",
        "s3://bucket/1/abc/artifacts",
        "http://127.0.0.1:5000/x",
    ):
        assert local_artifact_dir(remote) is None, remote
