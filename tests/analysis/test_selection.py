"""Selection syntax: names, lists, inclusive ranges, globs, KIND:GLOB; errors name what exists."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_trace import DOUBLE, SINGLE, Run

import analysis
from analysis.selection import describe_values

SPANS = ["prompt", "cat", "mat"]
LAYERS = list(DOUBLE + SINGLE)


@pytest.fixture
def trace(store):
    path, expected = store
    return analysis.open_trace(path), expected["txt2img"]


def test_one_name_drops_the_dim_like_sel(trace):
    ds, maps = trace
    da = analysis.select(ds.txt2img, span="cat", head="2", layer="transformer_blocks.1")
    assert da.dims == ("step", "y", "x")
    np.testing.assert_array_equal(da.values, maps[:, 1, 2, 1])
    assert da.span.item() == "cat" and da["head"].item() == 2


def test_lists_ranges_and_strides(trace):
    ds, maps = trace
    da = analysis.select(ds.txt2img, span="mat,cat", head="0,2", step="1:2")
    assert list(da.span.values) == ["mat", "cat"]
    np.testing.assert_array_equal(da.values, maps[1:3][:, :, [0, 2]][:, :, :, [2, 1]])
    assert list(analysis.select(ds.txt2img, step=":1").step.values) == [0, 1]
    assert list(analysis.select(ds.txt2img, step="2:").step.values) == [2, 3]
    assert list(analysis.select(ds.txt2img, step="::2").step.values) == [0, 2]
    assert list(analysis.select(ds.txt2img, step="*").step.values) == [0, 1, 2, 3]
    assert list(analysis.select(ds.txt2img, head="0:1,0")["head"].values) == [0, 1]


def test_layer_kinds_and_globs(trace):
    ds, maps = trace
    single = analysis.select(ds.txt2img, layer="single:*")
    kinds = ds.layer_kind.values
    assert list(single.layer.values) == [
        n for n, k in zip(LAYERS, kinds, strict=True) if k == "single"
    ]
    np.testing.assert_array_equal(single.values, maps[:, 2:])
    assert list(analysis.select(ds.txt2img, layer="double:1").layer.values) == [
        "transformer_blocks.1"
    ]
    assert list(
        analysis.select(ds.txt2img, layer="single_transformer_blocks.[02]").layer.values
    ) == [
        "single_transformer_blocks.0",
        "single_transformer_blocks.2",
    ]
    assert list(analysis.select(ds.txt2img, layer="*.1").layer.values) == [
        "transformer_blocks.1",
        "single_transformer_blocks.1",
    ]


def test_python_values_work_too(trace):
    ds, maps = trace
    da = analysis.select(ds.txt2img, {"head": [np.int64(0), 2]}, step=slice(1, 2), span="cat")
    np.testing.assert_array_equal(da.values, maps[1:3, :, [0, 2], 1])


def test_a_span_name_with_separators_is_matched_whole(make_store):
    path, expected = make_store(
        Run(spans={"prompt": [0, 1, 2, 3, 4, 5], "0:6": [0, 1, 2, 3, 4, 5]})
    )
    ds = analysis.open_trace(path)
    da = analysis.select(ds.img2txt, span="0:6")
    np.testing.assert_array_equal(da.values, expected["run-0000"]["img2txt"][:, :, :, 1])


@pytest.mark.parametrize(
    ("selectors", "words"),
    [
        ({"span": "kat"}, ["unknown span 'kat'", "prompt, cat, mat"]),
        ({"span": "cat,kat"}, ["unknown span 'kat'", "prompt, cat, mat"]),
        (
            {"layer": "transformer_blocks.9"},
            ["transformer_blocks.0", "single_transformer_blocks.0..2"],
        ),
        ({"layer": "triple:*"}, ["layer kind 'triple'", "double", "single"]),
        ({"layer": "single:7"}, ["matches nothing", "single_transformer_blocks.0..2"]),
        ({"head": "7"}, ["head 7 is out of range: head must be in 0..2"]),
        ({"head": "two"}, ["'two' is not a number", "0..2"]),
        ({"step": "10:20"}, ["step '10:20' is out of range: step must be in 0..3"]),
        ({"step": "1:2:3:4"}, ["bad step range"]),
        ({"step": "0:3:0"}, ["stride must be positive"]),
        ({"colour": "red"}, ["unknown dim 'colour'", "step", "layer"]),
        ({"head": [0, 5]}, ["unknown head 5"]),
    ],
)
def test_bad_selections_name_what_exists(trace, selectors, words):
    ds, _ = trace
    with pytest.raises(analysis.SelectionError) as err:
        analysis.select(ds.txt2img, **selectors)
    for word in words:
        assert word in str(err.value)


def test_describe_values_compacts_runs():
    assert describe_values([0, 1, 2, 3, 7]) == "0..3, 7"
    assert describe_values([*DOUBLE, *SINGLE]) == (
        "transformer_blocks.0, transformer_blocks.1, single_transformer_blocks.0..2"
    )
    assert describe_values(["prompt", "cat"]) == "prompt, cat"


def test_reduce_means_over_any_dims(trace):
    ds, maps = trace
    for over, axes in ((["step", "layer"], (0, 1)), ("head,span", (2, 3)), (["y"], (4,))):
        got = analysis.reduce(ds.txt2img, over, "mean")
        np.testing.assert_allclose(got.values, maps.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(
        analysis.reduce(ds.txt2img, "step", "median").values, np.median(maps, axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        analysis.reduce(ds.txt2img, "layer", "max").values, maps.max(axis=1), rtol=0
    )
    with pytest.raises(analysis.SelectionError, match=r"cannot reduce over \['colour'\]"):
        analysis.reduce(ds.txt2img, "colour")
    with pytest.raises(analysis.SelectionError, match=r"unknown reduction 'mode'.*mean"):
        analysis.reduce(ds.txt2img, "step", "mode")
