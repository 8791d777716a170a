"""`medplib infra render`: write the KubeRay RayJob and RayService manifests from their sources of truth.

    medplib infra render            # rewrites infra/kuberay/rayjob.yaml and rayservice.yaml (same as `make infra`)
    medplib infra render --check    # exits 1 and names the stale file when a committed manifest differs

Nothing in the two generated files is written by hand:

* `infra/kuberay/raycluster.yaml` is the cluster shape (head, GPU worker group, env, volumes, security). Its
  `spec` becomes the RayJob's `rayClusterSpec` and the RayService's `rayClusterConfig`.
* `serve/config.gpu.yaml` is the Serve application (validated by `serve.config.ServeConfig`). It becomes the
  RayService's `serveConfigV2`, with the two settings a pod network needs: the proxy listens on 0.0.0.0 and runs
  on every node with a replica, since the Kubernetes Service in front of it is the gateway, not loopback.
* `infra/image.env` names the image every container runs.

The RayJob's entrypoint and runtime environment are the constants below, so this file is where to change them.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("medplib")

RAY_API_VERSION = "ray.io/v1"
NAMESPACE = "medplib"
# The pipeline config the RayJob runs: its path in the repository and inside the image (Dockerfile WORKDIR).
PIPELINE_CONFIG = "configs/pipeline/cluster.yaml"
IMAGE_PROJECT_DIR = "/home/ray/medplib"
JOB_RUNTIME_ENV: dict[str, Any] = {
    "env_vars": {
        "HF_HUB_OFFLINE": "1",  # weights come from the image's packages; nothing is fetched at run time
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    },
}
# Settings of the Serve config that differ on Kubernetes (see the module docstring).
SERVE_ON_KUBERNETES = {"http.host": "0.0.0.0", "proxy_location": "EveryNode"}


# --- sources ----------------------------------------------------------------------------------------------------
def read_image_env(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines of infra/image.env (comments and blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"image definition {path} not found")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        values[key.strip()] = value.strip().strip('"')
    if "MEDPLIB_IMAGE" not in values:
        raise ValueError(f"{path}: MEDPLIB_IMAGE is not defined")
    return values


def _read_cluster(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"RayCluster manifest {path} not found")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "RayCluster":
        raise ValueError(f"{path}: expected one RayCluster document")
    spec = doc.get("spec")
    if not isinstance(spec, dict) or "headGroupSpec" not in spec:
        raise ValueError(f"{path}: spec.headGroupSpec is missing")
    return doc


def _cluster_spec(cluster: dict[str, Any], image: str) -> dict[str, Any]:
    """The RayCluster's spec with every Ray container on `image`."""
    spec = copy.deepcopy(cluster["spec"])
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            container["image"] = image
    return spec


# --- manifests --------------------------------------------------------------------------------------------------
def serve_config_v2(serve_config: Path) -> str:
    """The Serve config file, validated, with the Kubernetes settings applied, as YAML text."""
    from serve.config import ServeConfig

    cfg = ServeConfig.from_yaml(serve_config).override(SERVE_ON_KUBERNETES)
    return yaml.safe_dump(cfg.to_serve_dict(), sort_keys=False, width=110)


def _pipeline_workers(pipeline_config: Path) -> int:
    """`num_workers` of the pipeline config (one GPU pod each)."""
    if not pipeline_config.is_file():
        raise FileNotFoundError(f"pipeline config {pipeline_config} not found")
    workers = (yaml.safe_load(pipeline_config.read_text()) or {}).get("num_workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{pipeline_config}: num_workers must be a positive integer, got {workers!r}")
    return workers


def rayjob_manifest(cluster: dict[str, Any], image: str, pipeline_config: Path) -> dict[str, Any]:
    spec = _cluster_spec(cluster, image)
    # The Train workers' GPU pods start with the cluster, before the driver: the pipeline checks for GPUs when it
    # starts (use_gpu), and KubeRay submits the job once every pod is up.
    workers = _pipeline_workers(pipeline_config)
    for group in spec.get("workerGroupSpecs", []):
        if group.get("groupName") == "gpu":
            group["replicas"] = group["minReplicas"] = max(workers, group.get("minReplicas", 0))
            group["maxReplicas"] = max(group["minReplicas"], group.get("maxReplicas", 0))
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": "medplib-pipeline",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "medplib", "app.kubernetes.io/component": "pipeline"},
        },
        "spec": {
            # One command, no shell operators: KubeRay's submitter would run anything after `&&` or `;` itself.
            "entrypoint": f"medplib pipeline run --config {IMAGE_PROJECT_DIR}/{PIPELINE_CONFIG}",
            "runtimeEnvYAML": yaml.safe_dump(JOB_RUNTIME_ENV, sort_keys=False),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,  # the cluster is deleted when the job ends ...
            "ttlSecondsAfterFinished": 600,  # ... 10 minutes later, time to read `ray job logs`
            "activeDeadlineSeconds": 172800,  # give up after two days
            "backoffLimit": 1,  # one retry on a new cluster: the stages resume from their checkpoints
            "rayClusterSpec": spec,
        },
    }


def rayservice_manifest(cluster: dict[str, Any], image: str, serve_config: Path) -> dict[str, Any]:
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": {
            "name": "medplib-serve",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "medplib", "app.kubernetes.io/component": "serve"},
        },
        "spec": {
            "serveConfigV2": serve_config_v2(serve_config),
            "rayClusterConfig": _cluster_spec(cluster, image),
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as `|` blocks, the way people write them by hand."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _document(manifest: dict[str, Any], header: str) -> str:
    return header + yaml.dump(
        manifest, Dumper=_BlockDumper, sort_keys=False, width=110, default_flow_style=False
    )


def render(root: Path, serve_config: str = "serve/config.gpu.yaml") -> dict[Path, str]:
    """The generated files' paths (under `root`) and their text."""
    image = read_image_env(root / "infra" / "image.env")["MEDPLIB_IMAGE"]
    cluster = _read_cluster(root / "infra" / "kuberay" / "raycluster.yaml")

    def header(sources: str, what: str) -> str:
        return (
            "# GENERATED by `medplib infra render` (make infra): edit the sources, then render; tests/test_infra.py\n"
            f"# fails while this file is stale. Sources: {sources}.\n" + what
        )

    job_header = header(
        f"infra/kuberay/raycluster.yaml, {PIPELINE_CONFIG}, infra/image.env and workflows/infra.py",
        "# The MedPLIB pipeline (data prepare -> vl -> grounding -> moe -> eval -> register in MLflow) as a KubeRay\n"
        "# RayJob on a cluster of its own, deleted after the job. Run: kubectl apply -f infra/kuberay/rayjob.yaml\n",
    )
    service_header = header(
        f"{serve_config}, infra/kuberay/raycluster.yaml and infra/image.env",
        "# The served model (models:/medplib@champion, from MLflow) as a KubeRay RayService; clients reach it at\n"
        "# Service medplib-serve-serve-svc, port 8000. Run: kubectl apply -f infra/kuberay/rayservice.yaml\n",
    )
    out = root / "infra" / "kuberay"
    return {
        out / "rayjob.yaml": _document(rayjob_manifest(cluster, image, root / PIPELINE_CONFIG), job_header),
        out / "rayservice.yaml": _document(
            rayservice_manifest(cluster, image, root / serve_config), service_header
        ),
    }


def default_root() -> Path:
    """This checkout when the package runs from one, else the current directory."""
    repo = Path(__file__).resolve().parents[1]
    return repo if (repo / "infra").is_dir() else Path.cwd()


def update_manifests(
    root: Path, serve_config: str = "serve/config.gpu.yaml", check: bool = False
) -> dict[Path, str]:
    """Write the rendered manifests that differ from the files under `root` (none with `check`); returns the
    stale ones (before writing) with a unified diff of each."""
    stale = {}
    for path, text in render(root, serve_config).items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            log.info("%s is up to date", path.relative_to(root))
            continue
        stale[path] = "".join(
            list(
                difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(path), "rendered")
            )[:60]
        )
        if not check:
            path.write_text(text)
            log.info("wrote %s", path.relative_to(root))
    return stale
