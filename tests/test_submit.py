"""The deployment path end to end: `medplib submit` sends the tiny pipeline to a `ray start --head` cluster (token
authentication on, Ray's default) as a Ray job, and the job tracks into an MLflow server on PostgreSQL
(tests/mlflow_servers.py), as a cluster's jobs would. The head uses free ports (other Ray clusters may run on the
machine) and is stopped by interrupting its own `ray start --block` process (never `ray stop`, which stops every
cluster of the user). About 3-5 minutes on 2 cores.

The head and `medplib submit` run as their own processes with the cluster's token in their environment
(RAY_AUTH_MODE, RAY_AUTH_TOKEN), as a user's shell would have them: Ray reads its authentication mode once per
process, so setting it in the test process would change it for every later test's local cluster there (a
failure here once cascaded into 24 errors that way)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow_servers import MlflowServer, Postgres, free_port, table_count

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")

from medplib.model.config import configs_dir  # noqa: E402
from medplib_datasets.toy import write_toy_prepared  # noqa: E402


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """(dashboard address, environment of a client of this cluster)."""
    bin_dir = Path(sys.executable).parent
    log = (tmp_path_factory.mktemp("head") / "ray_start.log").open("w")
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "metrics-export-port",
        )
    }
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    cmd = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while _jobs(address, token) is None:
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"ray start --head did not come up; see {log.name}")
        time.sleep(2)
    yield address, env
    proc.send_signal(signal.SIGINT)  # `ray start --block` stops what it started
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    # `ray start` recorded this head as the machine's current cluster; a later plain `ray.init()` would try it.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{ports['port']}"):
        current.unlink()


def _jobs(address: str, token: str) -> list[dict] | None:
    """The cluster's jobs from its REST API (the token as a bearer), None while it does not answer."""
    try:
        response = httpx.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_submitted_pipeline_tracks_into_postgres_mlflow(
    head: tuple[str, dict[str, str]], pg_mlflow: tuple[Postgres, MlflowServer], tmp_path: Path
) -> None:
    """The job runs `medplib pipeline run --tracking-uri <server>` to SUCCEEDED; its runs, registered models and
    the champion's files come back through the MLflow client, and all of it lives in PostgreSQL and the server's
    artifact store, none in a sqlite file beside the workdir."""
    pg, server = pg_mlflow
    # The toy prepared rows (seconds to write, no Ray Data prepare step): this test is about where the job runs
    # and where its runs go, not about the data.
    prepared = write_toy_prepared(tmp_path / "prepared", "tiny", {"train": 24, "val": 6})
    pipeline = yaml.safe_load((configs_dir() / "pipeline" / "tiny.yaml").read_text())
    # Absolute paths: the job runs in an uploaded copy of the repository.
    pipeline["data"] = {"prepared": str(prepared)}
    pipeline["stages"] = {k: str(configs_dir() / v) for k, v in pipeline["stages"].items()}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline))

    address, env = head
    submit = subprocess.run(
        [
            str(Path(sys.executable).parent / "medplib"),
            "submit",
            "--address",
            address,
            "--working-dir",
            str(Path(__file__).parents[1]),
            "--",
            "pipeline",
            "run",
            "--config",
            str(config),
            "--workdir",
            str(tmp_path / "run"),
            "--tracking-uri",
            server.url,
            "--max-steps",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    assert submit.returncode == 0, submit.stdout[-4000:]
    assert [j["status"] for j in _jobs(address, env["RAY_AUTH_TOKEN"])] == ["SUCCEEDED"]
    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    experiment = client.get_experiment_by_name("medplib")
    assert experiment is not None, "the job did not create the `medplib` experiment on the server"
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {
        "pipeline-tiny": "FINISHED",
        "vl": "FINISHED",
        "grounding": "FINISHED",
        "moe": "FINISHED",
    }
    parent = next(r for r in runs if r.info.run_name == "pipeline-tiny")
    children = [r for r in runs if r is not parent]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent.info.run_id}
    assert all(r.data.metrics for r in children), "a stage logged no metric"

    registered = {m.name for m in client.search_registered_models()}
    assert {"medplib-vl", "medplib-grounding", "medplib"} <= registered, sorted(registered)
    champion = client.get_model_version_by_alias("medplib", "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
    mlflow.set_tracking_uri(server.url)  # the autouse fixture puts the previous one back
    local = Path(
        mlflow.artifacts.download_artifacts("models:/medplib@champion", dst_path=str(tmp_path / "dl"))
    )
    assert any(local.rglob("*.safetensors")), (
        f"no weights under {local}: {sorted(p.name for p in local.rglob('*'))}"
    )
    assert table_count(pg, "runs") >= len(runs)
    assert table_count(pg, "model_versions") >= 3
    assert not list((tmp_path / "run").rglob("mlflow.db"))
