"""`attnscope heatmap`, `heads` and `steps`: what they select, reduce and draw."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image
from synthetic_trace import Run

import analysis.cli.figures
from analysis import store_format as sf


@pytest.fixture
def captured(monkeypatch):
    """What the CLI hands to the plotting functions."""
    calls: dict[str, list] = {}

    def spy(name):
        real = getattr(analysis.cli.figures, name)

        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(analysis.cli.figures, name, wrapper)

    for name in ("heatmap", "overlay", "grid", "similarity_matrix", "drift_curve", "animate"):
        spy(name)
    return calls


def test_heatmap_reduces_what_it_is_told(store, tmp_path, capsys, captured, run_cli):
    path, expected = store
    out = tmp_path / "cat.png"
    argv = ["heatmap", path, "--span", "cat", "--head", "2", "--reduce", "mean"]
    status, stdout, err = run_cli(*argv, "--over", "step,layer", "-o", out)
    assert status == 0, err
    assert stdout.strip() == str(out) and out.stat().st_size > 0
    (m, _), kwargs = captured["heatmap"][0]
    np.testing.assert_allclose(
        m.values, expected["txt2img"][:, :, 2, 1].mean(axis=(0, 1)), rtol=1e-6
    )
    assert kwargs["title"] == "txt2img · span 'cat' · layer: mean of 5 · head 2 · step: mean of 4"

    # Ranges, lists, kinds, another direction and reduction; --over defaults to what is left.
    argv = ["heatmap", path, "--direction", "img2txt", "--span", "mat", "--step", "1:2"]
    argv += ["--layer", "single:*", "--head", "0,2", "--reduce", "max", "-o", out, "-q"]
    status, _, err = run_cli(*argv)
    assert status == 0, err
    (m, _), _ = captured["heatmap"][1]
    want = expected["img2txt"][1:3, 2:][:, :, [0, 2], 2].max(axis=(0, 1, 2))
    np.testing.assert_allclose(m.values, want, rtol=1e-6)

    status, _, err = run_cli("heatmap", path, "--span", "cat", "--overlay", "-o", out)
    assert status == 0, err
    (m, image, _), _ = captured["overlay"][0]
    np.testing.assert_allclose(
        m.values, expected["txt2img"][:, :, :, 1].mean(axis=(0, 1, 2)), rtol=1e-6
    )
    assert image.dims == sf.IMAGE_DIMS


def test_heads_draws_the_grid_and_the_similarity(store, tmp_path, capsys, captured, run_cli):
    path, expected = store
    out = tmp_path / "heads.png"
    argv = ["heads", path, "--span", "cat", "--layer", "transformer_blocks.1", "--metric", "js"]
    status, stdout, err = run_cli(*argv, "-o", out)
    assert status == 0, err
    assert stdout.split() == [str(out), str(tmp_path / "heads-similarity.png")]
    (maps,), kwargs = captured["grid"][0][0][:1], captured["grid"][0][1]
    assert kwargs["col"] == "head"
    np.testing.assert_allclose(maps.values, expected["txt2img"][:, 1, :, 1].mean(axis=0), rtol=1e-6)
    (sim, _), _ = captured["similarity_matrix"][0]
    assert sim.dims == ("head", "head2") and sim.attrs["metric"] == "js"
    for png in (out, tmp_path / "heads-similarity.png"):
        with Image.open(png) as image:
            assert min(image.size) > 100


def test_steps_draws_the_grid_the_drift_and_a_gif(store, tmp_path, capsys, captured, run_cli):
    path, _ = store
    out = tmp_path / "steps.png"
    argv = ["steps", path, "--span", "cat", "--layer", "single:*", "--metric", "tv"]
    status, stdout, err = run_cli(*argv, "--gif", "-o", out)
    assert status == 0, err
    written = [out, tmp_path / "steps-drift.png", tmp_path / "steps.gif"]
    assert stdout.split() == [str(p) for p in written]
    assert all(p.stat().st_size > 0 for p in written)
    (drift, _), _ = captured["drift_curve"][0]
    assert drift.attrs["metric"] == "tv" and drift.sizes["step"] == 4
    with Image.open(tmp_path / "steps.gif") as gif:
        assert gif.n_frames == 4
    gif = tmp_path / "elsewhere.gif"
    status, stdout, err = run_cli(*argv, "--reference", "previous", "--gif", gif, "-o", out)
    assert status == 0, err
    assert gif.exists()


def test_a_phrase_or_a_token_range_is_a_span_when_reading(
    store, tmp_path, capsys, captured, run_cli
):
    path, _ = store
    rows = zarr.open_group(path, path="run-0000", mode="r")["txt2img"][...].astype(np.float64)
    out = tmp_path / "x.png"
    for span, positions in (("cat on", [1, 2]), ("1:3", [1, 2]), ("cat,mat", [1, 4])):
        status, _, err = run_cli("heatmap", path, "--span", span, "--head", "0", "-o", out)
        assert status == 0, err
        (m, _), _ = captured["heatmap"][-1]
        want = rows[:, :, 0][:, :, positions].mean(axis=(0, 1, 2))
        np.testing.assert_allclose(m.values, want, rtol=1e-6)
    status, _, err = run_cli("heatmap", path, "--span", "3:8", "-o", out)
    assert status == 2 and "keep_tokens=(6, 10)" in err


def test_an_unknown_span_exits_non_zero_listing_the_spans(store, tmp_path, capsys, run_cli):
    path, _ = store
    status, _, err = run_cli("heatmap", path, "--span", "kat", "-o", tmp_path / "x.png")
    assert status != 0
    assert "unknown span 'kat'" in err and "prompt, cat, mat" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["heatmap", "--head", "9"], ["head 9 is out of range: head must be in 0..2"]),
        (["heatmap", "--layer", "single:9"], ["matches nothing", "single_transformer_blocks.0..2"]),
        (["heatmap", "--over", "step"], ["still has layer (5), head (3)"]),
        (["heatmap", "--run", "run-0004"], ["unknown run 'run-0004'", "run-0000 (complete)"]),
        (["heads", "--head", "1"], ["select at least two"]),
        (["steps", "--step", "2"], ["select at least two"]),
    ],
)
def test_bad_selections_exit_non_zero_naming_what_exists(
    store, tmp_path, capsys, argv, words, run_cli
):
    path, _ = store
    verb, *rest = argv
    status, _, err = run_cli(verb, path, "--span", "cat", *rest, "-o", tmp_path / "x.png")
    assert status == 2
    for word in words:
        assert word in err


def test_a_partial_run_warns_on_stderr_and_draws_its_complete_steps(
    make_store, tmp_path, capsys, run_cli
):
    path, _ = make_store(Run(status=sf.RECORDING, complete=[0, 1]))
    out = tmp_path / "s.png"
    status, _, err = run_cli("steps", path, "--span", "cat", "-o", out, "-q")
    assert status == 0
    assert "attnscope: warning: run-0000" in err and "steps 2, 3 are missing" in err


def test_the_maps_a_cache_hook_skipped_are_left_out_of_a_reduction(
    store, tmp_path, captured, run_cli
):
    """Skipped maps read NaN: the CLI's mean skips them (and only there may it not look)."""
    path, expected = store
    group = zarr.open_group(path, path="run-0000", mode="r+")
    for name in sf.DIRECTIONS:
        group[name][1, 3] = np.nan  # step 1, layer single_transformer_blocks.1
    group.attrs[sf.SKIPPED] = [[1, "single_transformer_blocks.1"]]
    out = tmp_path / "cat.png"
    for verb in ("heatmap", "heads"):
        status, _, err = run_cli(verb, path, "--span", "cat", "-o", out, "-q")
        assert status == 0, err
    maps = expected["txt2img"][:, :, :, 1].copy()  # step, layer, head, y, x
    maps[1, 3] = np.nan
    (m, _), _ = captured["heatmap"][0]
    np.testing.assert_allclose(m.values, np.nanmean(maps, axis=(0, 1, 2)), rtol=1e-6)
    (grid_maps,), _ = captured["grid"][0]
    np.testing.assert_allclose(grid_maps.values, np.nanmean(maps, axis=(0, 1)), rtol=1e-6)


def test_frames_draws_frames_by_steps_and_animates_the_frames(
    make_store, tmp_path, captured, run_cli
):
    import imageio.v3 as iio

    path, expected = make_store(Run(frames=3))
    maps = expected["run-0000"]["txt2img"]  # (step, layer, head, span, frame, y, x)
    out = tmp_path / "frames.png"
    status, stdout, err = run_cli(
        "frames", path, "--span", "cat", "--head", "1", "--animation", tmp_path / "f.mp4", "-o", out
    )
    assert status == 0, err
    assert stdout.split() == [str(out), str(tmp_path / "f.mp4")]
    (grid,), kwargs = captured["grid"][0]
    assert (kwargs["row"], kwargs["col"]) == ("frame", "step")
    cat = list(Run().spans).index("cat")
    want = maps[:, :, 1, cat].astype(np.float64).mean(axis=1)  # (step, frame, y, x)
    np.testing.assert_allclose(
        grid.transpose("step", "frame", "y", "x").values, want, rtol=1e-6, atol=1e-7
    )
    video = iio.imread(tmp_path / "f.mp4")
    assert video.shape[0] == 3  # one video frame per latent frame
    # One step: the frames side by side, and a GIF over them.
    status, stdout, err = run_cli(
        "frames", path, "--span", "cat", "--step", "2", "--animation", tmp_path / "f.gif", "-o", out
    )
    assert status == 0, err
    with Image.open(tmp_path / "f.gif") as gif:
        assert gif.n_frames == 3
    # One frame of a heatmap, and the frame named in the title.
    status, _, err = run_cli("heatmap", path, "--span", "cat", "--frame", "2", "-o", out)
    assert status == 0, err
    (drawn, _), kwargs = captured["heatmap"][0]
    np.testing.assert_allclose(
        drawn.values, maps[:, :, :, cat, 2].astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-6
    )
    assert "frame 2" in kwargs["title"]


def test_frames_and_frame_are_refused_on_an_image_run(store, tmp_path, run_cli):
    path, _ = store
    out = tmp_path / "frames.png"
    status, _, err = run_cli("frames", path, "--span", "cat", "-o", out)
    assert status != 0 and "frames draws the latent frames of a video run" in err
    status, _, err = run_cli("heatmap", path, "--span", "cat", "--frame", "0", "-o", out)
    assert status != 0 and "has no frame axis (an image model's maps)" in err
    assert not out.exists()
