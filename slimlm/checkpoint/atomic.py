"""Atomic folder writes, and the guard every writing command runs on its `--out` before it starts.

`atomic_folder` builds the folder under a temporary name, then renames it into place: a crash (or SIGKILL) at any
point leaves either the old folder or the complete new one, never half of one. Model folders, adapters, exports and
training checkpoints are all written this way. `check_output` is the command line's side of the same promise: a
command never replaces a folder that holds something unless asked (`--overwrite`), and never writes into its input.

This module moves and checks folders; it knows nothing of what is in them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slimlm.errors import InputError

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step
_AT_FDCWD = -100
OVERWRITE_HELP = "replace an existing non-empty output (an output inside an input is refused even so)"


def check_output(
    out: str | Path,
    *,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
    flag: str = "--out",
    kind: str = "folder",
) -> Path:
    """Refuse an output that would lose data; returns `out` as a Path.

    Always refused: `out` is, contains or is inside one of `inputs` (symlinks resolved; inputs that are not
    existing paths, such as model aliases, are skipped), and, for a folder output, an existing file at `out`.
    Refused unless `overwrite`: an existing non-empty folder (an empty one is fine) or, for a file output
    (`kind="file"`), an existing file. Raises ValueError, which the CLI prints as one line (status 2).
    """
    out = Path(out).expanduser()
    real = out.resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        src = Path(given).expanduser().resolve()
        if real == src or real.is_relative_to(src) or src.is_relative_to(real):
            raise InputError(f"{flag} {out} would write into the input {given}: choose a {flag} outside it")
    if kind == "folder" and out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} is a file, not a folder: choose another {flag}")
    if overwrite or not out.exists():
        return out
    if out.is_dir() and not any(out.iterdir()):
        return out
    what = "exists and is not empty" if out.is_dir() else "exists"
    raise InputError(f"{flag} {out} {what}; pass --overwrite to replace it, or choose another {flag}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file under a temporary name and rename it into place: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `folder`, on error it is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(folder)
    # The pid in the name lets a later write tell a dead writer's leftovers from a live one's folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a saved folder gets the usual mode
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: set and restore; a strict value meanwhile, so a racing file is private
    os.umask(mask)
    return mask


def _replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst. An existing dst is swapped with src in one step where the OS can (Linux renameat2), so
    there is no moment without a dst; elsewhere it is renamed aside first and removed only after the move."""
    if dst.exists() and _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
        return
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where renameat2 is missing or refuses (other OS, filesystem)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    except (OSError, AttributeError):
        return False
    return rc == 0


def _clean_leftovers(folder: Path) -> None:
    """Undo what a writer killed mid-way left beside `folder`: restore an old folder renamed aside (a kill between
    the two renames of the fallback path), and remove temporary folders of writers that are no longer running."""
    for path in folder.parent.glob(f".{_glob_escape(folder.name)}.*-*"):
        kind, _, rest = path.name[len(folder.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not folder.exists():
            os.rename(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _glob_escape(name: str) -> str:
    """`name` with glob metacharacters made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
