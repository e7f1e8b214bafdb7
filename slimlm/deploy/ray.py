"""`slimlm deploy ray`: a Ray Serve config file for slimlm's Ray Serve deployment, or the deployment run now.

The file (`serve_config.yaml`) is Ray's own format: `serve deploy serve_config.yaml` puts it on a running Ray
cluster, `serve run serve_config.yaml` on a local one. Its `import_path` is slimlm.serve.cli:ray_app_builder and
its `args` carry the `slimlm serve` flags; the `deployments` section holds the Ray knobs (autoscaling, concurrency,
CPUs), under Ray's names, so they can be edited there without slimlm. `--run` deploys at once instead (on a local
loopback Ray instance, or the cluster at --ray-address) and keeps it up until Ctrl-C.

What this module is not: a Ray cluster launcher. Nothing here starts machines; the workers need slimlm and
`ray[serve]` installed and the model at the same path (or an alias / hub id they can download).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from slimlm.checkpoint.atomic import atomic_folder, check_output
from slimlm.deploy.config import SECRET_SERVE_FLAGS, DeployError, parse_serve_args

if TYPE_CHECKING:  # the serving stack (torch) is imported only when `deploy ray` runs, not to build the CLI
    from slimlm.serve.ray_serve import RayServeConfig
    from slimlm.serve.state import ServeConfig

IMPORT_PATH = "slimlm.serve.cli:ray_app_builder"
CONFIG_FILE = "serve_config.yaml"


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """The flags only `deploy ray` reads (the shared ones — --model, --serve-args, --min/max-replicas,
    --scale-target, --cpu, --port, --name, --drain-timeout — mean the same as for the other targets)."""
    p.add_argument(
        "--run",
        action="store_true",
        help="ray: deploy now; on a local Ray instance (no --ray-address) it serves until Ctrl-C, on a "
        "cluster the application stays up after the command returns (`serve shutdown` removes it)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="ray --run: the cluster to deploy on ('auto': the one `ray start` made here); default: start "
        "a local loopback instance",
    )
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="ray --run, local instance: CPUs it may use (default: all the machine's)",
    )
    p.add_argument("--host", default="127.0.0.1", help="ray: the address Ray's HTTP proxy listens on")
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=0,
        help="ray: requests one replica runs at once, the rest wait at Ray's proxy (default: the engine's --max-batch)",
    )
    p.add_argument("--upscale-delay", type=float, default=30.0, help="ray: seconds of high load before scaling up")
    p.add_argument(
        "--downscale-delay",
        type=float,
        default=600.0,
        help="ray: seconds of low load before scaling down (and to zero with --min-replicas 0)",
    )


def ray_config(args: argparse.Namespace) -> RayServeConfig:
    """The validated RayServeConfig of the parsed `deploy` flags (ValueError, one line, naming the flags)."""
    from slimlm.serve.ray_serve import RayServeConfig

    cfg = RayServeConfig(
        name=args.name,
        min_replicas=1 if args.min_replicas is None else args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.scale_target,
        max_ongoing_requests=args.max_ongoing_requests,
        upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay,
        num_cpus=cpus(args.cpu or "1"),
        graceful_shutdown_timeout_s=args.drain_timeout,
        host=args.host,
        port=args.port or 8000,
    )
    cfg.validate()
    return cfg


def cpus(text: str) -> float:
    """--cpu as Ray's CPU count: "2" -> 2.0, "500m" -> 0.5 (the Kubernetes notation the other targets take)."""
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise DeployError(f"--cpu {text!r}: send a number of CPUs per replica, e.g. 1 or 500m") from None


def serve_flags(args: argparse.Namespace) -> list[str]:
    """`slimlm serve` flags for the replicas: --model and --serve-args (no secrets: keys come from the
    environment, SLIMLM_API_KEY, set on the Ray workers)."""
    extra = parse_serve_args(args.serve_args)
    secret = [a for a in extra if a.split("=")[0] in SECRET_SERVE_FLAGS]
    if secret:
        raise DeployError(
            f"--serve-args {secret[0]}: keys would be written into the file; set SLIMLM_API_KEY in "
            "the Ray workers' environment instead"
        )
    if "--model" in extra or any(a.startswith("--model=") for a in extra):
        raise DeployError("--serve-args --model: pass the model as deploy's own --model")
    return ["--model", args.model, *extra]


def serve_config_doc(serve: ServeConfig, ray: RayServeConfig) -> dict:
    """Ray Serve's config file (ServeDeploySchema) for one slimlm application. The serve settings are written
    field by field (local paths absolute) and without API keys: the replicas read SLIMLM_API_KEY."""
    options = ray.deployment_options(serve)
    deployment = {"name": options.pop("name"), **options}
    settings = {**dataclasses.asdict(serve), "api_keys": []}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": ray.host, "port": ray.port},
        "applications": [
            {
                "name": ray.name,
                "route_prefix": ray.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"serve": settings, "ray": {"name": ray.name, "torch_threads": ray.threads()}},
                "deployments": [deployment],
            }
        ],
    }


def readme(ray: RayServeConfig, doc: dict) -> str:
    """README.md: what the file is, that nothing was started, and the commands that start it."""
    a = doc["applications"][0]
    floor = (
        "scale to zero when idle: the first request then waits while a replica loads"
        if ray.min_replicas == 0
        else "never fewer than min_replicas"
    )
    return "\n".join(
        [
            f"# slimlm on Ray Serve: `{a['args']['serve']['model']}`",
            "",
            f"`{CONFIG_FILE}` is a Ray Serve config file. Nothing was started by `slimlm deploy ray`.",
            "",
            f"- on a running Ray cluster (`ray start --head` here): `serve deploy {CONFIG_FILE}`",
            f"- on a local Ray instance, in the foreground: `serve run {CONFIG_FILE}`",
            f"- then: `serve status`; the OpenAI API is at http://{ray.host}:{ray.port}{ray.route_prefix.rstrip('/')}/v1",
            "",
            f"Replicas scale between {ray.min_replicas} and {ray.max_replicas} to keep about "
            f"{ray.target_ongoing_requests:g} requests running on each ({floor}). The `deployments` section uses "
            "Ray's own field names and takes precedence over the app's code.",
            "",
            "Every Ray worker needs slimlm and `ray[serve]` installed, and the model and adapter folders at the "
            "paths written here (or an alias / hub id it can download). API keys: set SLIMLM_API_KEY in the "
            "workers' environment (e.g. `ray start` in a shell that exports it); no key is written here.",
            "",
            "Adapter-aware routing: send the header `serve_multiplexed_model_id: <the request's model>` (e.g. "
            "`tiny:support@prod`; openai client: `default_headers=`) and Ray routes the request to a replica that "
            "served that adapter recently.",
            "",
        ]
    )


def cmd_deploy_ray(args: argparse.Namespace) -> int:
    """`slimlm deploy ray`: write serve_config.yaml into --out, and/or (--run) deploy it now."""
    from slimlm.serve.cli import serve_config_from_flags
    from slimlm.serve.ray_serve import absolute_paths

    ray = ray_config(args)
    flags = serve_flags(args)
    # Parsed by `slimlm serve`'s own parser: a typo in --serve-args fails here, before anything is written.
    serve = absolute_paths(serve_config_from_flags(flags))  # the replicas' working directory is not ours
    if args.out is None and not args.run:
        raise DeployError("deploy ray needs --out DIR (to write the Ray Serve config) or --run (to deploy now)")
    if args.out is not None:
        out = check_output(args.out, overwrite=args.overwrite, inputs=[args.model])
        doc = serve_config_doc(serve, ray)
        with atomic_folder(out) as tmp:
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(doc, sort_keys=False, width=120), encoding="utf-8")
            (tmp / "README.md").write_text(readme(ray, doc), encoding="utf-8")
        print(f"wrote {out}: {CONFIG_FILE}, README.md (deploy with: serve deploy {Path(out) / CONFIG_FILE})")
    if args.run:
        from slimlm.serve.ray_serve import run, start_ray

        start_ray(args.ray_address, num_cpus=args.ray_cpus)
        url = run(serve, ray)
        print(f"serving on Ray: {url}/v1 (Ctrl-C stops it)", flush=True)
        if not args.ray_address:  # our own local instance: keep it up until interrupted
            run_until_interrupted(ray.name)
    return 0


def run_until_interrupted(name: str) -> None:
    import signal
    import threading

    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(name)
    serve.shutdown()
