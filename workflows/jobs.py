"""Any `medplib` command as a Ray Job on a cluster (`medplib submit`), and the Jobs client behind `medplib jobs`.

The job runs `python -m workflows.cli <args>` on the head node, in a copy of the working directory (this
repository by default, without .venv, work/, .git and caches) that Ray uploads (runtime_env `working_dir`);
inside, Ray sets RAY_ADDRESS, so the command joins the job's cluster. Relative paths in the command resolve inside
that copy and vanish with it, so give `--workdir` (and data paths) on storage the cluster can read.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

EXCLUDES = [
    ".venv",
    "work",
    ".git",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "mlruns",
    "mlflow.db",
    "mlartifacts",
    "runs",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_client(address: str | None):  # -> ray.job_submission.JobSubmissionClient
    """The Jobs client of `address`, else $RAY_ADDRESS, else the local dashboard."""
    # Ray 2.59+ clusters use token authentication by default; with a token at hand, the SDK must be told.
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    return JobSubmissionClient(address)


def submit(
    command: list[str], address: str | None, working_dir: str | Path, submission_id: str | None = None
):
    """Submit `medplib <command>` as a Ray Job; returns (client, job id)."""
    if not command:
        raise ValueError(
            "nothing to run: give the medplib command after `--`, e.g. -- pipeline run --config ..."
        )
    if command[0] in ("submit", "jobs"):
        raise ValueError(f"`medplib {command[0]}` cannot be submitted as a job")
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir} is not a directory")
    client = job_client(address)
    entrypoint = "python -m workflows.cli " + shlex.join(command)
    # Ray Jobs touch point: the working dir is uploaded; env vars reach the job's driver.
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env={
            "working_dir": str(working_dir),
            "excludes": EXCLUDES,
            "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"},
        },
    )
    log.info("submitted %s: %s", job_id, entrypoint)
    return client, job_id


def follow(client, job_id: str, out: TextIO) -> int:
    """Copy the job's logs to `out` as they grow until it ends; 0 when it SUCCEEDED, else 1."""
    written = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > written:
            out.write(logs[written:])
            out.flush()
            written = len(logs)
        if status in TERMINAL:
            log.info("job %s %s", job_id, status)
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(2.0)
