"""slimlm's own CPU kernels: C++ compiled once per machine with torch.utils.cpp_extension, registered as torch ops.

`int8_linear(x, qweight, scale)` (torch.ops.slimlm.int8_linear, source int8_gemm.cpp) is the int8 weight-only
matmul y = x @ (qweight * scale[:, None]).T that Int8WeightOnlyLinear runs on CPU. `decode_layers`
(torch.ops.slimlm.decode_layers, decode.cpp) runs every decoder layer of one decode step in one call; the engine
uses it through engine/fused_decode.py. The build is cached under
$SLIMLM_CACHE/kernels/<key>, the key hashing the source, the torch version and the CPU's flags (the code is built
with -march=native, so a copied cache on another CPU rebuilds instead of crashing on unknown instructions).

This module is not a fallback layer: callers check `int8_linear_available()` and keep their own torch path, which
runs whenever the kernel cannot be built (no compiler, no ninja: one logged warning), on CUDA, and when
SLIMLM_KERNELS=0 (for A/B benchmarks and debugging).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from slimlm.paths import cache_root

log = logging.getLogger("slimlm.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("int8_gemm.cpp", "decode.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("int8_gemm.h", "simd.h")]
# Flags as torch builds its own CPU code: OpenMP so that at::parallel_for (inlined from ATen's headers) runs on
# torch's intra-op pool. libgomp links by soname, so the process keeps the one copy that torch already loaded.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_loaded: bool | None = None  # None: not tried yet; then whether torch.ops.slimlm.int8_linear is registered
_disabled = 0  # depth of `disabled()` blocks


def enabled() -> bool:
    """False when SLIMLM_KERNELS=0 (read on every call, so a benchmark can switch in one process) or in `disabled()`."""
    return not _disabled and os.environ.get("SLIMLM_KERNELS", "1") != "0"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run torch's kernels inside this block, e.g. for an eager reference that a traced export (which records
    torch's int8 kernel, so that the file runs without slimlm) is compared with."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def cpu_flags() -> list[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / ARM
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def build_key() -> str:
    """What the compiled library depends on: source texts, torch version, compiler flags and the CPU."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.read_bytes())
    for part in (torch.__version__, " ".join(CFLAGS + LDFLAGS), platform.machine(), " ".join(cpu_flags())):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    return cache_root() / "kernels" / f"slimlm-{build_key()}"


def _build() -> None:
    """Compile (or reuse) the library and load it into this process; raises on any failure."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip package installs it next to the interpreter, maybe not on PATH
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # cpp_extension takes a file lock in the folder, so concurrent processes build once and share it.
    cpp_extension.load(
        name="slimlm_kernels",
        sources=[str(p) for p in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("slimlm::int8_linear")
    def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))  # for torch.compile / meta tensors


def load() -> bool:
    """Build and load the kernels once per process; False (after one warning) if that fails."""
    global _loaded
    if _loaded is None:
        try:
            _build()
            _loaded = True
        except Exception as e:  # no compiler, no ninja, read-only cache, ...: never fatal
            log.warning(
                "slimlm CPU kernels unavailable, using torch's int8 kernels instead (%s: %s)",
                type(e).__name__,
                str(e).strip().splitlines()[-1] if str(e).strip() else "",
            )
            _loaded = False
    return _loaded


def int8_linear_available() -> bool:
    """Whether int8_linear may run now: not disabled by SLIMLM_KERNELS=0, and built."""
    return enabled() and (_loaded if _loaded is not None else load())


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (qweight [N, K] int8 * scale [N])^T in fp32, returned in x's dtype (CPU only)."""
    return torch.ops.slimlm.int8_linear(x, qweight, scale)


def decode_layers_available() -> bool:
    """Whether the one-call decoder layers (decode.cpp) may run now (same conditions as int8_linear)."""
    return int8_linear_available()


def isa() -> str:
    """Which vector path the kernel was built with: 'avx512', 'avx2' or 'scalar'."""
    return torch.ops.slimlm.int8_kernel_isa() if load() else "unavailable"
