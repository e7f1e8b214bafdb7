"""Where SFT records come from: a JSONL file, a Parquet / CSV / JSON file, a folder of such files, or a Hugging Face
dataset name; and the column renames that map a user's layout onto slimlm's record keys.

Tables (Parquet, CSV, JSON, hub datasets) are read with the `datasets` library (`datasets.load_dataset`), which
caches its Arrow copies under HF_HOME and never writes next to the user's files. JSONL files are not read here:
train/data.py reads them line by line, so every bad line is reported with its number. This module knows nothing
about record formats or tokenization (train/data.py checks and renders what it returns).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import InputError

# Table files and the `datasets` builder that reads each; anything else given as a file is read as JSONL.
TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}
DATA_SUFFIXES = (".jsonl", *TABLE_BUILDERS)  # the files a --data folder contributes
# Keys a rename may target: every key of slimlm's four record formats (train/data.py).
RECORD_KEYS = ("messages", "instruction", "input", "output", "prompt", "completion", "text")
# owner/name or name, as on the Hub; a path that does not exist and has no data suffix is tried as one.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_KINDS = "give a file, a folder of data files, or a Hugging Face dataset name"


class SourceError(InputError):
    """A data source that cannot be read; one line saying which and what to do."""


@dataclass
class Table:
    """One table of records: where it came from, its columns (renamed), and its rows as dicts."""

    name: str  # the file, or "NAME[split]" for a hub dataset; error lines start with it
    columns: list[str]
    rows: Any  # a datasets.Dataset, which iterates dicts

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)


def is_hub_name(source: str | Path) -> bool:
    """True for a Hugging Face dataset name: not an existing path, no data-file suffix, shaped like owner/name."""
    text = str(source)
    return (
        not Path(text).exists()
        and Path(text).suffix.lower() not in (*DATA_SUFFIXES, ".txt")
        and bool(_HUB_NAME.match(text))
    )


def source_error(source: str | None, what: str) -> str | None:
    """The problem with a --data / --eval-data value before anything is read, or None when it may be read."""
    if not source:
        return None
    if Path(source).is_file() or Path(source).is_dir() or is_hub_name(source):
        return None
    return f"{what} {source} does not exist ({_KINDS})"


def data_files(source: str | Path) -> list[Path]:
    """The files a source names: the file itself, or a folder's .jsonl/.json/.parquet/.csv files in name order."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceError(f"{source} does not exist ({_KINDS})")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise SourceError(
            f"{path}: the folder holds no {', '.join(DATA_SUFFIXES)} file; put the data files directly in it"
        )
    return files


def is_table_file(path: Path) -> bool:
    return path.suffix.lower() in TABLE_BUILDERS


def check_columns(columns: dict[str, str]) -> list[str]:
    """Problems with a rename mapping {slimlm key: the user's column}."""
    if not isinstance(columns, dict):
        return [f"columns must be a mapping {{slimlm key: your column}}, got {columns!r}"]
    errors = [
        f"columns: {key!r} is not a record key; rename to one of {', '.join(RECORD_KEYS)}"
        for key in columns
        if key not in RECORD_KEYS
    ]
    errors += [
        f"columns: {key} must name a column (a string), got {value!r}"
        for key, value in columns.items()
        if not isinstance(value, str) or not value
    ]
    values = [v for v in columns.values() if isinstance(v, str)]
    errors += [f"columns: column {v!r} is mapped twice" for v in sorted(set(values)) if values.count(v) > 1]
    return errors


def rename_record(record: Any, columns: dict[str, str]) -> Any:
    """A JSONL record with its keys renamed ({slimlm key: user key}); records without a mapped key pass unchanged."""
    if not columns or not isinstance(record, dict):
        return record
    renamed = {k: v for k, v in record.items() if k not in columns.values()}
    renamed.update({key: record[col] for key, col in columns.items() if col in record})
    return renamed


def read_table(path: Path, columns: dict[str, str]) -> Table:
    """A local Parquet / CSV / JSON file as a Table, columns renamed."""
    import datasets

    builder = TABLE_BUILDERS[path.suffix.lower()]
    options: dict[str, Any] = {}
    if builder == "csv":  # every cell as text: "007" stays "007", an empty cell stays "" (not NaN)
        options = {"keep_default_na": False, "features": _string_features(path)}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **options)
    except Exception as e:  # pyarrow / pandas parse errors have many types; the message is what helps
        raise SourceError(f"{path}: cannot be read as {builder} ({_one_line(e)})") from e
    return _renamed(Table(str(path), list(ds.column_names), ds), columns)


def read_hub(name: str, split: str, subset: str | None, columns: dict[str, str]) -> Table:
    """A Hugging Face dataset split (`datasets.load_dataset(name, subset, split=split)`) as a Table; needs the
    network the first time, then the cache under HF_HOME."""
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except ConnectionError as e:
        raise SourceError(
            f"{name}: not a local file or folder, and the Hugging Face Hub cannot be reached "
            f"({_one_line(e)}); connect to the network or download the data and pass its files"
        ) from e
    except Exception as e:  # DatasetNotFoundError, unknown split or subset, ...: the library's message names it
        raise SourceError(
            f"{name}: not a local file or folder, and loading it as a Hugging Face dataset "
            f"(subset {subset!r}, split {split!r}) failed: {_one_line(e)}"
        ) from e
    if isinstance(ds, datasets.IterableDataset) or not hasattr(ds, "column_names"):
        raise SourceError(f"{name}: load_dataset returned {type(ds).__name__}, not one split; set --dataset.split")
    return _renamed(Table(f"{name}[{split}]", list(ds.column_names), ds), columns)


def _renamed(table: Table, columns: dict[str, str]) -> Table:
    """Apply {slimlm key: column}; a mapped column that is missing is an error listing the columns found."""
    missing = [col for col in columns.values() if col not in table.columns]
    if missing:
        raise SourceError(
            f"{table.name}: no column {', '.join(map(repr, missing))} to rename (columns: "
            f"{', '.join(table.columns) or 'none'}); fix dataset.columns"
        )
    mapping = {col: key for key, col in columns.items() if col != key}
    clashes = [key for col, key in mapping.items() if key in table.columns and key not in mapping]
    if clashes:
        raise SourceError(
            f"{table.name}: renaming onto {', '.join(map(repr, clashes))}, which the table already "
            "has; map that column too, or drop it from the data"
        )
    if mapping:
        table.rows = table.rows.rename_columns(mapping)
        table.columns = list(table.rows.column_names)
    return table


def _string_features(path: Path) -> Any:
    """All-string features for a CSV file's header row (so pandas infers no numbers or NaNs)."""
    import datasets

    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header}) if header else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


__all__ = [
    "SourceError",
    "Table",
    "is_hub_name",
    "source_error",
    "data_files",
    "read_table",
    "read_hub",
    "rename_record",
    "check_columns",
    "RECORD_KEYS",
    "DATA_SUFFIXES",
]
