"""Bundled toy tasks: small deterministic instruction datasets with an exact-match scorer, keyed by name.

A task module offers `make_examples(n, seed)`, `write_splits(folder, ...)`, `exact_match` and `score`.
"""

from slimlm.tasks import extract_json

TASKS = {"extract_json": extract_json}

__all__ = ["TASKS"]
