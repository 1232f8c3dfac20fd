"""open_trace: runs, lazy dask arrays, format version, partial runs, bad paths, fsspec URLs."""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import dask.array
import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
from synthetic_trace import Run

import analysis
import analysis.open as analysis_open
from analysis import store_format as sf


def test_open_gives_the_run_lazily_with_the_format_dims(store):
    path, expected = store
    ds = analysis.open_trace(path)
    assert ds.attrs["run"] == "run-0000"
    rows = analysis.open_trace(path, tokens=True)
    for name in sf.DIRECTIONS:
        da = ds[name]
        assert da.dims == sf.SPAN_DIMS
        assert isinstance(da.data, dask.array.Array)
        # Whole stored chunks (maps of all heads), all 7 token rows of a step together, so each
        # is read once for every span; here all 5 layers fit in one dask chunk.
        assert rows[name].dims == sf.DIMS
        assert rows[name].data.chunksize == (1, 5, 3, 7, 6, 10)
        # Spans read each token row on its own (here all 5 layers fit in a chunk either way).
        assert da.data.chunks[:3] == rows[name].data.chunks[:3]
        assert da.data.chunks[4:] == rows[name].data.chunks[4:]
        assert sum(da.data.chunks[3]) == ds.sizes["span"]
        np.testing.assert_array_equal(da.values, expected[name])
    assert ds.sizes["y"] == 6 and ds.sizes["x"] == 10
    assert list(ds.layer_kind.values) == ["double"] * 2 + ["single"] * 3
    np.testing.assert_allclose(ds.timestep.values, [1000, 750, 500, 250])
    assert ds.attrs["spans"]["cat"] == [1]
    assert ds.image.dims == sf.IMAGE_DIMS


def test_dask_chunks_follow_the_size_budget_or_the_caller(store, monkeypatch):
    # The token rows are read all rows at once, as many layers as fit in CHUNK_BYTES; a span's
    # rows one row at a time, as many layers as fit in ROW_CHUNK_BYTES; chunks the caller
    # names, everywhere.
    path, expected = store
    layer_bytes = 3 * 6 * 10 * 4  # all heads of one map
    monkeypatch.setattr(analysis_open, "CHUNK_BYTES", 2 * 7 * layer_bytes + 1)  # 7 token rows
    monkeypatch.setattr(analysis_open, "ROW_CHUNK_BYTES", 4 * layer_bytes + 1)
    ds = analysis.open_trace(path)
    assert ds.txt2img_tokens.data.chunks[1] == (2, 2, 1)
    assert ds.txt2img.data.chunks[1] == (4, 1)
    np.testing.assert_array_equal(ds.txt2img.values, expected["txt2img"])
    with warnings.catch_warnings():
        # Whole stored chunks of the maps, and the small 1-D coordinates are read whole: no
        # warning that the chunks split stored ones.
        warnings.simplefilter("error", UserWarning)
        finer = analysis.open_trace(path, chunks={"layer": 1, "step": 2})
    assert finer.img2txt.data.chunksize == (2, 1, 3, 1, 6, 10)
    assert finer.img2txt_tokens.data.chunksize == (2, 1, 3, 1, 6, 10)


def test_latest_run_by_default_and_any_run_by_name_or_index(make_store):
    path, expected = make_store(Run(seed=1), Run(seed=2, grid=(4, 7), heads=2))
    latest = analysis.open_trace(path)
    assert latest.attrs["run"] == "run-0001"
    assert (latest.sizes["y"], latest.sizes["x"]) == (4, 7)
    np.testing.assert_array_equal(latest.txt2img.values, expected["run-0001"]["txt2img"])
    for run in (0, "0", "run-0000"):
        first = analysis.open_trace(path, run=run)
        np.testing.assert_array_equal(first.img2txt.values, expected["run-0000"]["img2txt"])
    runs = analysis.list_runs(path)
    assert [r.name for r in runs] == ["run-0000", "run-0001"]
    assert all(r.is_complete for r in runs)


def test_unknown_run_lists_the_runs(make_store):
    path, _ = make_store(Run(), Run(status=sf.RECORDING, complete=[0]))
    with pytest.raises(analysis.SelectionError) as err:
        analysis.open_trace(path, run="run-0007")
    message = str(err.value)
    assert "run-0007" in message
    assert "run-0000 (complete)" in message and "run-0001 (recording)" in message


def test_a_store_of_an_unknown_format_version_is_refused(make_store):
    path, _ = make_store(Run(), version=sf.FORMAT_VERSION + 1)
    with pytest.raises(analysis.FormatError, match=f"version {sf.FORMAT_VERSION + 1}"):
        analysis.open_trace(path)


def test_paths_that_are_not_traces_say_what_is_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.open_trace(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(analysis.FormatError, match="no Zarr group"):
        analysis.open_trace(tmp_path / "empty")
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    plain.attrs["title"] = "something else"
    with pytest.raises(analysis.FormatError, match=r"attnscope_format.*title"):
        analysis.open_trace(tmp_path / "plain.zarr")
    no_runs = zarr.open_group(tmp_path / "noruns.zarr", mode="w")
    no_runs.attrs[sf.FORMAT_ATTR] = sf.FORMAT_VERSION
    no_runs.create_group("notes")
    with pytest.raises(analysis.FormatError, match=r"no runs.*notes"):
        analysis.open_trace(tmp_path / "noruns.zarr")
    zarr.create_array(tmp_path / "array.zarr", shape=(2,), dtype="f4")
    with pytest.raises(analysis.FormatError, match="no Zarr group"):
        analysis.open_trace(tmp_path / "array.zarr")


def test_a_partial_run_warns_with_the_missing_steps_and_uses_the_complete_ones(make_store):
    # Step 3 is written but not yet listed complete (mid-write): it must not be used either.
    run = Run(steps=5, status=sf.RECORDING, complete=[0, 1, 2], written=[0, 1, 2, 3])
    path, expected = make_store(run)
    maps = expected["run-0000"]["txt2img"]
    with pytest.warns(analysis.PartialRunWarning) as caught:
        ds = analysis.open_trace(path)
    message = str(caught[0].message)
    assert "still recording" in message and "steps 3, 4 are missing" in message
    assert list(ds.step.values) == [0, 1, 2]
    np.testing.assert_array_equal(ds.txt2img.values, maps[:3])
    with pytest.warns(
        analysis.PartialRunWarning, match=r"steps 3, 4 are not complete \(unwritten maps read NaN\)"
    ):
        everything = analysis.open_trace(path, complete_only=False)
    assert list(everything.step.values) == [0, 1, 2, 3, 4]
    assert np.isnan(everything.txt2img.isel(step=4).values).all()
    assert not np.isnan(everything.txt2img.isel(step=3).values).any()


def test_a_failed_run_warns_with_its_reason(make_store):
    path, _ = make_store(Run(status=sf.failed("CUDA out of memory"), complete=[0, 1]))
    with pytest.warns(analysis.PartialRunWarning, match="failed: CUDA out of memory"):
        ds = analysis.open_trace(path)
    assert list(ds.step.values) == [0, 1]


def test_a_run_with_no_complete_step_is_an_error(make_store):
    path, _ = make_store(Run(status=sf.RECORDING, complete=[]))
    with pytest.raises(analysis.SelectionError, match="no complete step"):
        analysis.open_trace(path)


def test_opening_and_building_reductions_reads_no_map(store, tmp_path):
    path, _ = store
    # Overwrite every stored shard of the maps with garbage: a reader that touched one while
    # opening or building a graph would fail there; computing must report the corruption.
    shards = [p for name in sf.DIRECTIONS for p in (Path(path) / "run-0000" / name).rglob("c/**/*")]
    shards = [p for p in shards if p.is_file()]
    assert shards
    for shard in shards:
        shard.write_bytes(b"\x00garbage" * 64)
    ds = analysis.open_trace(path)
    mean = ds.txt2img.sel(span="cat").mean(["step", "layer"])
    sim = analysis.head_similarity(ds.img2txt.sel(span="cat"))
    with pytest.raises(Exception, match=r"(?i)checksum|crc|shard|index|decod|corrupt"):
        mean.compute()
    with pytest.raises(Exception, match=r"(?i)checksum|crc|shard|index|decod|corrupt"):
        sim.compute()


@pytest.fixture
def memory_store(store):
    path, expected = store
    fs = fsspec.filesystem("memory")
    name = f"/trace-{uuid.uuid4().hex}.zarr"
    fs.put(str(path), name, recursive=True)
    yield f"memory://{name}", expected
    fs.rm(name, recursive=True)


def test_fsspec_memory_and_file_urls(memory_store, store):
    url, expected = memory_store
    ds = analysis.open_trace(url)
    np.testing.assert_array_equal(ds.txt2img.values, expected["txt2img"])
    local = analysis.open_trace(Path(store[0]).resolve().as_uri())
    np.testing.assert_array_equal(local.img2txt.values, expected["img2txt"])


def test_storage_options_apply_to_urls_only(store):
    with pytest.raises(ValueError, match="fsspec URLs only"):
        analysis.open_trace(store[0], storage_options={"anon": True})


def test_the_dataset_matches_plain_xarray(store):
    path, _ = store
    ours = analysis.open_trace(path, tokens=True)
    plain = xr.open_zarr(str(path), group="run-0000", consolidated=False)
    xr.testing.assert_identical(
        ours.txt2img.reset_coords(drop=True), plain.txt2img.reset_coords(drop=True)
    )


def _checked(ds: xr.Dataset) -> analysis.trust.CheckedArray:
    data = ds.txt2img.data
    checked = [v for v in data.dask.values() if isinstance(v, analysis.trust.CheckedArray)]
    assert len(checked) == 1
    return checked[0]


def test_maps_are_read_through_readers_that_check_every_chunk(store):
    """A local folder's maps are read through TensorStore, a URL's through zarr-python's own
    pipeline: both check every chunk's CRC32C on a partial read of a shard (zarrs, which writes
    them, does not: see test_verify). Both read what plain zarr reads."""
    path, _ = store
    local = _checked(analysis.open_trace(path, tokens=True))
    assert isinstance(local.reader, analysis.tensorstore_reader.TensorStoreReader)
    url = _checked(analysis.open_trace(path.as_uri(), tokens=True))
    assert url.reader is None
    assert type(url.array._async_array.codec_pipeline).__name__ == "BatchedCodecPipeline"
    plain = zarr.open_group(path, path="run-0000", mode="r")["txt2img"]
    key = (slice(1, 3), 0, slice(None), slice(0, 2))
    np.testing.assert_array_equal(local[key], plain[key])
    assert local.reader.opens()  # the values above came through TensorStore
    np.testing.assert_array_equal(url[key], plain[key])


def test_a_span_s_question_reads_only_its_rows(store, monkeypatch):
    """A span reads only its own token rows, whatever other spans the view holds; a view of
    that span alone reads only the map selected from it; the prompt's rows, shared with its
    words' spans, are read once for all of them."""
    path, expected = store
    reads: list[tuple[int, ...]] = []
    read = analysis.trust.CheckedArray.__getitem__

    def counted(self, key):
        out = read(self, key)
        if self.ndim == len(sf.DIMS):
            reads.append(out.shape)
        return out

    monkeypatch.setattr(analysis.trust.CheckedArray, "__getitem__", counted)
    ds = analysis.open_trace(path)
    cat = list(ds.span.values).index("cat")
    one = ds.txt2img.sel(span="cat").isel(step=1, layer=2, head=0).values
    np.testing.assert_array_equal(one, expected["txt2img"][1, 2, 0, cat])
    # The row at that step (dask reads a chunk whole through the spans' concatenation)...
    assert [int(np.prod(shape)) for shape in reads] == [5 * 3 * 6 * 10]
    reads.clear()
    alone = analysis.open_trace(path, spans="cat")
    np.testing.assert_array_equal(alone.txt2img.isel(step=1, layer=2, head=0, span=0).values, one)
    assert [int(np.prod(shape)) for shape in reads] == [6 * 10]  # ... or the one map
    reads.clear()
    mean = ds.txt2img.sel(span="cat").mean(["step", "layer", "head"]).values
    np.testing.assert_allclose(
        mean, expected["txt2img"][:, :, :, cat].mean(axis=(0, 1, 2)), rtol=1e-6
    )
    assert sum(int(np.prod(shape)) for shape in reads) == 4 * 5 * 3 * 6 * 10  # the row, once
    reads.clear()
    ds.txt2img.values  # noqa: B018
    # The prompt's six rows (the words' spans among them), each step, once each; not the
    # padding row, which no span holds.
    assert sum(int(np.prod(shape)) for shape in reads) == 6 * 4 * 5 * 3 * 6 * 10


def test_a_view_of_rows_reads_what_the_same_index_of_the_rows_reads(store):
    path, _ = store
    plain = zarr.open_group(path, path="run-0000", mode="r")["txt2img"]
    view = analysis.trust.RowView(analysis.trust.CheckedArray(plain, "txt2img"), 3, 2, 5)
    rows = plain[:, :, :, 2:5]
    assert view.shape == rows.shape and view.dtype == rows.dtype
    keys = [
        (1, slice(0, 3), slice(None), 1),
        (Ellipsis, 2, slice(None), slice(None)),
        (slice(None), 0, 0, slice(None, None, 2)),
        (slice(None), 0, 0, slice(None, None, -1)),
        (slice(None), 0, 0, [2, 0]),
        (slice(None), 0, 0, np.array([True, False, True])),
        (0, 0, 0, -1),
        2,
    ]
    for key in keys:
        np.testing.assert_array_equal(view[key], rows[key], err_msg=repr(key))
    with pytest.raises(IndexError, match="index 3 is out of bounds for 3 positions"):
        view[0, 0, 0, 3]


def test_one_map_is_read_without_importing_tensorstore(store):
    """A read within one stored chunk (one map, as the CLI and viewer draw) goes through
    zarr-python, sparing TensorStore's half-second import; a read of several goes through it."""
    path, _ = store
    script = (
        "import sys, analysis\n"
        f"ds = analysis.open_trace({str(path)!r}, tokens=True)\n"
        "ds.txt2img.isel(step=1, layer=0, token=2).values\n"
        "print('tensorstore' in sys.modules)\n"
        "ds.txt2img.isel(step=1, layer=0).values\n"
        "print('tensorstore' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_maps_stored_with_the_old_bitround_filter_read_through_zarr_python(make_store):
    """Version-1 stores named their rounding as a `numcodecs.bitround` filter, which TensorStore
    does not read: zarr-python reads them, the same values."""
    path, expected = make_store(Run(keepbits=9), version=1)
    ds = analysis.open_trace(path)
    checked = _checked(ds)
    np.testing.assert_array_equal(ds.txt2img.values, expected["run-0000"]["txt2img"])
    assert not checked.reader.opens()
