"""MLflow for the pipeline: one parent run per pipeline, one child run per stage, the model registry.

* Runs. The driver creates every run (never a Train worker), so a restarted worker group, or a pipeline launched
  again, finds the run id where it left it and continues that run: a stage's run id lives in its stage directory
  (`mlflow_run.json`, also copied into every checkpoint), the parent's in `<workdir>/pipeline_runs.json` keyed by
  the pipeline fingerprint. No duplicate runs (the duplicate-run bug of Ray's own MLflow callback, ray#48664,
  cannot happen: nothing is created on the workers). Children point to the parent with the `mlflow.parentRunId`
  tag, which works across processes (`start_run(nested=True)` only works inside one process).
* Logging. Params are the flattened validated config (MLflow params cannot nest; ray#33246). Rank 0 of the
  stage's Train workers logs per-step metrics into the run id it is given. A failed step's run ends FAILED with
  the error as the `error` tag and `error.txt`.
* Registry. Each stage's export is logged as the run's `model` artifacts (an MLflow pyfunc model around the export,
  `workflows/mlflow_model.py`) and registered as a version of
  `medplib-vl`, `medplib-grounding` or `medplib` with tags (stage, fingerprint, pipeline) and the alias
  `latest-<pipeline>`; the next stage downloads its input by alias URI (`models:/medplib-vl@latest-<pipeline>`)
  and checks the version's fingerprint. `champion` moves to a `medplib` version only when its eval score beats the
  current champion's (model version tag `eval_score`).
* Store. Default `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts` (set explicitly on the
  experiment; MLflow 3.17 would otherwise use ./mlruns relative to the driver's cwd). Any tracking URI works,
  e.g. an `mlflow server` (then Train workers on other nodes can reach it too; a SQLite file only works on one
  node). With artifacts on a local filesystem, the weights are hard-linked into the store and out of it
  (`medplib.artifact_files`), not copied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from medplib.artifact_files import download_artifacts, link_or_copy_tree, local_artifact_dir
from workflows.common import write_json_atomic

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "medplib.stage"
PIPELINE_TAG = "medplib.pipeline"
FINGERPRINT_TAG = "fingerprint"
RUN_ID_FILE = "mlflow_run.json"
CHAMPION = "champion"


def latest_alias(pipeline: str) -> str:
    return f"latest-{pipeline}"


class Tracker:
    """The driver's MLflow client for one pipeline (tracking and registry on the same URI)."""

    def __init__(self, tracking_uri: str, workdir: Path):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.workdir = Path(workdir)
        # Explicit URIs everywhere, never mlflow.set_tracking_uri: that exports MLFLOW_TRACKING_URI to the whole
        # process, and the next pipeline in it would silently use this store.
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)

    # ------------------------------------------------------------------ runs

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # A local store gets an explicit artifact location under the workdir; a server keeps its own default.
        local = self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
        location = (self.workdir / "mlartifacts" / name).as_uri() if local else None
        return self.client.create_experiment(name, artifact_location=location)

    def _reopen(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage == "deleted":
            return False
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return True

    def parent_run(
        self,
        experiment_id: str,
        pipeline: str,
        fingerprint: str,
        params: dict[str, str],
        run_name: str | None = None,
    ) -> str:
        """The top-level run (a pipeline's or a sweep's) for this fingerprint: continued if it exists, else
        created (named `run_name`, default `pipeline-<pipeline>`)."""
        state_file = self.workdir / "pipeline_runs.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        run_id = state.get(fingerprint)
        if run_id and self._reopen(run_id):
            log.info("pipeline %s: continuing MLflow run %s", pipeline, run_id)
            return run_id
        run = self.client.create_run(
            experiment_id,
            run_name=run_name or f"pipeline-{pipeline}",
            tags={PIPELINE_TAG: pipeline, FINGERPRINT_TAG: fingerprint},
        )
        self.log_params(run.info.run_id, params)
        state[fingerprint] = run.info.run_id
        write_json_atomic(state_file, state)
        return run.info.run_id

    def stage_run(
        self,
        experiment_id: str,
        parent_id: str,
        pipeline: str,
        stage: str,
        stage_dir: Path,
        fingerprint: str,
        params: dict[str, str],
    ) -> str:
        """The stage's child run: the one recorded in `stage_dir` if any (a restart continues it), else new."""
        id_file = stage_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = json.loads(id_file.read_text())["run_id"]
            if self._reopen(run_id):
                log.info("stage %s: continuing MLflow run %s", stage, run_id)
                return run_id
        run = self.client.create_run(
            experiment_id,
            run_name=stage,
            tags={
                PARENT_TAG: parent_id,
                STAGE_TAG: stage,
                PIPELINE_TAG: pipeline,
                FINGERPRINT_TAG: fingerprint,
            },
        )
        self.log_params(run.info.run_id, params)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(id_file, {"run_id": run.info.run_id, "tracking_uri": self.uri})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        values = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, int | float)]
        if values:
            self.client.log_batch(run_id, metrics=values)

    def finish(self, run_id: str) -> None:
        """End the run FINISHED; an `error` tag left by an earlier failed attempt becomes `previous_error`."""
        error = self.client.get_run(run_id).data.tags.get("error")
        if error is not None:
            self.client.set_tag(run_id, "previous_error", error)
            self.client.delete_tag(run_id, "error")
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, error: BaseException) -> None:
        """End the run FAILED with the error (tag + error.txt); never raises (it runs while handling an error)."""
        try:
            self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.client.log_text(run_id, text, "error.txt")
            self.client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            log.exception("could not mark MLflow run %s FAILED", run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        root = local_artifact_dir(self.client.get_run(run_id).info.artifact_uri)
        if root is None:
            self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        else:  # what MLflow's local artifact repository does, with links for the weights
            link_or_copy_tree(Path(local_dir), root / artifact_path)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dataset(self, run_id: str, prepared: Path, context: str) -> None:
        """The prepared folder as the run's input dataset (MLflow's `log_input`), identified by its manifest's
        hashes, with its rows per split as the profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from medplib.data.prepared import read_manifest

        manifest = read_manifest(prepared)
        dataset = Dataset(
            name=f"prepared-{manifest.get('model_preset')}",
            digest=str(manifest.get("input_hash"))[:8] + str(manifest.get("config_hash"))[:8],
            source_type="local",
            source=json.dumps({"uri": Path(prepared).resolve().as_uri()}),
            profile=json.dumps(
                {
                    "input_hash": manifest.get("input_hash"),
                    "config_hash": manifest.get("config_hash"),
                    "schema_version": manifest.get("schema_version"),
                    "rows": {k: v.get("accepted") for k, v in (manifest.get("splits") or {}).items()},
                }
            ),
        )
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    def log_table(self, run_id: str, jsonl: Path, artifact_file: str) -> None:
        """A JSONL file of flat records as an MLflow table (the UI's evaluation view reads it)."""
        import pandas as pd

        frame = pd.read_json(jsonl, lines=True)
        # Nested values (lists, dicts) become JSON text: a table cell holds one value.
        for column in frame.columns:
            if frame[column].map(lambda v: isinstance(v, list | dict)).any():
                frame[column] = frame[column].map(json.dumps)
        self.client.log_table(run_id, frame, artifact_file)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    # ------------------------------------------------------------------ registry

    def version_for(self, model_name: str, fingerprint: str):
        """The newest registered version of `model_name` with this fingerprint tag, or None."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(
                f"name='{model_name}' and tags.{FINGERPRINT_TAG}='{fingerprint}'"
            )
        except MlflowException:
            return None
        return max(found, key=lambda v: int(v.version)) if found else None

    def register(self, model_name: str, run_id: str, artifact_path: str, tags: dict[str, str]):
        """Register `runs:/<run_id>/<artifact_path>` (a save_pretrained directory) as a new version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                model_name,
                description="MedPLIB models: MLflow pyfunc models (workflows/mlflow_model.py) around a "
                "MedPLIB.save_pretrained export with its model card",
            )
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
        return version

    def set_alias(self, model_name: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(model_name, alias, str(version))

    def download_by_alias(
        self, model_name: str, alias: str, dst: Path, expect_fingerprint: str | None
    ) -> Path:
        """Download `models:/<name>@<alias>` into `dst` (atomically) after checking its fingerprint tag."""
        from mlflow.exceptions import MlflowException

        from medplib.inference import find_model_dir

        try:
            version = self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException as err:
            raise ValueError(
                f"models:/{model_name}@{alias} does not exist in {self.uri}: run the stage that "
                f"registers {model_name} first ({err.message})"
            ) from None
        found = version.tags.get(FINGERPRINT_TAG)
        if expect_fingerprint and found != expect_fingerprint:
            raise ValueError(
                f"models:/{model_name}@{alias} is version {version.version} with fingerprint {str(found)[:12]}, "
                f"but this pipeline's input has fingerprint {expect_fingerprint[:12]} (was the alias moved?)"
            )
        uri = f"models:/{model_name}@{alias}"
        tmp = dst.with_name(f".{dst.name}.download-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # The alias is resolved above with this tracker's client; MLflow's own `models:/` resolution would use the
        # process-wide registry URI instead (download_artifacts ignores its registry_uri argument for them).
        local = download_artifacts(version.source, tmp, self.uri)
        if dst.exists():
            shutil.rmtree(dst)
        # A registered version is an MLflow pyfunc model; the stage needs the export inside it.
        os.replace(find_model_dir(local), dst)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded %s (version %s) to %s", uri, version.version, dst)
        return dst

    def promote_champion(
        self, model_name: str, version: str | int, score: float
    ) -> tuple[bool, float | None]:
        """Move `champion` to `version` if `score` beats the current champion's `eval_score` tag (or none is
        set). Returns (promoted, previous champion's score)."""
        from mlflow.exceptions import MlflowException

        self.client.set_model_version_tag(model_name, str(version), "eval_score", f"{score:.6f}")
        try:
            current = self.client.get_model_version_by_alias(model_name, CHAMPION)
        except MlflowException:
            current = None
        previous = None
        if current is not None:
            if str(current.version) == str(version):
                return True, score
            try:
                previous = float(current.tags.get("eval_score", "nan"))
            except ValueError:
                previous = float("nan")
        if current is None or not previous == previous or score > previous:  # NaN previous: replace
            self.set_alias(model_name, CHAMPION, version)
            return True, previous
        return False, previous


def child_runs(client: Any, experiment_id: str, parent_id: str) -> list:
    """The stage runs under a pipeline run (for tests and summaries)."""
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
