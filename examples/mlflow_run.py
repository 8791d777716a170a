"""Read a pipeline run back from MLflow: the champion model's version, its run's metrics and params, its model
card, its training data input, its eval predictions table, and the model itself through `mlflow.pyfunc`.

    python examples/mlflow_run.py --tracking-uri sqlite:///<workdir>/mlflow.db   (<workdir>: the pipeline's, e.g. work/pipeline-small)

(`pip install .`, no extras; the store is the pipeline's, see `medplib pipeline run`'s summary.)
"""

from __future__ import annotations

import argparse
import json

import mlflow
from mlflow import MlflowClient


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", default="medplib")
    parser.add_argument("--alias", default="champion")
    args = parser.parse_args()

    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri, registry_uri=args.tracking_uri)
    version = client.get_model_version_by_alias(args.model, args.alias)
    print(
        f"models:/{args.model}@{args.alias} is version {version.version} (eval_score {version.tags.get('eval_score')})"
    )
    run = client.get_run(version.run_id)
    print(f"run {run.info.run_id} ({run.data.tags.get('medplib.stage')}), status {run.info.status}")
    print(
        "metrics:",
        {k: round(v, 4) for k, v in sorted(run.data.metrics.items()) if k in ("loss", "ce", "dice")},
    )
    print("params:", {k: run.data.params[k] for k in sorted(run.data.params)[:6]}, "...")
    for dataset in run.inputs.dataset_inputs:  # logged with mlflow.log_input: the prepared data's hashes
        profile = json.loads(dataset.dataset.profile or "{}")
        print(
            f"input dataset {dataset.dataset.name} digest {dataset.dataset.digest}, rows {profile.get('rows')}"
        )
    predictions = client.load_table(
        run.info.experiment_id, "eval/predictions.json", run_ids=[run.info.run_id]
    )
    print(f"eval predictions: {len(predictions)} rows, columns {list(predictions.columns)[:6]}")
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model/artifacts/export/README.md")
    print("model card:", card.split("\n# ", 1)[1].splitlines()[0])

    model = mlflow.pyfunc.load_model(f"models:/{args.model}@{args.alias}")
    answer = model.predict(model.input_example, params={"max_new_tokens": 8})
    print("pyfunc on its input example:", answer.iloc[0].to_dict())


if __name__ == "__main__":
    main()
