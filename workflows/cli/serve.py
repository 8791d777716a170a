"""`medplib serve run` (start the Ray Serve application locally) and `medplib serve config` (print the resolved
Ray Serve config file, for `serve deploy`)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("medplib")


def add_serve(commands: argparse._SubParsersAction, verb: str) -> None:
    group = commands.add_parser(verb, help="serve the model over HTTP with Ray Serve")
    sub = group.add_subparsers(dest="serve_command", required=True, metavar="SERVE_COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="Ray Serve config file (default: serve/config.yaml)")
        p.add_argument(
            "--model", help="MLflow model URI (models:/medplib@champion), model directory or preset"
        )
        p.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field (repeatable), e.g. deployment.ray_actor_options.num_gpus=1",
        )

    run = sub.add_parser(
        "run",
        help="start the application on a local Ray (or the cluster in $RAY_ADDRESS) and print its URL",
        description="Starts Ray Serve with HTTP on 127.0.0.1 and blocks until Ctrl-C, which shuts Serve down. "
        "The API key, if any, is read from $MEDPLIB_API_KEY (args.api_key_env) by the replicas.",
    )
    common(run)
    run.set_defaults(handler=_run)
    show = sub.add_parser("config", help="print the resolved Ray Serve config (YAML) for `serve deploy`")
    common(show)
    show.set_defaults(handler=_config)


def _resolve(args: argparse.Namespace):  # -> serve.config.ServeConfig
    from serve.config import DEFAULT_CONFIG, ServeConfig, parse_override

    cfg = ServeConfig.from_yaml(args.config or DEFAULT_CONFIG)
    updates = dict(parse_override(text) for text in args.set)
    if args.model:
        updates["args.model"] = args.model
    if args.port is not None:
        updates["http.port"] = args.port
    return cfg.override(updates) if updates else cfg


def _config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_resolve(args).to_serve_dict(), sort_keys=False), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    from serve.app import run, wait_then_shutdown
    from workflows.common import init_ray

    cfg = _resolve(args)
    init_ray()
    log.info("starting %s (model %s) on %s:%d", cfg.name, cfg.args.model, cfg.http.host, cfg.http.port)
    url = run(cfg)
    print(
        f"MedPLIB is serving at {url}  (OpenAI base_url: {url}/v1, docs: {url}/docs); Ctrl-C stops it",
        flush=True,
    )
    wait_then_shutdown()
    return 0
