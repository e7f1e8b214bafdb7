"""slimlm's version, low in the import graph so that serving, deployment and the CLI can all report it."""

from __future__ import annotations

__version__ = "0.1.0"


def installed_version() -> str:
    """The installed distribution's version (`__version__` when running from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimlm")
    except PackageNotFoundError:
        return __version__
