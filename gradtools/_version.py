"""The installed distribution's version, read from its metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(distribution: str = "gradtools") -> str:
    """``distribution``'s version, or ``"0+unknown"`` when run from a source tree never installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        # A checkout on PYTHONPATH has no metadata; a PEP 440 local version that sorts
        # below every release says so without pretending to be one.
        return "0+unknown"
