"""Where slimlm keeps what it builds once and reuses: converted GGUF models, compiled CPU kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SLIMLM_CACHE, else ~/.cache/slimlm."""
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))
