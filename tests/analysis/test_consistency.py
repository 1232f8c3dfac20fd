"""One consistency check: what `open_trace` refuses, `verify` reports in the same words."""

from __future__ import annotations

import json
import shutil

import pytest
from synthetic_trace import Run

import analysis
from analysis import store_format as sf
from analysis.verify import verify


def test_a_recording_run_without_img2txt_is_refused_and_reported_alike(make_store):
    # The case that used to disagree: verify said "0 errors, 0 notes", heatmap refused it.
    path, _ = make_store(Run(status=sf.RECORDING, complete=[]))
    run = path / "run-0000"
    shutil.rmtree(run / "img2txt")
    meta = json.loads((run / "zarr.json").read_text())
    meta["attributes"][sf.CAPTURE] = {sf.DIRECTIONS_KEY: list(sf.DIRECTIONS)}
    (run / "zarr.json").write_text(json.dumps(meta))

    report = verify(path)
    [finding] = [f for f in report.findings if "lacks arrays" in f.message]
    assert finding.blocks_reading and finding.where == "run-0000"
    assert "(img2txt)" in finding.message
    with pytest.raises(analysis.FormatError) as refused:
        analysis.open_trace(path, complete_only=False)
    assert finding.message in str(refused.value)


def test_a_coordinate_disagreeing_with_the_capture_settings_is_an_error_in_both(make_store):
    path, _ = make_store(Run())
    run = path / "run-0000"
    meta = json.loads((run / "zarr.json").read_text())
    meta["attributes"][sf.CAPTURE] = {sf.HEADS: [0, 1, 5]}
    (run / "zarr.json").write_text(json.dumps(meta))

    report = verify(path)
    [finding] = [f for f in report.errors if "capture settings" in f.message]
    with pytest.raises(analysis.FormatError, match="the store is damaged") as refused:
        analysis.open_trace(path)
    assert finding.message in str(refused.value)


def test_keepbits_read_back_from_the_metadata_is_what_was_asked(make_store):
    import zarr

    for keepbits in (None, 3, 9):
        path, _ = make_store(Run(keepbits=keepbits))
        group = zarr.open_group(path, path="run-0000", mode="r")
        with sf.quiet_zarr():
            assert sf.keepbits_of(group["txt2img"]) == keepbits
