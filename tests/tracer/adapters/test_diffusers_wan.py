"""diffusers Wan: video queries against text keys (cross-attention), maps with a frame axis."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
import xarray as xr
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from analysis.cli import main
from analysis.errors import UnsupportedModelError
from tracer.demo_wan import demo_wan_pipeline

TEXT_LEN = 20  # unlike the 24 video tokens, so the self-attention is told apart
I2V_TEXT_LEN = 512  # what Wan's image-to-video attention takes the text to be
NUM_FRAMES = family_kit.VIDEO_FRAMES
GRID = family_kit.VIDEO_GRID
PROMPT = family_kit.PROMPT


@pytest.fixture(scope="module")
def pipe():
    return demo_wan_pipeline(seed=0)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate_video(pipe, seed=seed, max_sequence_length=TEXT_LEN, **kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["unguided", "guided"])
def test_img2txt_equals_float64_softmax_over_the_text_keys_per_frame(
    pipe, tmp_path, monkeypatch, guidance_scale
):
    log = SdpaLog(int(np.prod(GRID)), TEXT_LEN)  # video queries, text keys
    log.install(monkeypatch)
    path = tmp_path / "wan.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=guidance_scale)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "WanPipeline"
    assert list(ds.layer_kind.values) == ["cross", "cross"]
    assert ds.img2txt_tokens.dims == ("step", "layer", "head", "token", "frame", "y", "x")
    assert ds.img2txt_tokens.shape[-3:] == GRID
    # The unconditional branch is a second call per step; only the conditional is recorded.
    assert len(log.calls) == 3 * 2 * (2 if guidance_scale > 1 else 1)
    conditional = log.calls if guidance_scale == 1 else _first_of_each_pair(log.calls, 2)
    assert_rows_match_float64(ds, conditional)
    # UMT5's padding keys are zero states, unmasked: each video query's rows sum to 1.
    total = ds.img2txt_tokens.sum("token").values
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=5e-3)


def _first_of_each_pair(calls, n_layers):
    """The conditional calls of a run whose steps call the model twice, conditional first."""
    per_step = 2 * n_layers
    return [c for i, c in enumerate(calls) if i % per_step < n_layers]


def test_the_frame_axis_is_labelled_and_plain_xarray_reads_it(pipe, tmp_path):
    path = tmp_path / "wan.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    plain = xr.open_zarr(path, group=rec.last_run, consolidated=False)
    assert plain.img2txt.dims == ("step", "layer", "head", "token", "frame", "y", "x")
    assert plain.frame.values.tolist() == [0, 1]
    assert plain.attrs["num_frames"] == NUM_FRAMES
    assert plain.attrs["temporal_compression"] == 4
    assert "cross-attention" in plain.attrs["directions_absent"]["txt2img"]
    assert "txt2img" not in plain
    # A span view keeps the frame axis; one frame of it is an image model's map.
    ds = analysis.open_trace(path, rec.last_run, spans=["red chair"])
    assert ds.img2txt.dims == ("step", "layer", "head", "span", "frame", "y", "x")
    cat = plain.img2txt.isel(token=[4, 5]).sum("token")  # ▁red ▁chair: positions 4 and 5
    np.testing.assert_array_equal(ds.img2txt.sel(span="red chair").values, cat.values)


def test_output_is_bit_for_bit_unchanged(pipe, tmp_path):
    plain = generate(pipe, seed=6, guidance_scale=5.0).frames
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=6, guidance_scale=5.0).frames
    assert np.array_equal(plain, traced)


def test_cli_records_the_demo_and_draws_one_frame(tmp_path, capsys):
    path = tmp_path / "wan.zarr"
    argv = ["record", "--demo", "wan", "--out", str(path), "--prompt", PROMPT]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "frame 2" in out
    assert "2 latent frames, 5 video frames, 4 per latent frame" in out
    png = tmp_path / "cat.png"
    assert main(["heatmap", str(path), "--span", "cat", "--frame", "1", "-o", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["heatmap", str(path), "--span", "cat", "--frame", "2", "-o", str(png)]) != 0
    assert "frame" in capsys.readouterr().err


@pytest.fixture(scope="module")
def i2v():
    return demo_wan_pipeline(seed=0, image_to_video=True, max_sequence_length=I2V_TEXT_LEN)


def generate_i2v(pipe, seed=0, **kwargs):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), np.uint8))
    return family_kit.generate_video(
        pipe, seed=seed, image=image, max_sequence_length=I2V_TEXT_LEN, **kwargs
    )


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["unguided", "guided"])
def test_image_to_video_keeps_the_image_context_apart_from_the_text(
    i2v, tmp_path, monkeypatch, guidance_scale
):
    n_video, n_image = int(np.prod(GRID)), 5  # CLIP's 4 patches and its class token
    log = SdpaLog(n_video, n_image)  # the image context's softmax
    log.install(monkeypatch)
    text_log = SdpaLog(n_video, I2V_TEXT_LEN)  # the text's, in a softmax of its own
    text_log.install(monkeypatch)
    path = tmp_path / "wan-i2v.zarr"
    with tracer.trace(i2v, path, progress=False) as rec:
        generate_i2v(i2v, guidance_scale=guidance_scale)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "WanImageToVideoPipeline"
    assert ds.attrs["text_len"] == n_image + I2V_TEXT_LEN
    assert ds.attrs["segments"]["image"] == [0, n_image]
    image = ds.isel(token=0)
    assert str(image.token_segment.values) == "image" and int(image.token_count) == n_image
    # The image row is the whole of each video query's image-context softmax; the text rows
    # are the text's own softmax: each sums to 1 apart.
    np.testing.assert_allclose(image.img2txt_tokens.values, 1.0, atol=5e-3)
    text_rows = ds.img2txt_tokens.isel(token=slice(1, None)).sum("token").values
    np.testing.assert_allclose(text_rows, 1.0, atol=5e-3)
    # Every text row against a float64 softmax over the text keys alone.
    steps = 3 * (2 if guidance_scale > 1 else 1)
    assert len(text_log.calls) == steps * 2 and len(log.calls) == steps * 2
    conditional = text_log.calls if guidance_scale == 1 else _first_of_each_pair(text_log.calls, 2)
    text = ds.isel(token=slice(1, None))
    text.attrs["text_len"] = I2V_TEXT_LEN
    text = text.assign_coords(token=text.token - n_image)
    assert_rows_match_float64(text, conditional)


def test_image_to_video_output_is_bit_for_bit_unchanged(i2v, tmp_path):
    plain = generate_i2v(i2v, seed=3, guidance_scale=5.0).frames
    with tracer.trace(i2v, tmp_path / "t.zarr", progress=False):
        traced = generate_i2v(i2v, seed=3, guidance_scale=5.0).frames
    assert np.array_equal(plain, traced)


def test_two_expert_pipelines_are_refused_by_name(tmp_path):
    path = tmp_path / "never.zarr"
    two = demo_wan_pipeline(seed=0)
    two.transformer_2 = two.transformer
    with pytest.raises(UnsupportedModelError, match="transformer_2"), tracer.trace(two, path):
        pass
    assert not path.exists()
