"""Write one `slimlm deploy` output folder, atomically: the target's files, YAML rendered the same way every time,
and a README.md with the commands to use them.

This module renders and writes; the manifests' content is k8s.py's, kserve.py's and docker.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slimlm.checkpoint.atomic import atomic_folder
from slimlm.deploy import docker
from slimlm.deploy.config import DeployConfig
from slimlm.deploy.k8s import k8s_manifests
from slimlm.deploy.kserve import kserve_manifests
from slimlm.deploy.resources import memory_quantity

NOT_RUN = (
    "Nothing here was built or run by `slimlm deploy`: no image was built, no container started and no "
    "cluster contacted. slimlm's tests check files written this way offline only (Kubernetes OpenAPI "
    "schemas, the KServe CRD schema, hadolint)."
)


def render_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML; key order is the order the manifests were built in, so output is deterministic."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=120, explicit_start=True)


def bundle_files(cfg: DeployConfig) -> dict[str, str]:
    """File name -> text, for the target of `cfg` (model files are staged separately)."""
    if cfg.target == "docker":
        files = {"Dockerfile": docker.dockerfile(cfg), ".dockerignore": docker.dockerignore(cfg)}
    else:
        make = k8s_manifests if cfg.target == "k8s" else kserve_manifests
        files = {name: render_yaml(docs) for name, docs in make(cfg, memory_quantity(cfg)).items()}
    staged = docker.staged_names(cfg) if cfg.target == "docker" else []
    files["README.md"] = readme(cfg, sorted([*files, "README.md", *staged]))
    return files


def write_bundle(cfg: DeployConfig, out: str | Path) -> list[str]:
    """Write the bundle into `out` (replaced whole; the caller ran check_output); returns the top-level names."""
    files = bundle_files(cfg)
    with atomic_folder(out) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if cfg.target == "docker":
            docker.stage_context(cfg, tmp)
        names = sorted(p.name for p in tmp.iterdir())
    return names


def readme(cfg: DeployConfig, names: list[str]) -> str:
    """README.md: what the folder holds, that nothing was run, and the commands to build / apply it."""
    lines = [
        f"# slimlm serve: {cfg.target} deployment of `{cfg.model}`",
        "",
        NOT_RUN,
        "",
        f"Files: {', '.join(f'`{n}`' for n in names)}.",
        "",
        f"The container runs `{' '.join(cfg.serve_command())}`: `/health` answers once the process is up, "
        f"`/ready` once the model is loaded (503 while loading and while draining after SIGTERM, "
        f"--drain-timeout {cfg.drain_timeout:g} s).",
        "",
    ]
    lines += {"docker": _docker_usage, "k8s": _k8s_usage, "kserve": _kserve_usage}[cfg.target](cfg)
    return "\n".join(lines) + "\n"


def _build_hint(cfg: DeployConfig) -> list[str]:
    mount = " --mount" if cfg.mount else ""
    return [
        "Build the image first (the same --model gives the same paths inside it):",
        "",
        "```sh",
        f"slimlm deploy docker --model {cfg.model}{mount} --port {cfg.port} --image {cfg.image} --out image/",
        f"docker build -t {cfg.image} image/ && docker push {cfg.image}",
        "```",
        "",
    ]


def _docker_usage(cfg: DeployConfig) -> list[str]:
    stop = int(cfg.drain_timeout) + 10
    volume = ""
    if cfg.mount:
        local = Path(cfg.model).expanduser()
        host = local.resolve() if local.exists() else "/path/to/model"
        volume = f" -v {host}:{cfg.container_model()}:ro"
    lines = [
        "```sh",
        f"docker build -t {cfg.image} .",
        f"docker run --rm -p {cfg.port}:{cfg.port} --stop-timeout {stop}{volume} -e SLIMLM_API_KEY {cfg.image}",
        f"curl -s localhost:{cfg.port}/ready",
        "```",
        "",
        "`-e SLIMLM_API_KEY` passes the key from your shell's environment (drop it to serve without a key); "
        "no key is written into the image. `--stop-timeout` lets the drain finish before Docker's SIGKILL.",
    ]
    if cfg.model_kind() == "hub" and cfg.revision is None:
        lines += ["", f"The build downloads the latest `{cfg.model}`; pass --revision COMMIT for a reproducible image."]
    return lines


def _k8s_usage(cfg: DeployConfig) -> list[str]:
    lines = _build_hint(cfg)
    if cfg.api_key_secret:
        lines += [
            "The API key is read from a Secret that you create (its value is never written here):",
            "",
            "```sh",
            f"kubectl create secret generic {cfg.api_key_secret} "
            f'--from-literal={cfg.api_key_secret_key}="$SLIMLM_API_KEY"',
            "```",
            "",
        ]
    if cfg.mount:
        lines += [
            f"The model is read from the PersistentVolumeClaim `{cfg.pvc}` (path `{cfg.pvc_subpath or '/'}`), "
            f"mounted read-only at `{cfg.container_model()}`.",
            "",
        ]
    return lines + [
        "```sh",
        "kubectl apply -f deployment.yaml -f service.yaml -f hpa.yaml",
        f"kubectl rollout status deployment/{cfg.name}",
        f"kubectl port-forward service/{cfg.name} 8080:80   # then: curl localhost:8080/ready",
        "```",
        "",
        f"The HPA keeps {cfg.min_replicas}-{cfg.max_replicas} replicas at {cfg.cpu_target}% of the CPU "
        "request (it needs metrics-server). Memory request and limit: the estimate of "
        "`slimlm.memory` for this model (fp32 load, 16 sequences, fp16 KV cache) plus the runtime, "
        "unless --memory was given.",
    ]


def _kserve_usage(cfg: DeployConfig) -> list[str]:
    lines = _build_hint(cfg)
    if cfg.api_key_secret:
        lines += [
            "Create the Secret holding the API key first (never written here):",
            "",
            "```sh",
            f"kubectl create secret generic {cfg.api_key_secret} "
            f'--from-literal={cfg.api_key_secret_key}="$SLIMLM_API_KEY"',
            "```",
            "",
        ]
    return lines + [
        "```sh",
        "kubectl apply -f inferenceservice.yaml",
        f"kubectl get inferenceservice {cfg.name}",
        "```",
        "",
        f"Serverless mode (Knative): {cfg.min_replicas}-{cfg.max_replicas} replicas, "
        f"{cfg.scale_target} concurrent requests per replica; with minReplicas 0 the first request "
        "after idling waits for a pod to load the model. --mount uses KServe's storage initializer "
        "(STORAGE_URI pvc://...) mounted at /mnt/models.",
    ]
