"""`medplib submit -- <any medplib command>` (a Ray Job on a cluster) and `medplib jobs status|logs|stop ID`.

    medplib submit --address http://HEAD:8265 -- pipeline run --config configs/pipeline/small.yaml --workdir /shared/w
    medplib jobs status raysubmit_...   |   medplib jobs logs raysubmit_...   |   medplib jobs stop raysubmit_...

The job runs `python -m workflows.cli <args>` on the head node, in a copy of the working directory (this
repository by default, without .venv, work/, .git and caches) that Ray uploads (runtime_env `working_dir`);
inside, `ray.init()` joins the job's cluster. Relative paths in the command resolve inside that copy and vanish
with it, so give `--workdir` (and data paths) on storage the cluster can read.

Ray 2.59+ clusters use token authentication by default: when `RAY_AUTH_MODE` is not set and a token is at hand
(`~/.ray/auth_token` or `RAY_AUTH_TOKEN`), this command sets `RAY_AUTH_MODE=token` for its own SDK calls
(research stack.md section 8). The address comes from `--address`, else `RAY_ADDRESS`, else the local dashboard.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger("medplib")

EXCLUDES = [".venv", "work", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "mlruns",
            "mlflow.db", "mlartifacts", "runs"]  # fmt: skip
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str | None):
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or
                                              (Path.home() / ".ray" / "auth_token").exists()):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    return JobSubmissionClient(address)


def register(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="run a medplib command on a Ray cluster as a Ray Job",
        description="medplib submit [--address URL] [--no-wait] -- pipeline run --config ... --workdir /shared/...",
    )
    submit.add_argument("--address", help="Ray dashboard/Jobs address (default: RAY_ADDRESS or 127.0.0.1:8265)")
    submit.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir")
    submit.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting (default: follow logs)")
    submit.add_argument("medplib_args", nargs=argparse.REMAINDER, help="-- then the medplib command")
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser("jobs", help="status, logs or stop of a submitted Ray Job")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("job_id", nargs="?", help="submission id (not needed for list)")
    jobs.add_argument("--address", help="Ray dashboard/Jobs address")
    jobs.set_defaults(handler=_jobs)


def _submit(args: argparse.Namespace) -> int:
    command = [a for a in args.medplib_args if a != "--"] if args.medplib_args[:1] == ["--"] else args.medplib_args
    if not command:
        raise ValueError("nothing to run: give the medplib command after `--`, e.g. -- pipeline run --config ...")
    if command[0] in ("submit", "jobs"):
        raise ValueError(f"`medplib {command[0]}` cannot be submitted as a job")
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir} is not a directory")
    client = _client(args.address)
    entrypoint = "python -m workflows.cli " + shlex.join(command)
    # Ray Jobs touch point: the working dir is uploaded; env vars reach the job's driver.
    job_id = client.submit_job(
        entrypoint=entrypoint, submission_id=args.submission_id,
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES,
                     "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}},
    )  # fmt: skip
    log.info("submitted %s: %s", job_id, entrypoint)
    if args.no_wait:
        print(job_id)
        return 0
    return _follow(client, job_id)


def _follow(client, job_id: str) -> int:
    """Print the job's logs as they grow until it ends; the exit code says how it ended."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            log.info("job %s %s", job_id, status)
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(2.0)


def _jobs(args: argparse.Namespace) -> int:
    client = _client(args.address)
    if args.action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
        return 0
    if not args.job_id:
        raise ValueError(f"medplib jobs {args.action} needs a job id")
    if args.action == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.action == "logs":
        sys.stdout.write(client.get_job_logs(args.job_id))
    else:
        print("stopped" if client.stop_job(args.job_id) else "already ended")
    return 0
