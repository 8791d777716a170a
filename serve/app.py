"""The Ray Serve application: one autoscaling deployment whose replicas each hold a `Predictor` and serve the
FastAPI app of `serve/api.py`.

    serve run serve/config.yaml                        # Ray's CLI, local Ray
    medplib serve run --model models:/medplib@champion # ours: same config file, prints the URL

Ray touch-points, each marked `# Ray:` below:
* `@serve.deployment` with `autoscaling_config`, `max_ongoing_requests`, `ray_actor_options` from `ServeConfig`
  (`build_application` applies them; with `serve deploy` the config file's `deployments` entry does).
* `@serve.ingress()` + `__serve_build_asgi_app__`: the FastAPI app is built inside the replica, around it.
* `@serve.batch`: concurrent requests are queued and handed to `_generate_batch` as one list, which runs them as
  one `Predictor.run` generation pass on a dedicated model thread (the event loop keeps accepting requests, so
  the next batch fills while this one runs). A streamed request (`stream: true`) takes `stream` instead: alone,
  on the same thread, its tokens sent as they are generated.
* `check_health`: Serve calls it every `health_check_period_s`; it raises (and Serve restarts the replica) when
  the model cannot run: after a failed model call, or when no request succeeded for `health_probe_interval_s`, it
  runs a one-token probe.
* a named, detached actor (`VolumeJobStoreActor`) holds the states of volume jobs: the replica that took the
  POST runs the job in a thread (its batches take turns with request batches on the model thread) and reports
  progress to the actor, and a poll on any replica reads it there.
* `ray.serve.metrics`: counters and a latency histogram, tagged with deployment/replica by Serve, on Ray's
  Prometheus endpoint (names start with `ray_medplib_`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve import metrics

from serve.api import create_api
from serve.config import DEPLOYMENT_NAME, AppArgs, ServeConfig
from serve.service import Job, JobResult, LocalJobStore, MedPLIBService

logger = logging.getLogger("ray.serve.medplib")

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class ServeMetrics:
    """Application metrics (Ray adds the deployment, replica and application tags)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "medplib_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "medplib_request_latency_s",
            description="HTTP request latency on the replica (s)",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("route",),
        )
        self.tokens = metrics.Counter("medplib_generated_tokens", description="tokens generated")
        self.masks = metrics.Counter("medplib_masks_returned", description="masks sent back to clients")
        self.errors = metrics.Counter(
            "medplib_errors", description="failed requests by kind", tag_keys=("kind",)
        )
        self.batch_size = metrics.Histogram(
            "medplib_batch_size",
            description="requests per generation pass",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )


VOLUME_JOBS_ACTOR = "medplib-volume-jobs"


# Ray: one named actor per application holds the volume jobs' states, so a poll reaches them from any replica.
@ray.remote(num_cpus=0)
class VolumeJobStoreActor:
    def __init__(self, keep: int = 64) -> None:
        self.store = LocalJobStore(keep)

    def put(self, job_id: str, state: dict[str, Any]) -> None:
        self.store.put(job_id, state)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.store.get(job_id)


class ActorJobStore:
    """`LocalJobStore`'s `put` for the service's job threads, sent to the named actor (calls from one caller
    run in order, so progress never goes backwards)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def put(self, job_id: str, state: dict[str, Any]) -> None:
        self.actor.put.remote(job_id, state)


# Ray: the deployment. Its options here are defaults; `build_application` (or the config file) sets the real ones.
@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class MedPLIBDeployment:
    """One replica: the model, the batch queue, health and metrics; HTTP comes from `serve.api.create_api`."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        num_cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.service = MedPLIBService(self.args, num_cpus=num_cpus)
        # Ray: get_if_exists makes every replica share the first one's actor; detached, so it outlives the
        # replica that created it (a scale-down must not lose the jobs of the others).
        app_name = serve.get_replica_context().app_name
        self.volume_jobs = VolumeJobStoreActor.options(
            name=f"{VOLUME_JOBS_ACTOR}-{app_name}", get_if_exists=True, lifetime="detached"
        ).remote()
        self.service.volume_store = ActorJobStore(self.volume_jobs)
        self.api_key = os.environ.get(self.args.api_key_env or "", "") or None
        self.arriving = 0  # maintained by the API: requests being parsed
        self.metrics = ServeMetrics()
        # Ray: batch size and wait come from the config at run time.
        self._generate_batch.set_max_batch_size(self.args.batching.max_batch_size)
        self.service.probe()  # fail fast (replica restart) if the model cannot run; also warms up
        logger.info(
            "replica ready: %s, batch size %d, API key %s",
            self.service.name,
            self.args.batching.max_batch_size,
            "required" if self.api_key else "off",
        )

    def __serve_build_asgi_app__(self):  # Ray: called after __init__; the app routes to this replica
        return create_api(self)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        # Ray: `jobs` are the requests that arrived together; one list in, one result per job out.
        self.metrics.batch_size.observe(len(jobs))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.service.model_thread, self.service.run_batch, jobs)

    async def generate(self, job: Job) -> JobResult:
        # Ray: a batch waits `batch_wait_timeout_s` for company only when more requests are already being parsed;
        # a lone request starts at once. Under load batches still fill: requests queue while a batch runs.
        wait_s = self.args.batching.batch_wait_timeout_s if self.arriving else 0.0
        self._generate_batch.set_batch_wait_timeout_s(wait_s)
        return await self._generate_batch(job)

    async def stream(self, job: Job, on_text: Callable[[str], None]) -> JobResult:
        # The streaming path, beside the batched one: the job runs alone on the model thread, and each piece of
        # its answer reaches the response while later tokens are still being generated.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.service.model_thread, self.service.run_stream, job, on_text)

    async def check_health(self) -> None:
        # Ray: raising here marks the replica unhealthy; Serve replaces it.
        if not self.service.needs_probe():
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.service.model_thread, self.service.probe)
        except Exception as err:
            logger.error("health probe failed: %s: %s", type(err).__name__, err)
            raise RuntimeError(f"model cannot run: {type(err).__name__}: {err}") from err

    async def volume_job(self, job_id: str) -> dict[str, Any] | None:
        return await self.volume_jobs.get.remote(job_id)  # Ray: an ObjectRef is awaitable

    # --- metrics (called by the API) ---------------------------------------------------------------------------
    def record_request(self, route: str, status: int, latency_s: float) -> None:
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})
        self.metrics.latency.observe(latency_s, tags={"route": route})

    def record_error(self, kind: str) -> None:
        self.metrics.errors.inc(tags={"kind": kind})

    def record_result(self, result: JobResult, masks_returned: int) -> None:
        if result.num_generated_tokens:
            self.metrics.tokens.inc(result.num_generated_tokens)
        if masks_returned:
            self.metrics.masks.inc(masks_returned)


def build_app(args: dict[str, Any]) -> serve.Application:
    """`import_path` target of serve/config.yaml: Serve calls it with the application's `args`.

    Deployment options (replicas, autoscaling, resources) come from the config file's `deployments` entry.
    """
    return build_application(ServeConfig(args=AppArgs.model_validate(args or {})), apply_options=False)


def build_application(cfg: ServeConfig, apply_options: bool = True) -> serve.Application:
    """The application for `cfg`; with `apply_options` its `deployment` settings become the deployment's options."""
    deployment = MedPLIBDeployment
    if apply_options:
        # Ray: autoscaling_config, max_ongoing_requests, ray_actor_options (num_cpus/num_gpus), health checks
        deployment = deployment.options(**cfg.deployment.ray_options())
    return deployment.bind(cfg.args.model_dump(mode="json"))


def run(cfg: ServeConfig) -> str:
    """Deploy `cfg` on the Ray cluster this process is connected to and return the base URL.

    HTTP listens on `cfg.http.host:port`; `serve.run` returns once the replicas are up.
    """
    if not ray.is_initialized():
        # Serve would otherwise call a plain ray.init(), which joins whatever cluster /tmp/ray records.
        raise RuntimeError("connect to Ray first (ray.init); `medplib serve run` does it")
    http: dict[str, Any] = {"host": cfg.http.host, "port": cfg.http.port}
    if cfg.http.request_timeout_s:
        http["request_timeout_s"] = cfg.http.request_timeout_s
    serve.start(
        http_options=http, proxy_location=cfg.proxy_location
    )  # Ray: the HTTP proxy (no-op if running)
    t0 = time.perf_counter()
    serve.run(
        build_application(cfg), name=cfg.name, route_prefix=cfg.route_prefix
    )  # Ray: waits until RUNNING
    prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix
    url = f"http://{cfg.http.host}:{cfg.http.port}{prefix}"
    logger.info("application %r running at %s after %.1f s", cfg.name, url, time.perf_counter() - t0)
    return url


def wait_then_shutdown() -> None:
    """Block until Ctrl-C or SIGTERM, then shut Serve down (a plain exit would leave the app on the cluster)."""

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down Serve")
        serve.shutdown()
        for entry in ray.util.list_named_actors(all_namespaces=True):  # the detached volume job stores
            if entry["name"].startswith(VOLUME_JOBS_ACTOR):
                ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))


def replica_counts(app_name: str) -> dict[str, int]:
    """`{replica state: count}` of the MedPLIB deployment of `app_name`, from `serve.status()`."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    deployment = status.deployments.get(DEPLOYMENT_NAME)
    return {
        str(getattr(k, "value", k)): v for k, v in (deployment.replica_states if deployment else {}).items()
    }
