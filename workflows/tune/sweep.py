"""`medplib sweep`: Ray Tune over one training stage, with ASHA early stopping; each trial is a Ray Train run.

    medplib sweep --config configs/sweeps/tiny-vl.yaml [--stage vl] [--workdir DIR]

Train V2's pattern: the Tune trainable is a *function* that builds
and fits a `TorchTrainer` (`Tuner(TorchTrainer)` no longer works), and `TuneReportCallback` forwards each
`ray.train.report` to Tune, so ASHA sees one result per optimiser step (`training_iteration` = step).

* Search space: dotted `StageConfig` fields (`lr`, `lora.r`, `loss_weights.dice`, ...) with `grid`, `choice`,
  `uniform` or `loguniform` values; every combination is validated as a `StageConfig` before anything runs.
* Inputs: the stage's starting model is built once like the pipeline's (`vl` from the preset; `grounding`/`moe`
  from the registry aliases of the earlier stages) into `<workdir>/sweeps/<name>-<fp12>/init_model`.
* MLflow: one sweep run (parent), one child run per trial (tags `mlflow.parentRunId`, `medplib.trial`) with the
  trial's overrides as `search.*` params and per-step metrics from rank 0. A trial ASHA stopped ends KILLED with
  tag `stopped_early`; the best trial's full stage config is written to `best_<stage>.yaml` and logged, with
  `best.*` params and `best_<metric>` on the sweep run.
* Resources: each trial's driver takes `trial_cpus` and its workers `cpus_per_worker` each; with the defaults two
  trials of one worker fit in 2 CPUs and leave CPU for Ray Data (a whole CPU per trial would deadlock).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workflows.train.config import StageConfig, StageName, _explain, _read_yaml, fingerprint, flatten

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SearchDim(_Strict):
    """One search dimension: exactly one of grid / choice / uniform / loguniform."""

    grid: list[Any] | None = None
    """Every value, each in its own trial (times num_samples)."""
    choice: list[Any] | None = None
    """One value drawn per trial."""
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> SearchDim:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        return self

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def examples(self) -> list[Any]:
        """Values to validate the config with before any trial runs."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid if self.grid is not None else self.choice)
        lo, hi = self.uniform if self.uniform is not None else self.loguniform
        return [lo, hi]


class AshaSettings(_Strict):
    """ASHA early stopping over optimiser steps (max_t = the sweep's max_steps)."""

    grace_period: int = Field(2, ge=1)
    """Steps every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(_Strict):
    """A Ray Tune sweep over one stage of a pipeline config."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Sweep name (MLflow run name `sweep-<name>`, output folder `<workdir>/sweeps/<name>-<fp12>`)."""
    pipeline: str
    """Pipeline config (data, workdir, MLflow store, the stage config to start from); relative to configs/."""
    stage: StageName
    search_space: dict[str, SearchDim]
    """Dotted StageConfig fields -> values, e.g. {lr: {loguniform: [1e-4, 1e-2]}, lora.r: {grid: [4, 8]}}."""
    metric: str = "loss"
    """Metric the workers report each step (loss, ce, dice, ...) that ASHA and the best trial use."""
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1)
    """Trials per grid point (random dimensions are drawn again for each)."""
    max_steps: int = Field(ge=1)
    """Optimiser steps per trial."""
    asha: AshaSettings | None = AshaSettings()
    """null = no early stopping."""
    max_concurrent_trials: int = Field(2, ge=1)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.4, gt=0)
    trial_cpus: float = Field(0.1, gt=0)
    """CPU reserved by each trial's driver (the Tune function that fits the TorchTrainer)."""


def apply_overrides(stage: StageConfig, params: dict[str, Any]) -> StageConfig:
    """`stage` with dotted fields replaced; errors name the field."""
    data = stage.model_dump(mode="json")
    for dotted, value in params.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise ValueError(f"search_space: {dotted!r} is not a field of the {stage.stage} stage config")
            node = node[key]
        if keys[-1] not in node:
            raise ValueError(f"search_space: {dotted!r} is not a field of the {stage.stage} stage config")
        node[keys[-1]] = value
    return StageConfig.model_validate(data)


def load_sweep_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        cfg = SweepConfig.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise _explain(err, path) from None
    return cfg


class TrialSpec(BaseModel):
    """What every trial needs (sent once with `tune.with_parameters`)."""

    sweep: SweepConfig
    stage: StageConfig
    stage_fingerprint: str
    init_dir: str
    prepared: str
    train_split: str
    sweep_dir: str
    tracking_uri: str
    experiment_id: str
    sweep_run_id: str
    use_gpu: bool


def _trial(config: dict, spec: dict) -> None:
    """One trial (runs in a Tune trial actor): a stage with the sampled overrides, as a TorchTrainer run."""
    import ray.tune
    from mlflow import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows.data.prepared import row_index
    from workflows.tracking import PARENT_TAG, STAGE_TAG
    from workflows.train.stage import StagePlan, fit_stage, plan_steps, resolve_precision, select_rows

    s = TrialSpec.model_validate(spec)
    params = dict(config["params"])
    stage = apply_overrides(s.stage, params)
    trial_id = ray.tune.get_context().get_trial_id()
    client = MlflowClient(s.tracking_uri)
    run = client.create_run(
        s.experiment_id,
        run_name=f"trial-{trial_id}",
        tags={
            PARENT_TAG: s.sweep_run_id,
            STAGE_TAG: stage.stage,
            "medplib.sweep": s.sweep.name,
            "medplib.trial": trial_id,
        },
    )
    run_id = run.info.run_id
    from mlflow.entities import Param

    items = [Param(f"search.{k}", str(v)) for k, v in params.items()] + [
        Param(k, v[:6000]) for k, v in flatten(stage).items()
    ]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    trials = Path(s.sweep_dir) / "trials"
    trials.mkdir(parents=True, exist_ok=True)
    (trials / f"{trial_id}.json").write_text(json.dumps({"run_id": run_id, "params": params}))
    prepared = Path(s.prepared)
    rows = row_index(prepared, s.train_split)
    arithmetic = plan_steps(stage, rows, s.sweep.workers_per_trial, s.sweep.max_steps)
    plan = StagePlan(
        stage=stage,
        fingerprint=fingerprint(stage, s.stage_fingerprint, "trial", trial_id),
        init_dir=s.init_dir,
        stage_dir=str(trials / trial_id),
        world_size=s.sweep.workers_per_trial,
        use_gpu=s.use_gpu,
        precision=resolve_precision(stage, s.use_gpu),
        tracking_uri=s.tracking_uri,
        mlflow_run_id=run_id,
        report_every_step=True,
        **arithmetic,
    )
    try:
        fit_stage(
            plan,
            select_rows(
                stage,
                prepared,
                s.train_split,
                rows,
                s.sweep.workers_per_trial,
                arithmetic["total_steps"],
            ),
            name=trial_id,
            storage_path=str(trials),
            cpus_per_worker=s.sweep.cpus_per_worker,
            max_failures=0,
            callbacks=[TuneReportCallback()],
        )  # Ray Tune touch point: worker reports -> Tune results
    except BaseException as err:
        # The driver ends the run (`_close_trial_runs`): a trial ASHA stopped can still be unwinding here after
        # the driver closed its run as KILLED, and a FAILED written now would overwrite that.
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        raise
    client.set_terminated(run_id, "FINISHED")


def _remove_leaked_placement_groups(before: set[str]) -> None:
    """Remove the placement groups this job created during the sweep and still holds. When ASHA stops a trial,
    Tune removes the trial's own group, but the worker group its TrainController reserved is left to Ray Train's
    PlacementGroupCleaner, which dies when it cannot tell which of several Ray instances on the machine is its own
    ("Found multiple active Ray instances"). The reserved CPUs then starve the next job on the cluster (measured:
    a Ray Data eval waited forever for 1 CPU with 0.8 of 2 held by two stopped trials)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    for pg_id, pg in ray.util.placement_group_table().items():
        if pg_id not in before and pg_id.endswith(job) and pg["state"] == "CREATED":
            log.info("sweep: removing placement group %s left by a stopped trial", pg_id)
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def run_sweep(cfg: SweepConfig, workdir: str | None = None) -> dict[str, Any]:
    """Run the sweep; returns {"best_params", "best_metric", "best_config_path", "sweep_run_id", "trials"}."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from medplib.model.config import configs_dir
    from workflows.common import cluster_gpus, decide_gpu, init_ray
    from workflows.data.prepared import row_index
    from workflows.pipeline import _Context, _init_model, prepare_data, stage_fingerprints
    from workflows.tracking import Tracker
    from workflows.train.config import load_pipeline_config

    pipe_path = Path(cfg.pipeline)
    if not pipe_path.exists():
        pipe_path = configs_dir() / cfg.pipeline
    pipe = load_pipeline_config(pipe_path, workdir=workdir)
    base = pipe.stages[cfg.stage]
    examples = [
        dict(zip(cfg.search_space, values, strict=True))
        for values in itertools.product(*(d.examples() for d in cfg.search_space.values()))
    ]
    for example in examples:  # every combination is a valid stage config, before anything starts
        apply_overrides(base, example)
    init_ray(pipe.ray_address, ray_train=True)
    use_gpu = decide_gpu(pipe.use_gpu, cluster_gpus())
    tracker = Tracker(pipe.resolved_tracking_uri(), pipe.workdir_path)
    experiment_id = tracker.experiment_id(pipe.experiment)
    prepared, data_fp = prepare_data(pipe)
    lengths = row_index(prepared, pipe.data.train_split)
    fps = stage_fingerprints(pipe, data_fp, lengths)
    sweep_fp = fingerprint("sweep", cfg, fps[cfg.stage])
    sweep_dir = pipe.workdir_path / "sweeps" / f"{cfg.name}-{sweep_fp[:12]}"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep_run_id = tracker.parent_run(
        experiment_id,
        pipe.name,
        sweep_fp,
        {**flatten(cfg), "stage_fingerprint": fps[cfg.stage]},
        run_name=f"sweep-{cfg.name}",
    )
    tracker.set_tags(sweep_run_id, {"medplib.sweep": cfg.name, "medplib.stage": cfg.stage})
    ctx = _Context(pipe, tracker, experiment_id, sweep_run_id, prepared, data_fp, fps, use_gpu, lengths)
    try:
        init = _init_model(ctx, cfg.stage, sweep_dir)
        spec = TrialSpec(
            sweep=cfg,
            stage=base,
            stage_fingerprint=fps[cfg.stage],
            init_dir=str(init),
            prepared=str(prepared),
            train_split=pipe.data.train_split,
            sweep_dir=str(sweep_dir),
            tracking_uri=tracker.uri,
            experiment_id=experiment_id,
            sweep_run_id=sweep_run_id,
            use_gpu=use_gpu,
        )
        scheduler = None
        if cfg.asha is not None:
            scheduler = ASHAScheduler(
                max_t=cfg.max_steps,
                grace_period=cfg.asha.grace_period,
                reduction_factor=cfg.asha.reduction_factor,
            )
        log.info(
            "== sweep %s: stage %s, %s, up to %d trials at once, %d steps each",
            cfg.name,
            cfg.stage,
            ", ".join(cfg.search_space),
            cfg.max_concurrent_trials,
            cfg.max_steps,
        )
        # Ray Tune touch point: a function trainable (Train V2) with a small CPU reservation of its own.
        trainable = tune.with_resources(
            tune.with_parameters(_trial, spec=spec.model_dump(mode="json")), {"CPU": cfg.trial_cpus}
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"params": {k: d.to_tune() for k, d in cfg.search_space.items()}},
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                scheduler=scheduler,
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir)),
        )
        before = set(ray.util.placement_group_table())
        results = tuner.fit()
        _remove_leaked_placement_groups(before)
        # Before the best result is asked for: with every trial failed that raises, and the runs must end first.
        trials = _close_trial_runs(tracker, sweep_dir, results, cfg)
        best = results.get_best_result(metric=cfg.metric, mode=cfg.mode, scope="all")
        best_params = dict(best.config["params"])
        best_stage = apply_overrides(base, best_params)
        best_path = sweep_dir / f"best_{cfg.stage}.yaml"
        header = (
            f"# Best of sweep {cfg.name} ({cfg.metric} {cfg.mode}: "
            f"{best.metrics.get(cfg.metric)}); overrides {json.dumps(best_params)}\n"
            f"# Use it as stages.{cfg.stage} of {cfg.pipeline}.\n"
        )
        best_path.write_text(header + yaml.safe_dump(best_stage.model_dump(mode="json"), sort_keys=False))
        tracker.log_file(sweep_run_id, best_path)
        tracker.log_params(sweep_run_id, {f"best.{k}": str(v) for k, v in best_params.items()})
        tracker.log_metrics(sweep_run_id, {f"best_{cfg.metric}": float(best.metrics[cfg.metric])})
        tracker.finish(sweep_run_id)
    except BaseException as err:
        tracker.fail(sweep_run_id, err)
        raise
    for trial in trials:
        log.info(
            "trial %s %-8s %s steps %s %s",
            trial["trial_id"],
            trial["status"],
            trial["params"],
            trial["steps"],
            trial.get(cfg.metric),
        )
    log.info(
        "== sweep %s: best %s = %.4f with %s; wrote %s (MLflow run %s)",
        cfg.name,
        cfg.metric,
        best.metrics[cfg.metric],
        best_params,
        best_path,
        sweep_run_id,
    )
    return {
        "best_params": best_params,
        "best_metric": float(best.metrics[cfg.metric]),
        "best_config_path": best_path,
        "sweep_run_id": sweep_run_id,
        "trials": trials,
    }


def _close_trial_runs(tracker, sweep_dir: Path, results, cfg: SweepConfig) -> list[dict[str, Any]]:
    """End every trial's run that its trainable did not finish: FAILED when Tune recorded an error for the trial,
    else KILLED, tagged stopped_early (ASHA stopped it; the trainable may still be unwinding, so it only tags an
    error and leaves the status to this function)."""
    trials = []
    by_id = {r.metrics.get("trial_id"): r for r in results}
    for path in sorted((sweep_dir / "trials").glob("*.json")):
        info = json.loads(path.read_text())
        trial_id = path.stem
        result = by_id.get(trial_id)
        steps = int(result.metrics.get("training_iteration", 0)) if result and result.metrics else 0
        status = tracker.run_status(info["run_id"])
        if status in ("RUNNING", "FAILED"):
            if result is not None and result.error is not None:
                status = "FAILED"
            else:
                tracker.set_tags(info["run_id"], {"stopped_early": f"ASHA after {steps} steps"})
                status = "KILLED"
            tracker.client.set_terminated(info["run_id"], status, end_time=int(time.time() * 1000))
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": info["run_id"],
                "params": info["params"],
                "status": status,
                "steps": steps,
                cfg.metric: (result.metrics or {}).get(cfg.metric) if result else None,
            }
        )
    return trials
