"""slimlm's server as a Ray Serve deployment: the same FastAPI app per replica, scaled by Ray on ongoing requests.

Each replica is one Ray actor that builds a `ServerState` (model + engine + adapters + registry) and serves slimlm's
own `create_app(state)` behind Ray's HTTP proxy, so the routes, the `base:adapter@version` model names, the errors,
the API keys and /metrics (per replica) are those of `slimlm serve`. Ray does the rest: it starts and stops replicas
between `min_replicas` and `max_replicas` to keep about `target_ongoing_requests` requests per replica
(`min_replicas=0` scales to zero: the first request after idle waits at the proxy while a replica starts), restarts
replicas that die or fail their health check, and routes requests that carry the `serve_multiplexed_model_id`
header to a replica that served that adapter recently (Ray's model multiplexing; the header must equal the body's
`model` field, e.g. `tiny:support@prod`; the proxy routes before it reads the body, so clients send it).

What this module is not: a cluster manager (Ray is), nor a second server (the replica runs slimlm's app unchanged).
`ray` is imported only here, lazily, so slimlm works without it (`pip install "ray[serve]"`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import InputError
from slimlm.serve.state import ServeConfig

MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray's header name (ray.serve._private.constants)


@dataclass
class RayServeConfig:
    """How Ray Serve runs the replicas: their number, when to scale, and each replica's CPU share."""

    name: str = "slimlm"  # the Ray Serve application (and deployment) name
    route_prefix: str = "/"
    min_replicas: int = 1  # 0 = scale to zero when idle
    max_replicas: int = 2
    initial_replicas: int | None = None  # replicas started at deploy time; None: min_replicas
    target_ongoing_requests: float = 4.0  # per replica; above it Ray adds replicas, below it removes them
    max_ongoing_requests: int = 0  # per replica, beyond it requests wait at the proxy; 0 = the engine's batch size
    upscale_delay_s: float = 30.0  # how long the load must stay high before a replica is added
    downscale_delay_s: float = 600.0  # ... and low before one is removed
    downscale_to_zero_delay_s: float | None = None  # the last replica (min_replicas 0); None: downscale_delay_s
    look_back_period_s: float = 30.0  # window the ongoing-request counts are averaged over
    metrics_interval_s: float = 10.0  # how often replicas report them (Ray's default; tests shorten it)
    num_cpus: float = 1.0  # Ray CPUs reserved per replica (2 replicas on a 2-core machine: 1 each)
    torch_threads: int = 0  # torch threads per replica; 0 = max(1, int(num_cpus)), so replicas do not oversubscribe
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0  # running requests' time to finish when Ray stops a replica
    host: str = "127.0.0.1"  # Ray's HTTP proxy
    port: int = 8000

    def validate(self) -> None:
        """Raise ValueError listing every bad field (with the flag to fix) before Ray is touched."""
        errors = []
        if self.min_replicas < 0:
            errors.append(f"--min-replicas {self.min_replicas}: send 0 (scale to zero) or more")
        if self.max_replicas < max(1, self.min_replicas):
            errors.append(
                f"--max-replicas {self.max_replicas}: must be >= 1 and >= --min-replicas ({self.min_replicas})"
            )
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            errors.append(f"initial_replicas {self.initial_replicas}: must lie in --min-replicas..--max-replicas")
        if self.target_ongoing_requests <= 0:
            errors.append(f"--target-ongoing-requests {self.target_ongoing_requests}: must be > 0")
        if self.max_ongoing_requests < 0:
            errors.append(
                f"--max-ongoing-requests {self.max_ongoing_requests}: must be >= 1, or 0 for the engine's batch size"
            )
        if min(self.upscale_delay_s, self.downscale_delay_s, self.downscale_to_zero_delay_s or 0) < 0:
            errors.append("--upscale-delay and --downscale-delay must be >= 0 seconds")
        if self.metrics_interval_s <= 0 or self.look_back_period_s <= self.metrics_interval_s:
            errors.append(
                f"look_back_period_s ({self.look_back_period_s}) must be > metrics_interval_s "
                f"({self.metrics_interval_s}) > 0"
            )
        if self.graceful_shutdown_timeout_s < 0:
            errors.append(f"--drain-timeout {self.graceful_shutdown_timeout_s}: must be >= 0 seconds")
        if self.num_cpus <= 0 or self.torch_threads < 0:
            errors.append(f"--cpu {self.num_cpus} must be > 0 and torch_threads {self.torch_threads} >= 0")
        if not self.route_prefix.startswith("/"):
            errors.append(f"route_prefix {self.route_prefix!r}: must start with '/'")
        if not 0 < self.port <= 65535:
            errors.append(f"--port {self.port}: send a port in 1..65535")
        if errors:
            raise InputError("; ".join(errors))

    def autoscaling_config(self) -> dict:
        """Ray Serve's `autoscaling_config` (its field names; Ray validates them again)."""
        out = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        if self.downscale_to_zero_delay_s is not None:
            out["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.metrics_interval_s != 10.0:  # only when changed: Ray warns that the field is deprecated
            out["metrics_interval_s"] = self.metrics_interval_s
        return out

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def deployment_options(self, serve_config: ServeConfig) -> dict:
        """`serve.deployment(...)` options: autoscaling, concurrency per replica, CPUs and health checks."""
        # Default concurrency = the engine's decode slots: more would only wait in the replica's queue, where no
        # other replica can take them; fewer would leave slots idle. 0 (auto) slots: 16, the CPU default.
        max_ongoing = self.max_ongoing_requests or serve_config.engine.max_batch or 16
        return {
            "name": self.name,
            "autoscaling_config": self.autoscaling_config(),
            "max_ongoing_requests": max_ongoing,
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }


def _import_serve():
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(f"Ray Serve is not installed ({e}): pip install 'ray[serve]'") from None
    return serve


def replica_class(max_adapters: int):
    """The Ray Serve ingress class: one slimlm server (ServerState + create_app) per replica.

    `max_adapters` is how many adapter ids a replica advertises to Ray's multiplexing router (its LRU of recently
    used adapters; the engine's own LoRA slots, --max-loras, are managed by the engine)."""
    serve = _import_serve()

    @serve.ingress()  # no app yet: Ray calls __serve_build_asgi_app__ on the replica, after __init__
    class SlimlmReplica:
        def __init__(self, config: dict, torch_threads: int):
            import torch

            from slimlm.serve.state import ServerState

            # Ray sets OMP_NUM_THREADS from num_cpus, but torch may already have read the machine's core count.
            torch.set_num_threads(torch_threads)
            self.state = ServerState(config_from_dict(config))
            self.state.load()  # in the constructor: a replica counts as started only once its engine runs

        def __serve_build_asgi_app__(self):
            from slimlm.serve.api import create_app

            return _ReplicaASGI(create_app(self.state), self.adapter)

        def check_health(self) -> None:
            """Ray restarts a replica whose health check raises: the engine must be loaded and its thread alive."""
            if not self.state.ready:
                raise RuntimeError(self.state.not_ready_reason())
            # The resident bases' engine loops: a dead one decodes nothing any more (an unloaded base has none).
            if not all(engine.alive for engine in self.state.engines()):
                raise RuntimeError("an engine thread has stopped")

        @serve.multiplexed(max_num_models_per_replica=max(1, max_adapters))
        async def adapter(self, model_id: str):
            """Resolve `model_id` (`base:adapter@version`) once per replica, so Ray's router learns that this
            replica serves it; the engine loads the weights on first use. APIError for an unknown name."""
            return self.state.resolve_adapter(model_id)

    return SlimlmReplica


class _ReplicaASGI:
    """ASGI wrapper around slimlm's app on a replica, for two things Ray does differently from uvicorn.

    - Under a route prefix Ray passes the full path ("/PREFIX/v1/...") with root_path "/PREFIX"; slimlm's app
      checks API keys by path ("/v1/..."), so the prefix is cut off here (else a prefixed route would skip the key).
    - A request that carries Ray's multiplexing header registers its adapter with Ray's router (`register`).
      Errors are left to the app: an unknown name still gets slimlm's own 404 from the body's `model` field.
    """

    def __init__(self, app, register):
        self.app, self.register = app, register

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            root = scope.get("root_path", "").rstrip("/")
            if root and scope["path"].startswith(root + "/"):
                scope = {**scope, "path": scope["path"][len(root) :], "root_path": ""}
                scope["raw_path"] = scope["path"].encode()
            model_id = _import_serve().get_multiplexed_model_id()
            if model_id:
                try:
                    await self.register(model_id)
                except Exception:  # noqa: BLE001 - the request itself answers with the precise error
                    pass
        await self.app(scope, receive, send)


def build_app(serve_config: ServeConfig, ray_config: RayServeConfig):
    """The bound Ray Serve application (pass it to `serve.run`), after validating both configs."""
    serve_config.validate()
    ray_config.validate()
    serve = _import_serve()
    cls = replica_class(serve_config.engine.max_loras)
    deployment = serve.deployment(cls, **ray_config.deployment_options(serve_config))
    return deployment.bind(dataclasses.asdict(serve_config), ray_config.threads())


def config_from_dict(d: dict) -> ServeConfig:
    """The ServeConfig that dataclasses.asdict wrote. The replica gets plain data rather than a pickled
    ServeConfig, so a driver and a cluster with different slimlm versions fail with a message naming the field."""
    from slimlm.engine.core import EngineConfig

    fields = {f.name for f in dataclasses.fields(ServeConfig)} | {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted((set(d) | set(d.get("engine", {}))) - fields)
    if unknown:
        raise InputError(
            f"serve config fields {unknown} are unknown to this slimlm: install the driver's version "
            "of slimlm on the Ray workers"
        )
    return ServeConfig(**{**d, "engine": EngineConfig(**d.get("engine", {}))})


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """`config` with its local paths made absolute: replicas run in other processes (other working directories,
    other machines), so a relative path would not name the same file there. Aliases and hub ids stay as they are."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    def adapter(item: str) -> str:
        name, sep, folder = item.rpartition("=") if "=" in item else ("", "", item)
        return f"{name}{sep}{absolute(folder)}"

    return dataclasses.replace(
        config,
        model=absolute(config.model),
        served_name=config.name(),
        draft_model=absolute(config.draft_model),
        adapters=[adapter(a) for a in config.adapters],
        registry=absolute(config.registry),
        api_key_file=absolute(config.api_key_file),
        admin_key_file=absolute(config.admin_key_file),
        lora_roots=[absolute(r) for r in config.lora_roots],
    )


def start_ray(address: str | None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Connect to the Ray cluster at `address` ("auto": the local one `ray start` made), or start a local
    loopback instance (address None) with `num_cpus` CPUs and no dashboard."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)


def run(serve_config: ServeConfig, ray_config: RayServeConfig) -> str:
    """Deploy on the connected Ray instance (start_ray first); returns the base URL of Ray's HTTP proxy once the
    application is running (with min_replicas 0: at once, no replica started)."""
    app = build_app(absolute_paths(serve_config), ray_config)
    serve = _import_serve()
    serve.start(http_options={"host": ray_config.host, "port": ray_config.port})
    serve.run(app, name=ray_config.name, route_prefix=ray_config.route_prefix, blocking=False)
    return f"http://{ray_config.host}:{ray_config.port}{ray_config.route_prefix.rstrip('/')}"


def replica_counts(name: str = "slimlm") -> dict[str, int]:
    """{replica state: count} of the application `name`'s deployment, e.g. {"RUNNING": 2}."""
    serve = _import_serve()
    app = serve.status().applications.get(name)
    if app is None or name not in app.deployments:
        return {}
    return {getattr(k, "value", k): v for k, v in app.deployments[name].replica_states.items()}
