"""Vendored real data (CASTILLO lengths and prompts, Azure arrival traces, deep-research workflows,
Vidur GPU profiles). See README.md in this folder for sources and licences."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    """Path of a vendored data file, e.g. ``data_path("castillo", "castillo_lengths.csv.gz")``."""
    path = Path(str(resources.files(__name__).joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"vendored data file missing: {path}")
    return path
