"""Fixtures: synthetic trace stores written through the format module, without the tracer."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from synthetic_trace import Run, write_store

# Figures render off-screen, as on a headless CI box.
matplotlib.use("Agg")


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, dict[str, np.ndarray]]]]:
    """make_store(*runs, version=2) -> (path, {run: {direction: span maps}})."""
    counter = itertools.count()

    def make(*runs: Run, version: int = 2) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
        path = tmp_path / f"trace{next(counter)}.zarr"
        return path, write_store(path, list(runs) or [Run()], version)

    return make


@pytest.fixture
def store(make_store) -> tuple[Path, dict[str, np.ndarray]]:
    """One complete run on a 6 × 10 grid: (path, {direction: maps})."""
    path, expected = make_store(Run())
    return path, expected["run-0000"]
