"""`medplib submit -- <any medplib command>` (a Ray Job on a cluster) and `medplib jobs status|logs|stop ID`.

medplib submit --address http://HEAD:8265 -- pipeline run --config configs/pipeline/small.yaml --workdir /shared/w
medplib jobs status raysubmit_...   |   medplib jobs logs raysubmit_...   |   medplib jobs stop raysubmit_...
"""

from __future__ import annotations

import argparse
import sys


def add_submit(commands: argparse._SubParsersAction, verb: str) -> None:
    submit = commands.add_parser(
        verb,
        help="run a medplib command on a Ray cluster as a Ray Job",
        description="medplib submit [--address URL] [--no-wait] -- pipeline run --config ... --workdir /shared/...",
    )
    submit.add_argument(
        "--address", help="Ray dashboard/Jobs address (default: RAY_ADDRESS or 127.0.0.1:8265)"
    )
    submit.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir")
    submit.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    submit.add_argument(
        "--no-wait", action="store_true", help="return after submitting (default: follow logs)"
    )
    submit.add_argument("medplib_args", nargs=argparse.REMAINDER, help="-- then the medplib command")
    submit.set_defaults(handler=_submit)


def add_jobs(commands: argparse._SubParsersAction, verb: str) -> None:
    jobs = commands.add_parser(verb, help="status, logs or stop of a submitted Ray Job")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("job_id", nargs="?", help="submission id (not needed for list)")
    jobs.add_argument("--address", help="Ray dashboard/Jobs address")
    jobs.set_defaults(handler=_jobs)


def _submit(args: argparse.Namespace) -> int:
    from workflows.jobs import follow, submit

    command = (
        [a for a in args.medplib_args if a != "--"] if args.medplib_args[:1] == ["--"] else args.medplib_args
    )
    client, job_id = submit(command, args.address, args.working_dir, args.submission_id)
    if args.no_wait:
        print(job_id)
        return 0
    return follow(client, job_id, sys.stdout)


def _jobs(args: argparse.Namespace) -> int:
    from workflows.jobs import job_client

    client = job_client(args.address)
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
