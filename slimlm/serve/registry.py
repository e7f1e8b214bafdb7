"""A versioned registry of base models, quantized artifacts and adapters: immutable entries the server resolves.

A registry is one folder: ROOT/registry.db (SQLite: versions, heads, aliases, an event log) and the artifacts,
copied under ROOT/artifacts/NAME/vN/. `push` adds version N+1 and makes it the head; `alias` points a name such as
`prod` at a version; `rollback` moves the head back one version. A reference is `NAME` (the head), `NAME@3` or
`NAME@prod`. A push is atomic: the copy is built and fsynced under ROOT/.tmp, renamed into place, and only then is
its row committed, so a crash mid-push leaves the previous version serving and no half entry.

It is not a loader and not a download cache: it stores and names files; `slimlm.load` and the server read them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slimlm.errors import InputError

log = logging.getLogger("slimlm.registry")
KINDS = ("model", "quantized", "adapter")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METRICS_FILES = ("summary.json", "ledger.json")  # read in this order; a later file's keys win
SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS versions (name TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL,
    path TEXT NOT NULL, sha256 TEXT NOT NULL, parent_base TEXT, method TEXT, metrics TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS heads (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, name TEXT NOT NULL, action TEXT NOT NULL,
    version INTEGER NOT NULL, detail TEXT, at TEXT NOT NULL);
"""


class RegistryError(InputError):
    """A bad name, reference or artifact, or a corrupt entry; the message says what to fix."""


@dataclass(frozen=True)
class Entry:
    """One immutable version of a registered artifact. `path` is the folder (or .gguf file) to load."""

    name: str
    version: int
    kind: str
    path: Path
    sha256: str
    parent_base: str | None = None
    method: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "ref": self.ref}


def default_root() -> Path:
    """$SLIMLM_REGISTRY, else ~/.cache/slimlm/registry."""
    return Path(os.environ.get("SLIMLM_REGISTRY") or Path.home() / ".cache" / "slimlm" / "registry")


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe registry name (it becomes a folder name, so it must not escape the root)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise RegistryError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', '@' or '..')"
        )
    if what == "alias" and name.isdigit():
        raise RegistryError(f"alias {name!r} is all digits and would read as a version number: pick a word like 'prod'")
    return name


def _files(path: Path) -> list[tuple[str, Path]]:
    """(relative posix path, file) of every file under `path` (or the file itself), sorted by relative path."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for d, _, names in os.walk(path, followlinks=True):
        out += [((Path(d) / n).relative_to(path).as_posix(), Path(d) / n) for n in names]
    return sorted(out)


def hash_artifact(path: str | Path) -> str:
    """sha256 over every file's relative path, size and bytes, in sorted path order (renames change it too)."""
    h = hashlib.sha256()
    for rel, f in _files(Path(path)):
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path} is not readable JSON ({e}): fix or remove it, then push again") from e


def read_metrics(path: Path) -> dict[str, Any]:
    """Metrics from summary.json / ledger.json in the artifact folder, or in its parent when that summary names
    this folder as its output (the `slimlm finetune` layout: OUT/adapter + OUT/summary.json)."""
    metrics: dict[str, Any] = {}
    for fname in METRICS_FILES:
        data = _read_json(path / fname) if (path / fname).is_file() else _run_summary(path, fname)
        if data is not None:
            metrics.update(data if isinstance(data, dict) else {Path(fname).stem: data})
    return metrics


def _run_summary(path: Path, fname: str) -> Any:
    """The parent folder's `fname` if it is a dict whose "output" is `path` (else None: it is some other run's)."""
    try:  # a broken file beside the folder is not ours to reject
        data = _read_json(path.parent / fname) if (path.parent / fname).is_file() else None
    except RegistryError:
        return None
    if isinstance(data, dict) and data.get("output") and Path(str(data["output"])).resolve() == path.resolve():
        return data
    return None


def inspect_artifact(path: Path, kind: str | None = None) -> dict[str, Any]:
    """kind, method, parent_base and metrics of a folder or .gguf file; `kind` overrides the detected kind."""
    if kind is not None and kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise RegistryError(f"{path} is a file but not a .gguf: push a model or adapter folder, or a .gguf file")
        return {"kind": kind or "model", "method": None, "parent_base": None, "metrics": {}}
    if not path.is_dir():
        raise RegistryError(f"{path} does not exist: give the folder or .gguf file to push")
    info = {"kind": kind, "method": None, "parent_base": None, "metrics": read_metrics(path)}
    if (path / "adapter_config.json").is_file():
        # Imported here: only an adapter push needs the PEFT method registry (and its torch modules).
        from slimlm.peft import read_adapter_config

        try:
            info["method"], _, raw = read_adapter_config(path)
        except ValueError as e:
            raise RegistryError(f"{path}: {e}") from e
        info.update(kind=kind or "adapter", parent_base=raw.get("base_model_name_or_path"))
    elif (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        quant = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        info.update(
            kind=kind or ("quantized" if quant else "model"),
            method=quant.get("quant_method") if isinstance(quant, dict) else None,
        )
    elif kind is None:
        raise RegistryError(
            f"{path} has no adapter_config.json or config.json: is it a model or adapter folder? "
            f"(pass --kind to push it anyway)"
        )
    return info


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy one file and fsync it, so its bytes are on disk before the folder is renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    _fsync(dst)


def _copy_artifact(src: Path, dst: Path) -> None:
    """Copy a folder's files (or one file) into the folder `dst`, then fsync every folder written."""
    for rel, f in _files(src):
        _copy_file(f, dst / rel)
    for d, _, _ in os.walk(dst):
        _fsync(Path(d))


class Registry:
    """Versioned artifacts under `root`. Safe to share between threads: each thread gets its own SQLite connection."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or default_root()).expanduser().resolve()
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)
        with self._locked(blocking=False) as got:
            if got:  # no push in flight (in any process): what is left over is from a crash
                self._clean()

    # -- plumbing --------------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # autocommit; writes open explicit BEGIN IMMEDIATE transactions
            db = self._local.db = sqlite3.connect(self.root / "registry.db", timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
        return db

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's objects are collected)."""
        if getattr(self._local, "db", None) is not None:
            self._local.db.close()
            self._local.db = None

    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        """An exclusive lock on ROOT/.lock between pushes (any process); yields whether it was taken."""
        with open(self.root / ".lock", "a") as f:  # flock is released when the file closes, or the process dies
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                got = True
            except BlockingIOError:
                got = False
            yield got

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _clean(self) -> None:
        """Remove temp folders and artifact folders that no committed row points to (a push that crashed)."""
        for tmp in (self.root / ".tmp").iterdir():
            shutil.rmtree(tmp, ignore_errors=True)
        known = {(r["name"], f"v{r['version']}") for r in self._db().execute("SELECT name, version FROM versions")}
        for d in (self.root / "artifacts").glob("*/v*"):
            if (d.parent.name, d.name) not in known:
                shutil.rmtree(d, ignore_errors=True)

    def _entry(self, row: sqlite3.Row) -> Entry:
        return Entry(
            row["name"],
            row["version"],
            row["kind"],
            self.root / row["path"],
            row["sha256"],
            row["parent_base"],
            row["method"],
            json.loads(row["metrics"]),
            row["created_at"],
        )

    def _event(self, db: sqlite3.Connection, name: str, action: str, version: int, detail: str = "") -> None:
        db.execute(
            "INSERT INTO events (name, action, version, detail, at) VALUES (?, ?, ?, ?, ?)",
            (name, action, version, detail, _now()),
        )

    # -- reading ---------------------------------------------------------------------------------------------
    def head(self, name: str) -> int:
        """The version `NAME` resolves to."""
        row = self._db().execute("SELECT version FROM heads WHERE name = ?", (check_name(name),)).fetchone()
        if row is None:
            raise RegistryError(
                f"no artifact named {name!r} in the registry at {self.root}: `slimlm registry list` "
                f"shows what is there, `slimlm registry push {name} PATH` adds it"
            )
        return row[0]

    def resolve(self, ref: str) -> Entry:
        """The entry for `NAME` (head), `NAME@N` (version N) or `NAME@ALIAS`. Cheap: two indexed queries."""
        name, at, tag = ref.partition("@")
        if at and not tag:
            raise RegistryError(f"{ref!r} ends with '@': write NAME, NAME@N (a version) or NAME@ALIAS")
        if not tag:
            version = self.head(name)
        elif tag.isdigit():
            version = int(tag)
        else:
            row = (
                self._db()
                .execute(
                    "SELECT version FROM aliases WHERE name = ? AND alias = ?",
                    (check_name(name), check_name(tag, "alias")),
                )
                .fetchone()
            )
            if row is None:
                raise RegistryError(
                    f"{name} has no alias {tag!r} (aliases: {', '.join(self.aliases(name)) or 'none'})"
                    f": `slimlm registry alias {name}@N {tag}` sets it"
                )
            version = row[0]
        row = (
            self._db()
            .execute("SELECT * FROM versions WHERE name = ? AND version = ?", (check_name(name), version))
            .fetchone()
        )
        if row is None:
            have = [str(e.version) for e in self.entries(name)]
            raise RegistryError(f"{name} has no version {version} (versions: {', '.join(have) or 'none'})")
        return self._entry(row)

    def entries(self, name: str | None = None) -> list[Entry]:
        """Every version of `name` (or of every name), oldest first."""
        q, args = ("WHERE name = ?", (check_name(name),)) if name is not None else ("", ())
        return [self._entry(r) for r in self._db().execute(f"SELECT * FROM versions {q} ORDER BY name, version", args)]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return [r[0] for r in self._db().execute("SELECT name FROM heads ORDER BY name")]

    def aliases(self, name: str) -> dict[str, int]:
        """{alias: version} of `name`."""
        rows = self._db().execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,))
        return {r[0]: r[1] for r in rows}

    def history(self, name: str) -> list[dict[str, Any]]:
        """Pushes, aliases and rollbacks of `name`, oldest first."""
        rows = self._db().execute("SELECT action, version, detail, at FROM events WHERE name = ? ORDER BY id", (name,))
        return [dict(r) for r in rows]

    def verify(self, entry: Entry) -> Entry:
        """Recompute the entry's hash; raise RegistryError if its files were changed or removed since the push."""
        actual = hash_artifact(entry.path) if entry.path.exists() else "missing"
        if actual != entry.sha256:
            raise RegistryError(
                f"{entry.ref} is corrupt: hash mismatch (pushed {entry.sha256[:12]}, now "
                f"{actual[:12]}) at {entry.path}: its files changed or are missing; push it again"
            )
        return entry

    def resolve_good(self, ref: str, checked: dict[tuple[str, int], str | None] | None = None) -> Entry:
        """resolve(ref), hash-checked (verify). A bare NAME whose head is corrupt resolves to the newest earlier
        version of the same kind that checks out (logged as a warning), so a damaged push never takes a served
        name down; NAME@N and NAME@ALIAS ask for one version and raise RegistryError when it is corrupt.

        `checked` caches verdicts by (name, version) across calls ({key: None if good, else the error}): versions
        are immutable, so a caller that keeps it (the server) hashes each version once."""
        entry = self.resolve(ref)
        tries = [entry]
        if "@" not in ref:
            older = [e for e in self.entries(entry.name) if e.version < entry.version and e.kind == entry.kind]
            tries += older[::-1]
        checked = {} if checked is None else checked
        for e in tries:
            key = (e.name, e.version)
            if key not in checked:
                try:
                    self.verify(e)
                    checked[key] = None
                except RegistryError as err:
                    checked[key] = str(err)
            if checked[key] is None:
                if e is not entry:
                    log.warning(
                        "%s; serving %s, the newest version that is intact", checked[entry.name, entry.version], e.ref
                    )
                return e
        more = "; no earlier version is intact either" if len(tries) > 1 else ""
        raise RegistryError(checked[entry.name, entry.version] + more)

    # -- writing ---------------------------------------------------------------------------------------------
    def push(
        self,
        name: str,
        path: str | Path,
        kind: str | None = None,
        parent_base: str | None = None,
        method: str | None = None,
    ) -> Entry:
        """Copy a folder or .gguf file in as the next version of `name` and make it the head."""
        check_name(name)
        src = Path(path).expanduser().resolve()
        if self.root.is_relative_to(src):  # the copy would land inside what it copies, and never end
            raise RegistryError(f"{path} contains the registry at {self.root}: push a folder outside it")
        info = inspect_artifact(src, kind)
        with self._locked():  # one push at a time: version numbers and the final folder are ours
            version = 1 + (
                self._db().execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0] or 0
            )
            dest = self.root / "artifacts" / name / f"v{version}"
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}.v{version}-", dir=self.root / ".tmp"))
            try:
                _copy_artifact(src, tmp)
                sha = hash_artifact(tmp / src.name if src.is_file() else tmp)  # hash what was stored, not the source
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)  # left by a crash between rename and commit: no row has it
                os.rename(tmp, dest)
                _fsync(dest.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            rel = (dest / src.name if src.is_file() else dest).relative_to(self.root).as_posix()
            try:
                with self._write() as db:
                    db.execute(
                        "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            name,
                            version,
                            info["kind"],
                            rel,
                            sha,
                            parent_base or info["parent_base"],
                            method or info["method"],
                            json.dumps(info["metrics"]),
                            _now(),
                        ),
                    )
                    db.execute("INSERT OR REPLACE INTO heads VALUES (?, ?)", (name, version))
                    self._event(db, name, "push", version, str(src))
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        return self.resolve(f"{name}@{version}")

    def alias(self, ref: str, alias: str) -> Entry:
        """Point `NAME@ALIAS` at the version `ref` resolves to (re-pointing an existing alias)."""
        entry, alias = self.resolve(ref), check_name(alias, "alias")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (entry.name, alias, entry.version))
            self._event(db, entry.name, "alias", entry.version, alias)
        return entry

    def rollback(self, name: str) -> Entry:
        """Move the head of `name` to the version before the current head; a later push becomes head again."""
        with self._write() as db:  # read the head inside the transaction: a concurrent push may move it
            head = self.head(name)
            prev = db.execute(
                "SELECT MAX(version) FROM versions WHERE name = ? AND version < ?", (name, head)
            ).fetchone()[0]
            if prev is None:
                raise RegistryError(f"{name}@{head} is its oldest version: there is nothing to roll back to")
            db.execute("UPDATE heads SET version = ? WHERE name = ?", (prev, name))
            self._event(db, name, "rollback", prev, f"from v{head}")
        return self.resolve(f"{name}@{prev}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = [
    "KINDS",
    "Entry",
    "Registry",
    "RegistryError",
    "check_name",
    "default_root",
    "hash_artifact",
    "inspect_artifact",
]
