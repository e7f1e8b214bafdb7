"""Atomic folder writes: build the folder under a temporary name, then rename it into place.

A crash (or SIGKILL) at any point leaves either the old folder or the complete new one, never half of one.
Model folders, adapters and training checkpoints are all written this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `folder`, on error it is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst; an existing dst is swapped out first and removed only after the move succeeded."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)  # put the old folder back rather than leave it under a hidden name
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
