"""`ServeConfig`: the serving settings, read from a file that is also a valid Ray Serve config file.

`serve/config.yaml` is what `serve run serve/config.yaml`, `serve deploy serve/config.yaml` and
`medplib serve run --config serve/config.yaml` all take. Its one application's `args` are `AppArgs` (the model and
the request limits; Serve passes them to `serve.app:build_app`), its one `deployments` entry is
`DeploymentOptions` (replicas, autoscaling, resources) and `http_options` is `HTTPOptions`. Every field is
validated here before Ray sees it, so a typo fails with the field's name instead of a replica crash loop.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from medplib.data.reading import ReadLimits

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
GPU_CONFIG = Path(__file__).with_name("config.gpu.yaml")
DEPLOYMENT_NAME = "MedPLIB"
# Ray Serve averages replica metrics that are pushed every 10 s; a window no longer than that only warns today
# and will be an error in a later Ray.
_METRICS_PUSH_INTERVAL_S = 10.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Limits(_Strict):
    """What one request may ask for. A request over a limit gets a 4xx that names the field and the limit."""

    max_request_bytes: PositiveInt = Field(
        20 * 1024 * 1024,
        description="largest HTTP body accepted (413 above it); base64 adds a third to images",
    )
    max_json_values: PositiveInt = Field(
        1_000_000,
        description="most JSON values (arrays, objects, list items) in a body (413 above it): parsed JSON takes "
        "up to ~70 bytes a value, so this bounds a body's memory however it is nested",
    )
    max_image_pixels: PositiveInt = Field(
        4096 * 4096, description="largest decoded image, height x width (413 above it)"
    )
    max_mask_runs: PositiveInt = Field(
        1_000_000,
        description="most run lengths in one RLE mask prompt (413 above it); a drawn region has a few per column",
    )
    max_volume_bytes: PositiveInt = Field(
        128 * 1024 * 1024,
        description="largest voxel data of a NIfTI, DICOM series or multi-frame DICOM as its header declares "
        "(413 above it, before anything is inflated or decoded)",
    )
    max_volume_files: PositiveInt = Field(
        2048, description="most files in a zipped DICOM series (413 above it)"
    )
    max_volume_slices: PositiveInt = Field(1024, description="most slices along the axis a volume job reads")
    max_volume_jobs: PositiveInt = Field(
        2,
        description="volume jobs running at once per replica (503 above it); each reads its slices in batches",
    )
    max_regions: PositiveInt | None = Field(
        None, description="region prompts per request; None = the model's own `region.max_regions`"
    )
    max_tokens: PositiveInt = Field(512, description="largest `max_tokens` a request may ask for")
    default_max_tokens: PositiveInt = Field(64, description="`max_tokens` when a request does not say")
    request_timeout_s: PositiveFloat = Field(
        60.0, description="a request still waiting for the model after this gets 504"
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Limits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} exceeds max_tokens {self.max_tokens}"
            )
        return self

    def read_limits(self) -> ReadLimits:
        """What the image readers may decode for one request."""
        return ReadLimits(
            max_pixels=self.max_image_pixels,
            max_volume_bytes=self.max_volume_bytes,
            max_files=self.max_volume_files,
        )


class Batching(_Strict):
    """`@serve.batch`: concurrent requests on one replica are generated together in one `Predictor.run` pass.

    Requests that differ in `max_tokens`, `temperature` or `segment` share a batch slot but run as separate
    passes. `max_batch_size: 1` turns batching off.
    """

    max_batch_size: PositiveInt = Field(16, description="most requests in one generation pass")
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="how long a batch waits for company; only while more requests are being parsed",
    )


class AppArgs(_Strict):
    """The application's `args`: Serve passes them to `serve.app:build_app`, which hands them to each replica."""

    model: str = Field(
        "tiny", description="MLflow model URI (models:/medplib@champion), model directory, or preset name"
    )
    model_name: str | None = Field(
        None, description="the id `/v1/models` lists and responses carry; default: derived from `model`"
    )
    device: str = Field(
        "auto", description="'auto' (cuda when the replica has a GPU), 'cpu', 'cuda', 'cuda:1'"
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="None = the model's configured dtype"
    )
    torch_threads: PositiveInt | None = Field(
        None, description="intra-op threads per replica; None = max(1, num_cpus) of the replica"
    )
    api_key_env: str | None = Field(
        "MEDPLIB_API_KEY",
        description="environment variable holding the API key; when it is set and non-empty in the replica, every "
        "/v1 request needs `Authorization: Bearer <key>`. The key itself never goes in this file.",
    )
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    health_probe_interval_s: PositiveFloat = Field(
        30.0, description="check_health runs a one-token probe when no request succeeded for this long"
    )

    def served_name(self) -> str:
        """The model id shown to clients."""
        if self.model_name:
            return self.model_name
        source = self.model.rstrip("/")
        if source.startswith("models:/"):
            return source.removeprefix("models:/")
        return f"medplib-{Path(source).name}" if "/" not in source else Path(source).name


class AutoscalingSettings(_Strict):
    """Ray Serve's `autoscaling_config`, with defaults for a batching model server.

    `target_ongoing_requests` is per replica and counts queued requests too; with batching a replica works best
    with a batch's worth in flight, so the target sits near `max_batch_size / 2` rather than Ray's default 2.
    """

    min_replicas: int = Field(1, ge=0, description="0 allows scale to zero (a cold start of 10-60 s then)")
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: PositiveInt = 2
    target_ongoing_requests: PositiveFloat = 8.0
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: PositiveFloat = Field(
        15.0, description="window the load is averaged over; must exceed Ray's 10 s metrics push interval"
    )

    @field_validator("look_back_period_s")
    @classmethod
    def _longer_than_push_interval(cls, v: float) -> float:
        if v <= _METRICS_PUSH_INTERVAL_S:
            raise ValueError(
                f"look_back_period_s must be > {_METRICS_PUSH_INTERVAL_S:g} (Ray's metrics push interval), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        if (
            self.initial_replicas is not None
            and not self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ActorOptions(_Strict):
    """Resources of one replica (`ray_actor_options`). Fractions pack several replicas on one CPU or GPU."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    runtime_env: dict[str, Any] | None = Field(
        None, description="the replica's Ray runtime env (e.g. env_vars) on top of the application's"
    )


class DeploymentOptions(_Strict):
    """The one entry of the application's `deployments` list."""

    name: Literal["MedPLIB"] = DEPLOYMENT_NAME
    max_ongoing_requests: PositiveInt = Field(
        32, description="requests one replica holds at once (running + waiting for a batch)"
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for a replica before the proxy answers 503; -1 = unbounded"
    )
    autoscaling_config: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    health_check_period_s: PositiveFloat = 10.0
    health_check_timeout_s: PositiveFloat = 30.0
    graceful_shutdown_timeout_s: PositiveFloat = 20.0

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        return self.model_dump(exclude={"name"}, exclude_none=True)


class HTTPOptions(_Strict):
    """Ray Serve's `http_options`. Keep `host` on 127.0.0.1 unless a gateway with TLS sits in front."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    request_timeout_s: PositiveFloat | None = Field(
        None, description="the proxy's own timeout; keep it above `limits.request_timeout_s`"
    )


class ServeConfig(_Strict):
    """One MedPLIB application as Ray Serve runs it (see the module docstring)."""

    name: str = "medplib"
    route_prefix: str = "/"
    import_path: str = "serve.app:build_app"
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="for `serve deploy` to a remote cluster: working_dir as local:// or a URI",
    )
    http: HTTPOptions = Field(default_factory=HTTPOptions)
    args: AppArgs = Field(default_factory=AppArgs)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "HeadOnly"
    logging_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _batches_fit(self) -> ServeConfig:
        if self.args.batching.max_batch_size > self.deployment.max_ongoing_requests:
            raise ValueError(
                f"args.batching.max_batch_size {self.args.batching.max_batch_size} exceeds "
                f"deployment.max_ongoing_requests {self.deployment.max_ongoing_requests}: batches could never fill"
            )
        return self

    # --- Ray Serve's file format -------------------------------------------------------------------------------
    @classmethod
    def from_serve_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ServeConfig:
        """Parse Ray Serve's config-file layout (one application, at most one deployment entry)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping at the top level")
        unknown = set(data) - {
            "proxy_location",
            "http_options",
            "grpc_options",
            "logging_config",
            "applications",
        }
        if unknown:
            raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}")
        apps = data.get("applications") or []
        if len(apps) != 1:
            raise ValueError(f"{source}: expected exactly one entry in 'applications', found {len(apps)}")
        app = dict(apps[0])
        deployments = app.pop("deployments", None) or [{}]
        if len(deployments) != 1:
            raise ValueError(
                f"{source}: expected one entry in applications[0].deployments, found {len(deployments)}"
            )
        fields: dict[str, Any] = {
            "http": data.get("http_options") or {},
            "args": app.pop("args", None) or {},
            "deployment": deployments[0],
        }
        for key in ("proxy_location", "logging_config"):
            if key in data:
                fields[key] = data[key]
        fields.update(app)  # name, route_prefix, import_path, runtime_env; anything else fails validation
        try:
            return cls.model_validate(fields)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_CONFIG) -> ServeConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"serve config {path} not found")
        return cls.from_serve_dict(yaml.safe_load(path.read_text()) or {}, str(path))

    def to_serve_dict(self) -> dict[str, Any]:
        """The Ray Serve config-file layout (`serve deploy` takes it)."""
        app: dict[str, Any] = {
            "name": self.name,
            "route_prefix": self.route_prefix,
            "import_path": self.import_path,
            "args": self.args.model_dump(mode="json"),
            "deployments": [self.deployment.model_dump(mode="json", exclude_none=True)],
        }
        if self.runtime_env:
            app["runtime_env"] = self.runtime_env
        out: dict[str, Any] = {
            "proxy_location": self.proxy_location,
            "http_options": self.http.model_dump(mode="json", exclude_none=True),
            "applications": [app],
        }
        if self.logging_config:
            out["logging_config"] = self.logging_config
        return out

    def override(self, updates: dict[str, Any]) -> ServeConfig:
        """A copy with dotted keys replaced, e.g. `{"args.model": "tiny", "http.port": 8001}`."""
        data = copy.deepcopy(self.model_dump())
        for dotted, value in updates.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ValueError(f"unknown config key {dotted!r}: {key!r} is not a section")
                node = node[key]
            if leaf not in node:
                raise ValueError(f"unknown config key {dotted!r}")
            node[leaf] = value
        return ServeConfig.model_validate(data)


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` (the value parsed as YAML: numbers, booleans, null) -> (key, value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(
            f"--set takes KEY=VALUE (e.g. deployment.autoscaling_config.max_replicas=4), got {text!r}"
        )
    return key.strip(), yaml.safe_load(raw)
