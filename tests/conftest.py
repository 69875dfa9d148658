"""Shared test setup: CPU DeepSpeed, a shared extension cache, paths to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU comm op on first init (~60 s): one cache for every test and CI run.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path.home() / ".cache" / "prefvec-ds" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test (a user's checkout does not have it)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not present (real data lives in ../shared/data)")
    return path


def pytest_collection_modifyitems(items):
    """The folder is the tier: tests/unit -> unit, tests/distributed -> dist, ..."""
    for item in items:
        folder = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        tier = {"distributed": "dist"}.get(folder, folder)
        if tier in ("unit", "dist", "slurm", "e2e", "faults"):
            item.add_marker(getattr(pytest.mark, tier))
