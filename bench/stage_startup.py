"""Fixed start-up of a training stage: the `small` grounding stage run as the pipeline runs it (Ray Train worker
group, model load, DeepSpeed init, Ray Data shard, the steps, the checkpoint, the fp32 export), once with 1
optimiser step and once with 5, in one process on one local Ray cluster; the start-up is the intercept
`t(1) - (t(5) - t(1)) / 4`. The worker logs its own split (model load, DeepSpeed init). The frozen encoder's
outputs for every row's image are in the embedding cache before either run, so that all steps cost alike (with
the cache filled by the 1-step run, the 5-step run's first step read its images while its others encoded theirs).
On the AVX2-only EPYC, 2026-12-02, where an image takes 1.7 s: 44.7 s before, 43.5 s with the cache filled
(46.4 s vs 57.8 s, 2.9 s a step); the 1-step run's one step took 10.3 s of it, 7.4 s over a step's average.

    .venv/bin/python -m bench.stage_startup [--stage grounding] [--threads 2]

Goal: fixed start-up <= 30 s on 2 cores with the cluster already up (the MLflow registration the pipeline adds is
measured apart: a copy of the export into the artifact store).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from bench.common import print_figures, stage_config

log = logging.getLogger("bench.stage_startup")


def fill_embedding_cache(model, prepared: Path, root: Path, tasks: list[str], autocast: bool) -> None:
    """The frozen encoder's outputs for the images of the stage's rows, in `root`, as the stage computes them
    (the encoder's fingerprint leaves out where its weights came from, so the saved model finds them)."""
    from medplib.data.rows import row_to_encoded
    from medplib.model.embedding_cache import EmbeddingCache
    from workflows.data.prepared import read_rows
    from workflows.train.stage import plain_row

    rows = read_rows(prepared, "train", set(tasks), 10**9)
    size = model.cfg.vision.image_size_px
    EmbeddingCache(root, model, autocast=autocast).fill([row_to_encoded(plain_row(r), size) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="grounding", choices=["vl", "grounding"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="keep the files here (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import mlflow
    import torch

    from medplib.model.config import load_model_config
    from medplib.model.medplib import MedPLIB
    from medplib_datasets.toy import write_toy_prepared
    from workflows.common import init_ray
    from workflows.data.prepared import row_index
    from workflows.train.config import fingerprint
    from workflows.train.stage import (
        StagePlan,
        export_stage_model,
        fit_stage,
        plan_steps,
        resolve_precision,
        save_model_atomic,
        select_rows,
    )

    work = Path(args.workdir or tempfile.mkdtemp(prefix="stage-startup-"))
    stage = stage_config("small", args.stage)
    stage = stage.model_copy(update={"balance_by": None, "checkpoint_every_steps": 10**6})
    prepared = write_toy_prepared(work / "prepared", "small", {"train": 64})
    torch.manual_seed(stage.seed)
    model = MedPLIB(load_model_config("small"))
    init = save_model_atomic(model, work / "init_model")
    precision = resolve_precision(stage, False)
    fill_embedding_cache(
        model, prepared, work / "embeddings", stage.tasks, autocast=precision == "bf16-mixed"
    )
    del model  # the stages load their own from `init`
    # A cluster of its own (not $RAY_ADDRESS), with the allocator settings the pipeline's workers start with.
    init_ray("local", num_cpus=max(2, args.threads))
    rows = row_index(prepared, "train")
    seconds: dict[int, float] = {}
    for steps in (1, 5):
        began = time.perf_counter()
        plan = StagePlan(
            stage=stage,
            fingerprint=fingerprint(stage, "bench", steps),
            init_dir=str(init),
            stage_dir=str(work / f"stage-{steps}"),
            world_size=1,
            use_gpu=False,
            precision=precision,
            torch_threads=args.threads,
            embedding_cache=str(work / "embeddings"),
            **plan_steps(stage, rows, 1, steps),
        )
        run = fit_stage(
            plan,
            select_rows(stage, prepared, "train", rows, 1, steps),
            name=f"stage-{steps}",
            storage_path=str(work),
            cpus_per_worker=1.0,
            max_failures=0,
        )
        export = export_stage_model(plan, run.checkpoint_dir, work / f"export-{steps}")
        seconds[steps] = time.perf_counter() - began
        log.info("%d step(s): %.1f s (fit + export)", steps, seconds[steps])
    per_step = (seconds[5] - seconds[1]) / 4
    startup = seconds[1] - per_step
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.create_experiment("bench", artifact_location=(work / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    t0 = time.perf_counter()
    client.log_artifacts(run_id, str(export), "model")
    register_s = time.perf_counter() - t0
    print(
        f"small/{args.stage}: 1 step {seconds[1]:.1f} s, 5 steps {seconds[5]:.1f} s -> {per_step:.1f} s a step, "
        f"fixed start-up {startup:.1f} s; logging the export to MLflow {register_s:.1f} s; load {os.getloadavg()}"
    )
    print_figures(
        [
            {"name": f"stage_startup_s[small/{args.stage}]", "value": round(startup, 1), "goal": "<= 30"},
            {"name": f"stage_step_s[small/{args.stage}]", "value": round(per_step, 2), "goal": None},
            {"name": "stage_export_log_artifacts_s[small]", "value": round(register_s, 1), "goal": None},
        ]
    )


if __name__ == "__main__":
    main()
