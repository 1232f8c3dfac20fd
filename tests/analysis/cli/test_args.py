"""Shared arguments of the verbs: stores as paths or fsspec URLs, with `--storage-option`."""

from __future__ import annotations

import argparse
import uuid

import fsspec
import pytest

from analysis.cli.args import integers, names, positive, storage_options
from analysis.errors import UsageError


def test_urls_and_storage_options(store, tmp_path, capsys, run_cli):
    path, _ = store
    fs = fsspec.filesystem("memory")
    name = f"/cli-{uuid.uuid4().hex}.zarr"
    fs.put(str(path), name, recursive=True)
    try:
        argv = ["heatmap", f"memory://{name}", "--span", "cat", "-o", tmp_path / "m.png", "-q"]
        status, _, err = run_cli(*argv, "--storage-option", "skip_instance_cache=true")
        assert status == 0, err
    finally:
        fs.rm(name, recursive=True)
    status, _, err = run_cli("info", path, "--storage-option", "oops")
    assert status == 2 and "KEY=VALUE" in err


@pytest.mark.parametrize(
    ("text", "values"),
    [("3", [3]), ("0,3,5", [0, 3, 5]), ("0:3", [0, 1, 2, 3]), ("0,4:6", [0, 4, 5, 6])],
)
def test_integers_take_lists_and_inclusive_ranges(text, values):
    assert integers(text) == values


@pytest.mark.parametrize("text", ["", "a", "1:x", "1.5"])
def test_integers_refuse_what_is_not_integers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected integers and inclusive A:B"):
        integers(text)


def test_positive_numbers_and_names():
    assert positive(int)("4") == 4 and positive(float)("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a positive"):
            positive(float)(bad)
    assert names(" txt2img, img2txt ,") == ["txt2img", "img2txt"]


def test_storage_options_read_json_values_and_refuse_bare_keys():
    assert storage_options(["anon=true", "endpoint_url=http://x:9000", "n=3"]) == {
        "anon": True,
        "endpoint_url": "http://x:9000",
        "n": 3,
    }
    assert storage_options([]) is None
    with pytest.raises(UsageError, match="KEY=VALUE"):
        storage_options(["=3"])
