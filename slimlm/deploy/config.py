"""DeployConfig: what `slimlm deploy` writes for, validated once; and where the model lives inside the container.

This module decides names, paths, ports and the `slimlm serve` command line that every target (Dockerfile, k8s
Deployment, KServe predictor) runs, so the three agree. It writes nothing and renders no manifest.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.errors import InputError
from slimlm.version import installed_version

TARGETS = ("docker", "k8s", "kserve")
MODELS_DIR = "/models"  # where a baked or mounted model lives in the container
KSERVE_MODEL_DIR = "/mnt/models"
CACHE_DIR = "/cache"  # writable (an emptyDir in k8s): converted GGUFs, the compiled int8 kernel, HF downloads
UID = 10001  # the image's non-root user; numeric, so Kubernetes can verify runAsNonRoot
# `slimlm serve` flags that deploy sets itself (from its own flags), and ones that would put a secret in a file.
OWN_SERVE_FLAGS = ("--model", "--host", "--port", "--drain-timeout")
SECRET_SERVE_FLAGS = ("--api-key", "--api-key-file", "--admin-key-file")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


class DeployError(InputError):
    """Bad `slimlm deploy` input; the message names every bad flag and what to pass instead."""


@dataclass
class DeployConfig:
    """One deployment: the model, how it reaches the container, and the serving and scaling knobs."""

    target: str
    model: str = "smollm2-135m"  # alias, local HF folder, local .gguf file or HF hub id (baked into the image)
    mount: bool = False  # True: not baked; the container reads the model from a volume at MODELS_DIR
    name: str = "slimlm"  # Kubernetes object names and labels
    image: str = ""  # "": slimlm-serve:<slimlm version>
    port: int = 0  # 0: 8080 for kserve (its convention), else 8000 (slimlm serve's default)
    drain_timeout: float = 30.0  # seconds running requests get after SIGTERM (slimlm serve --drain-timeout)
    serve_args: list[str] = field(default_factory=list)  # more `slimlm serve` flags, e.g. --max-batch 8
    min_replicas: int | None = None  # None: 1 for k8s's HPA, 0 (scale to zero) for kserve
    max_replicas: int = 4
    cpu_target: int = 70  # k8s HPA: average CPU utilization, percent of the request
    scale_target: int = 8  # kserve: concurrent requests per replica before it scales out
    cpu: str = "2"  # CPU request (and limit)
    memory: str | None = None  # memory request (and limit); None: from slimlm.memory's estimate
    api_key_secret: str | None = None  # Secret whose key `api_key_secret_key` holds the API key
    api_key_secret_key: str = "api-key"
    pvc: str | None = None  # k8s/kserve with --mount: the PersistentVolumeClaim holding the model
    pvc_subpath: str = ""  # the model's path inside that claim ("" = the claim's root)
    revision: str | None = None  # hub id: the commit/tag to download at image build time

    def __post_init__(self) -> None:
        self.serve_args = list(self.serve_args)
        if self.port == 0:
            self.port = 8080 if self.target == "kserve" else 8000
        if self.min_replicas is None:
            self.min_replicas = 0 if self.target == "kserve" else 1
        if not self.image:
            self.image = f"slimlm-serve:{installed_version()}"

    def validate(self) -> None:
        """Collect every problem and raise one DeployError naming the flags to fix."""
        errors = [
            e
            for e in (
                self._target_error(),
                self._name_error(),
                self._model_error(),
                *self._number_errors(),
                *self._resource_errors(),
                *self._serve_arg_errors(),
                self._mount_error(),
            )
            if e
        ]
        if errors:
            raise DeployError("; ".join(errors))

    def _target_error(self) -> str | None:
        if self.target not in TARGETS:
            return f"unknown target {self.target!r}: choose one of {', '.join(TARGETS)}"
        return None

    def _name_error(self) -> str | None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 45:  # KServe adds suffixes to a 63-char limit
            return f"--name {self.name!r} must be lowercase letters, digits and '-', start with a letter, <= 45 chars"
        if self.api_key_secret is not None and not _DNS_LABEL.match(self.api_key_secret.replace(".", "-")):
            return f"--api-key-secret {self.api_key_secret!r} is not a Kubernetes Secret name"
        return None

    def _model_error(self) -> str | None:
        try:
            self.model_kind()
        except DeployError as e:
            return str(e)
        return None

    def _number_errors(self) -> list[str]:
        errors = []
        if not 1 <= self.port <= 65535:
            errors.append(f"--port must be in 1..65535, got {self.port}")
        if self.drain_timeout < 0:
            errors.append(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
        low = 0 if self.target == "kserve" else 1  # an HPA cannot scale to zero (alpha feature gate only)
        if self.min_replicas < low:
            errors.append(f"--min-replicas must be >= {low} for {self.target}, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            errors.append(
                f"--max-replicas ({self.max_replicas}) must be >= 1 and >= --min-replicas ({self.min_replicas})"
            )
        if not 1 <= self.cpu_target <= 100:
            errors.append(f"--cpu-target must be a percentage in 1..100, got {self.cpu_target}")
        if self.scale_target < 1:
            errors.append(f"--scale-target must be >= 1 concurrent requests, got {self.scale_target}")
        return errors

    def _resource_errors(self) -> list[str]:
        errors = []
        if not _QUANTITY.match(self.cpu) or float(re.sub(r"[a-zA-Z]+$", "", self.cpu) or 0) <= 0:
            errors.append(f"--cpu {self.cpu!r} is not a CPU quantity such as 2, 1.5 or 500m")
        if self.memory is not None and not _QUANTITY.match(self.memory):
            errors.append(f"--memory {self.memory!r} is not a memory quantity such as 2Gi or 1536Mi")
        return errors

    def _serve_arg_errors(self) -> list[str]:
        errors = []
        for token in self.serve_args:
            flag = token.split("=")[0]
            if flag in SECRET_SERVE_FLAGS:
                errors.append(
                    f"--serve-args may not hold {flag} (it would write a secret into the files): use "
                    "--api-key-secret NAME, a Kubernetes Secret read into SLIMLM_API_KEY"
                )
            elif flag in OWN_SERVE_FLAGS:
                errors.append(f"--serve-args may not hold {flag}: pass it to `slimlm deploy` directly")
        if not errors:  # parsed with a stand-in --model "m": a bad --model is reported by _model_error
            errors += _serve_parse_errors(["--model", "m", *self.serve_args])
        return errors

    def _mount_error(self) -> str | None:
        if self.mount and self.target != "docker" and not self.pvc:
            return "--mount on k8s/kserve needs --pvc CLAIM: the PersistentVolumeClaim that holds the model"
        if self.pvc and not self.mount:
            return "--pvc needs --mount (the model is otherwise baked into the image)"
        return None

    def model_kind(self) -> str:
        """'alias', 'folder', 'gguf' or 'hub': how the model gets into the container."""
        from slimlm.checkpoint import ALIASES

        path = Path(self.model).expanduser()
        if self.mount:
            if self.model in ALIASES or (
                not path.exists() and _HUB_ID.match(self.model) and not self.model.startswith((".", "/"))
            ):
                raise DeployError(
                    f"--mount serves a model folder or .gguf file from a volume; --model "
                    f"{self.model!r} is an alias or hub id: drop --mount to bake it into the image"
                )
            if path.suffix == ".gguf" and self.target == "kserve":
                raise DeployError(
                    "kserve --mount serves a model folder (KServe mounts it at /mnt/models): "
                    "convert the .gguf with `slimlm export` or drop --mount to bake it in"
                )
            return "gguf" if path.suffix == ".gguf" else "folder"
        if self.model in ALIASES:
            return "alias"
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise DeployError(f"--model {self.model} has no config.json: pass an HF model folder")
            return "folder"
        if path.is_file():
            if path.suffix != ".gguf":
                raise DeployError(f"--model {self.model} is a file but not .gguf: pass an HF folder or .gguf file")
            return "gguf"
        if _HUB_ID.match(self.model) and not self.model.startswith((".", "/")):
            return "hub"
        raise DeployError(
            f"--model {self.model!r} is not a folder, a .gguf file, an alias ({', '.join(ALIASES)}) "
            "or an HF hub id (org/name)"
        )

    def container_model(self) -> str:
        """What `slimlm serve --model` gets inside the container."""
        kind = self.model_kind()
        if self.mount and self.target == "kserve":
            return KSERVE_MODEL_DIR  # KServe's storage initializer mounts the STORAGE_URI there
        if kind == "alias":
            return self.model  # the image installs the package that ships it
        return f"{MODELS_DIR}/model.gguf" if kind == "gguf" else f"{MODELS_DIR}/model"

    def serve_command(self) -> list[str]:
        """The container's command line: `slimlm serve` listening on all interfaces on `port`."""
        return [
            "slimlm",
            "serve",
            "--model",
            self.container_model(),
            "--host",
            "0.0.0.0",
            "--port",
            str(self.port),
            "--drain-timeout",
            f"{self.drain_timeout:g}",
            *self.serve_args,
        ]

    def grace_period_s(self) -> int:
        """Pod terminationGracePeriodSeconds: the drain, the preStop pause and uvicorn's own close must fit in it."""
        return int(self.drain_timeout) + PRESTOP_SLEEP_S + 15

    def threads(self) -> int:
        """OMP threads: the CPU request, rounded (torch would otherwise start one per *node* core)."""
        value = float(self.cpu[:-1]) / 1000 if self.cpu.endswith("m") else float(self.cpu)
        return max(1, round(value))


# The pause before SIGTERM: endpoints controllers and load balancers take a few seconds to stop routing to a
# terminating pod; the server keeps serving meanwhile (it only starts draining on SIGTERM).
PRESTOP_SLEEP_S = 5


def parse_serve_args(text: str) -> list[str]:
    """`--serve-args "--max-batch 8 --quantize int8"` as a list of tokens (shell quoting rules)."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise DeployError(f"--serve-args {text!r}: {e}") from None


def _serve_parse_errors(argv: list[str]) -> list[str]:
    """Parse `argv` with `slimlm serve`'s own parser, so a typo fails now rather than in a crash-looping pod."""
    import argparse

    from slimlm.serve.cli import add_serve_commands

    class _Raising(argparse.ArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit
            raise DeployError(message)

    parser = _Raising(prog="slimlm")
    sub = parser.add_subparsers(dest="command")
    add_serve_commands(sub)
    sub.choices["serve"].allow_abbrev = False  # `--por 1` would slip past the checks of full flag names above
    try:
        _, extras = parser.parse_known_args(["serve", *argv])
    except DeployError as e:
        return [f"--serve-args: slimlm serve would refuse it: {e}"]
    return [f"--serve-args: slimlm serve has no flag {' '.join(extras)}"] if extras else []
