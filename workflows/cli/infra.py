"""`medplib infra render [--check]`: the KubeRay manifests from their sources (see workflows/infra.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from workflows import infra

log = logging.getLogger("medplib")


def add_infra(commands: argparse._SubParsersAction, verb: str) -> None:
    group = commands.add_parser(verb, help="generate the KubeRay manifests from their sources")
    sub = group.add_subparsers(dest="infra_command", required=True, metavar="INFRA_COMMAND")
    render = sub.add_parser(
        "render",
        help="write infra/kuberay/rayjob.yaml and rayservice.yaml from raycluster.yaml, serve/config.gpu.yaml "
        "and infra/image.env",
        description=infra.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    render.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")
    render.add_argument(
        "--serve-config", default="serve/config.gpu.yaml", help="Serve config, relative to --root"
    )
    render.add_argument("--check", action="store_true", help="write nothing; exit 1 if a manifest is stale")
    render.set_defaults(handler=_render)


def _render(args: argparse.Namespace) -> int:
    root = (args.root or infra.default_root()).resolve()
    stale = infra.update_manifests(root, args.serve_config, check=args.check)
    if stale and args.check:
        print("".join(stale.values()), end="")
        log.error(
            "stale: %s; run `medplib infra render` (make infra)",
            ", ".join(str(p.relative_to(root)) for p in stale),
        )
        return 1
    return 0
