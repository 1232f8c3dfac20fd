"""Trace stores as the tracer opens them for writing: created, appended to, never foreign."""

from __future__ import annotations

import pytest
import zarr

from analysis import store_format as sf
from tracer.store import open_store


def test_a_new_store_carries_the_format_version(tmp_path):
    root = open_store(str(tmp_path / "new.zarr"))
    assert dict(root.attrs) == {sf.FORMAT_ATTR: sf.FORMAT_VERSION}


def test_a_format_1_store_is_read_but_never_appended_to(tmp_path):
    path = tmp_path / "old.zarr"
    zarr.open_group(path, mode="w").attrs[sf.FORMAT_ATTR] = 1
    with pytest.raises(sf.FormatError, match="format version 1, which this attnscope reads but"):
        open_store(str(path))


def test_a_zarr_group_that_is_no_trace_is_never_written_into(tmp_path):
    path = tmp_path / "other.zarr"
    zarr.open_group(path, mode="w").attrs["owner"] = "someone else"
    with pytest.raises(sf.FormatError, match="is not an attnscope trace"):
        open_store(str(path))
    assert dict(zarr.open_group(path, mode="r").attrs) == {"owner": "someone else"}
