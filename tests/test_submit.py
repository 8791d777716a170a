"""`medplib submit` against a `ray start --head` cluster (token authentication on, Ray's default) runs the tiny
pipeline to SUCCEEDED. The head uses free ports (other Ray clusters may run on the machine) and is stopped by
interrupting its own `ray start --block` process (never `ray stop`, which stops every cluster of the user).
About 3-4 minutes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")

from medplib.model.config import configs_dir  # noqa: E402
from medplib_datasets.toy import write_toy_prepared  # noqa: E402
from workflows.cli import main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    bin_dir = Path(sys.executable).parent
    log = (tmp_path_factory.mktemp("head") / "ray_start.log").open("w")
    ports = {
        name: _free_port()
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
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
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
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"ray start --head did not come up; see {log.name}") from None
            time.sleep(2)
    yield address
    proc.send_signal(signal.SIGINT)  # `ray start --block` stops what it started
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    # `ray start` recorded this head as the machine's current cluster; a later plain `ray.init()` would try it.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{ports['port']}"):
        current.unlink()


def test_submit_runs_the_tiny_pipeline(head: str, tmp_path: Path) -> None:
    prepared = write_toy_prepared(tmp_path / "prepared", "tiny", {"train": 24, "val": 6})
    pipeline = yaml.safe_load((configs_dir() / "pipeline" / "tiny.yaml").read_text())
    # Absolute paths: the job runs in an uploaded copy of the repository.
    pipeline.update(workdir=str(tmp_path / "run"), data={"prepared": str(prepared)}, max_steps=2)
    pipeline["stages"] = {k: str(configs_dir() / v) for k, v in pipeline["stages"].items()}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline))

    rc = main(
        [
            "submit",
            "--address",
            head,
            "--working-dir",
            str(Path(__file__).parents[1]),
            "--",
            "pipeline",
            "run",
            "--config",
            str(config),
        ]
    )

    assert rc == 0
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(head).list_jobs()
    assert [str(j.status.value) for j in jobs] == ["SUCCEEDED"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medplib").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {
        "pipeline-tiny": "FINISHED",
        "vl": "FINISHED",
        "grounding": "FINISHED",
        "moe": "FINISHED",
    }
