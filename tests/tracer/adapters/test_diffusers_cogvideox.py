"""diffusers CogVideoX: T5 text, then the video tokens, in one joint softmax; a frame axis."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
import xarray as xr
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from tracer.demo_cogvideox import demo_cogvideox_pipeline

TEXT_LEN = 20
NUM_FRAMES = family_kit.VIDEO_FRAMES
GRID = family_kit.VIDEO_GRID
PROMPT = family_kit.PROMPT


@pytest.fixture(scope="module")
def pipe():
    return demo_cogvideox_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate_video(pipe, seed=seed, max_sequence_length=TEXT_LEN, **kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0], ids=["unguided", "guided batch"])
def test_store_equals_float64_softmax_for_every_step_layer_head_and_frame(
    pipe, tmp_path, monkeypatch, guidance_scale
):
    n_video = int(np.prod(GRID))
    log = SdpaLog(TEXT_LEN + n_video)
    log.install(monkeypatch)
    path = tmp_path / "cogvideox.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=guidance_scale)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "CogVideoXPipeline" and ds.attrs["text_len"] == TEXT_LEN
    assert list(ds.layer_kind.values) == ["single", "single"]
    for direction in ("txt2img_tokens", "img2txt_tokens"):
        assert ds[direction].dims == ("step", "layer", "head", "token", "frame", "y", "x")
        assert ds[direction].shape[-3:] == GRID
    guided = guidance_scale > 1
    assert {q.shape[0] for q, *_ in log.calls} == {2 if guided else 1}
    text, video = range(TEXT_LEN), range(TEXT_LEN, TEXT_LEN + n_video)
    assert_rows_match_float64(ds, log.calls, text, video, batch=1 if guided else 0)


def test_frames_read_alike_through_plain_xarray(pipe, tmp_path):
    path = tmp_path / "cogvideox.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    plain = xr.open_zarr(path, group=rec.last_run, consolidated=False)
    assert plain.frame.values.tolist() == [0, 1]
    assert plain.attrs["num_frames"] == NUM_FRAMES and plain.attrs["temporal_compression"] == 4
    assert plain.image.shape == (GRID[1] * 16, GRID[2] * 16, 3)  # the first frame
    # Each text query's softmax runs over text and video keys: its video part sums below 1.
    video_mass = plain.txt2img.isel(token=1).sum(["frame", "y", "x"]).values
    assert np.all((video_mass > 0) & (video_mass < 1))


def test_output_is_bit_for_bit_unchanged_with_guidance(pipe, tmp_path):
    plain = generate(pipe, seed=9, guidance_scale=6.0).frames
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=9, guidance_scale=6.0).frames
    assert np.array_equal(plain, traced)
