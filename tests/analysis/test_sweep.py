"""open_sweep: runs along a `run` dimension, spans aligned by name, against NumPy."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
from synthetic_trace import Run

import analysis
from analysis import store_format as sf
from analysis.selection import SelectionError

CAT = {"prompt": [0, 1, 2, 3, 4, 5], "cat": [1]}
MAT = {"prompt": [0, 1, 2, 3, 4, 5], "mat": [4]}


@pytest.fixture
def sweep_store(make_store):
    """Three runs: two prompts with different spans, then one that stopped after two steps."""
    return make_store(
        Run(spans=CAT, prompt="a cat", seed=1),
        Run(spans=MAT, prompt="a mat", seed=2),
        Run(spans=CAT, prompt="a cat", seed=3, status=sf.RECORDING, complete=[0, 1]),
    )


def span(expected, run, spans, name, direction="txt2img"):
    return expected[run][direction][:, :, :, list(spans).index(name)]


def test_runs_are_stacked_with_their_prompt_and_seed(sweep_store):
    path, expected = sweep_store
    with pytest.warns(analysis.PartialRunWarning, match="run-0002"):
        sweep = analysis.open_sweep(path)
    assert sweep.txt2img.dims == ("run", *sf.SPAN_DIMS)
    assert isinstance(sweep.txt2img.data, dask.array.Array)
    assert list(sweep.run.values) == ["run-0000", "run-0001", "run-0002"]
    assert list(sweep.prompt.values) == ["a cat", "a mat", "a cat"]
    assert list(sweep.seed.values) == [1, 2, 3]
    assert sorted(sweep.span.values) == ["cat", "mat", "prompt"]
    for direction in sf.DIRECTIONS:
        np.testing.assert_array_equal(
            sweep[direction].sel(run="run-0001", span="mat").values,
            span(expected, "run-0001", MAT, "mat", direction),
        )


def test_a_span_or_step_a_run_lacks_reads_nan_and_means_skip_it(sweep_store):
    path, expected = sweep_store
    with pytest.warns(analysis.PartialRunWarning):
        sweep = analysis.open_sweep(path)
    cat = sweep.txt2img.sel(span="cat")
    assert np.isnan(cat.sel(run="run-0001").values).all()  # its prompt has no span "cat"
    assert np.isnan(cat.sel(run="run-0002", step=[2, 3]).values).all()  # never completed
    # The mean over runs averages the runs that have the map, in float64 like NumPy's nanmean.
    stacked = np.stack(
        [
            span(expected, "run-0000", CAT, "cat"),
            np.full_like(span(expected, "run-0000", CAT, "cat"), np.nan),
            span(expected, "run-0002", CAT, "cat"),
        ]
    )
    stacked[2, 2:] = np.nan
    np.testing.assert_allclose(
        cat.mean("run").values, np.nanmean(stacked.astype(np.float64), axis=0), rtol=1e-6
    )


def test_runs_are_chosen_by_name_or_number(sweep_store):
    path, expected = sweep_store
    sweep = analysis.open_sweep(path, runs=["run-0001", 0], spans=["prompt"])
    assert list(sweep.run.values) == ["run-0001", "run-0000"]
    assert list(sweep.span.values) == ["prompt"]
    np.testing.assert_array_equal(
        sweep.img2txt.sel(run="run-0000", span="prompt").values,
        span(expected, "run-0000", CAT, "prompt", "img2txt"),
    )
    with pytest.raises(SelectionError, match=r"unknown run 'run-0009'.*run-0000 \(complete\)"):
        analysis.open_sweep(path, runs=["run-0009"])
    with pytest.raises(SelectionError, match=r"runs \['run-0000'\] are asked for more than once"):
        analysis.open_sweep(path, runs=[0, "run-0000"])


def test_runs_on_different_grids_are_refused_naming_them(make_store):
    path, _ = make_store(Run(), Run(grid=(8, 8)), Run())
    with pytest.raises(SelectionError, match=r"different latent grids.*'run-0001': \(8, 8\)") as e:
        analysis.open_sweep(path)
    assert "runs=['run-0000', 'run-0002']" in str(e.value)
