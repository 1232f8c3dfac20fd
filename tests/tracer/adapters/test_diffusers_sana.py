"""diffusers Sana: cross-attention only, so img2txt only, and the store says why."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
import torch
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from analysis.cli import main
from analysis.errors import UsageError
from tracer.demo_sana import demo_sana_pipeline

TEXT_LEN = 24
GRID = (6, 8)  # 192 x 256 pixels: the DC autoencoder's factor 32, 1x1 patches
PIXELS = 32


@pytest.fixture(scope="module")
def pipe():
    return demo_sana_pipeline(seed=0)


def generate(pipe, seed=0, **kwargs):
    return pipe(
        prompt=kwargs.pop("prompt", family_kit.PROMPT),
        height=GRID[0] * PIXELS,
        width=GRID[1] * PIXELS,
        num_inference_steps=3,
        max_sequence_length=TEXT_LEN,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["unguided", "guided batch"])
def test_img2txt_equals_float64_softmax_over_the_text_keys(
    pipe, tmp_path, monkeypatch, guidance_scale
):
    log = SdpaLog(GRID[0] * GRID[1], TEXT_LEN)  # image queries, text keys
    log.install(monkeypatch)
    path = tmp_path / "sana.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=guidance_scale)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "SanaPipeline"
    assert list(ds.layer_kind.values) == ["cross", "cross"]
    assert ds.img2txt_tokens.shape[:3] == (3, 2, 4) and ds.img2txt_tokens.shape[-2:] == GRID
    guided = guidance_scale > 1
    assert {q.shape[0] for q, *_ in log.calls} == {2 if guided else 1}
    assert_rows_match_float64(ds, log.calls, batch=1 if guided else 0)
    # The padding is masked (an additive -10000): no image token attends it at all.
    padding = ds.isel(token=-1)
    assert bool(padding.token_padding)
    assert not np.any(padding.img2txt_tokens.values)


def test_the_store_says_txt2img_does_not_exist(pipe, tmp_path, capsys):
    path = tmp_path / "sana.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    assert "txt2img" not in ds and "img2txt" in ds
    assert ds.attrs["capture"]["directions"] == ["img2txt"]
    assert "cross-attention" in ds.attrs["directions_absent"]["txt2img"]
    # Cross-attention maps need no kernel normaliser: the model's kernel runs as it calls it.
    assert ds.attrs["lse_used"] == {"kernel": 0, "recompute": 3 * 2}
    png = tmp_path / "cat.png"
    assert main(["heatmap", str(path), "--span", "cat", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "no txt2img  Sana's text enters through cross-attention" in capsys.readouterr().out
    argv = ["heatmap", str(path), "--span", "cat", "--direction", "txt2img", "--out", str(png)]
    assert main(argv) != 0
    assert "no 'txt2img' maps (the model has none: Sana's text enters" in capsys.readouterr().err


def test_asking_for_txt2img_alone_is_refused_before_a_store_exists(pipe, tmp_path):
    path = tmp_path / "never.zarr"
    with (
        pytest.raises(UsageError, match="no txt2img: Sana's text enters through cross-attention"),
        tracer.trace(pipe, path, directions=["txt2img"]),
    ):
        pass
    assert not path.exists()


def test_text_rows_are_the_tokens_the_text_encoder_read(pipe, tmp_path):
    # The pipeline's own instruction comes first; the encoder's input, read at its forward, is
    # the independent reference for which tokens the kept positions hold.
    read = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(
            kwargs.get("input_ids", args[0] if args else None)
        ),
        with_kwargs=True,
    )
    try:
        path = tmp_path / "sana.zarr"
        with tracer.trace(pipe, path, progress=False) as rec:
            generate(pipe, guidance_scale=1.0, prompt="A Cat on a red chair")
    finally:
        hook.remove()
    ids = read[0][0].tolist()
    kept = [ids[0], *ids[-(TEXT_LEN - 1) :]]
    expected = pipe.tokenizer.convert_ids_to_tokens(kept)
    ds = analysis.open_trace(path, rec.last_run)
    stored = ds.token_text.values[~ds.token_padding.values].tolist()
    assert stored == [t for t in expected if t != "<pad>"]
    assert ds.attrs["spans"]["cat"] == [expected.index("▁cat")]  # lower-cased, as read
    assert len(ids) > TEXT_LEN  # the instruction was there, and dropped but for its tail


def test_output_is_bit_for_bit_unchanged(pipe, tmp_path):
    plain = generate(pipe, seed=6, guidance_scale=4.5).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=6, guidance_scale=4.5).images
    assert np.array_equal(plain, traced)
