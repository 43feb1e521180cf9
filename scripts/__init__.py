"""The TFKT CT quality bundle's Python package (``scripts.*``), used by the configs in ``configs/``."""

from __future__ import annotations

from pathlib import Path

from scripts import cli_errors


def bundle_root() -> Path:
    """The bundle folder (``configs/``, ``models/``, ``docs/``): ``bundle/`` in the repository, or the folder
    holding this package in an exported Model Zoo bundle."""
    parent = Path(__file__).resolve().parent.parent
    return parent / "bundle" if (parent / "bundle" / "configs").is_dir() else parent


def demo_output() -> Path:
    """Where ``python -m scripts demo`` writes by default (its model is ``models/model.pt`` there)."""
    return Path(__file__).resolve().parent.parent / "demo_outputs"


cli_errors.install()  # in a `python -m monai.bundle` process: its errors end with their reason
