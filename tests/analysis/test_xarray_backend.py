"""Plain xarray opens a run through the `attnscope` engine, with the same checks as open_trace."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from synthetic_trace import Run

import analysis


def test_open_dataset_with_the_attnscope_engine_reads_a_run(make_store):
    path, expected = make_store(Run(), Run(prompt="a dog"))
    ds = xr.open_dataset(path, engine="attnscope", group="run-0000")
    np.testing.assert_array_equal(ds.txt2img.values, expected["run-0000"]["txt2img"])
    assert ds.attrs["prompt"] == "a cat on a mat."
    latest = xr.open_dataset(path, engine="attnscope", drop_variables="img2txt")
    assert latest.attrs["run"] == "run-0001" and "img2txt" not in latest


def test_the_engine_refuses_what_open_trace_refuses(make_store):
    path, _ = make_store(Run(), version=99)
    with pytest.raises(analysis.FormatError, match="format version 99"):
        xr.open_dataset(path, engine="attnscope")
