"""Figures: what they draw (values, grid shape, shared colour scales) and what they say."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.image import AxesImage
from PIL import Image
from synthetic_trace import Run

import analysis


@pytest.fixture
def trace(store):
    path, expected = store
    return analysis.open_trace(path), expected


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]


def mesh_values(ax) -> np.ndarray:
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    return np.asarray(meshes[0].get_array())


def test_heatmap_draws_the_map_on_its_grid_and_names_it(trace, tmp_path):
    ds, expected = trace
    m = ds.txt2img.sel(span="cat").mean(["step", "layer"])
    fig = analysis.heatmap(m.sel(head=2), path=tmp_path / "cat.png")
    ax = fig.axes[0]
    want = expected["txt2img"][:, :, 2, 1].mean(axis=(0, 1))
    np.testing.assert_allclose(mesh_values(ax).reshape(6, 10), want, rtol=1e-6)
    title = ax.get_title()
    for words in ("txt2img", "span 'cat'", "head 2", "layer: reduced", "step: reduced"):
        assert words in title
    assert "latent" in ax.get_xlabel() and "latent" in ax.get_ylabel()
    with Image.open(tmp_path / "cat.png") as png:
        width, height = png.size
    assert width > height  # a 6 × 10 grid is wider than tall


def test_a_map_reduced_by_analysis_reduce_says_how_in_its_title(trace):
    ds, expected = trace
    m = analysis.reduce(ds.txt2img.sel(span="cat", head=2), "step,layer", "max")
    title = analysis.heatmap(m).axes[0].get_title()
    assert "layer: max of 5" in title and "step: max of 4" in title
    want = expected["txt2img"][:, :, 2, 1].max(axis=(0, 1))
    np.testing.assert_allclose(m.values, want, rtol=1e-6)


def test_heatmap_keeps_the_aspect_of_a_tall_grid(make_store, tmp_path):
    path, _ = make_store(Run(grid=(12, 4), image_scale=None))
    ds = analysis.open_trace(path)
    fig = analysis.heatmap(
        ds.img2txt.isel(step=-1, layer=0, head=0).sel(span="mat"), path=tmp_path / "t.png"
    )
    ax = fig.axes[0]
    assert mesh_values(ax).size == 48
    box = ax.get_window_extent()
    assert box.height / box.width == pytest.approx(3.0, rel=0.05)  # square cells
    assert "step 3 (t=250)" in ax.get_title() and "layer transformer_blocks.0" in ax.get_title()


def test_heatmap_refuses_a_selection_with_dims_left(trace):
    ds, _ = trace
    with pytest.raises(analysis.SelectionError, match=r"still has head \(3\)"):
        analysis.heatmap(ds.txt2img.sel(span="cat").mean(["step", "layer"]))


def test_head_by_step_grid_shares_one_colour_scale(trace, tmp_path):
    ds, expected = trace
    da = ds.txt2img.sel(span="cat").mean("layer")
    fig = analysis.grid(da, row="head", col="step", path=tmp_path / "grid.png")
    drawn = panels(fig)
    assert len(drawn) == 12
    maps = expected["txt2img"][:, :, :, 1].mean(axis=1)  # step, head, y, x
    limits = {(p.collections[0].norm.vmin, p.collections[0].norm.vmax) for p in drawn}
    assert len(limits) == 1
    np.testing.assert_allclose(limits.pop(), (maps.min(), maps.max()), rtol=1e-6)
    first_row = drawn[:4]
    for step, ax in enumerate(first_row):
        assert ax.get_title().startswith(f"step {step} (t=")
        np.testing.assert_allclose(mesh_values(ax).reshape(6, 10), maps[step, 0], rtol=1e-6)
    assert first_row[0].get_ylabel() == "head 0"
    assert "span 'cat'" in fig.get_suptitle() and "layer: reduced" in fig.get_suptitle()


def test_grid_wraps_a_single_facet(trace):
    ds, _ = trace
    fig = analysis.grid(
        ds.img2txt.sel(span="mat", layer="transformer_blocks.0", step=1), col_wrap=2
    )
    titles = [ax.get_title() for ax in panels(fig)]
    assert titles == ["head 0", "head 1", "head 2"]
    assert "step 1" in fig.get_suptitle()


def test_overlay_draws_on_the_stored_image(trace, tmp_path):
    ds, expected = trace
    fig = analysis.overlay(
        ds.txt2img.sel(span="cat", head=0).mean(["step", "layer"]), ds.image, tmp_path / "o.png"
    )
    images = [a for a in fig.axes[0].get_children() if isinstance(a, AxesImage)]
    assert len(images) == 2
    np.testing.assert_array_equal(images[0].get_array(), ds.image.values)
    assert images[1].get_extent() == [0, 80, 48, 0]
    np.testing.assert_allclose(
        images[1].get_array(), expected["txt2img"][:, :, 0, 1].mean(axis=(0, 1)), rtol=1e-6
    )


def test_animation_has_one_frame_per_step(trace, tmp_path):
    ds, _ = trace
    path = tmp_path / "steps.gif"
    analysis.animate(ds.txt2img.sel(span="cat").mean(["layer", "head"]), path, progress=False)
    with Image.open(path) as gif:
        assert gif.n_frames == 4
        sizes = set()
        for frame in range(gif.n_frames):
            gif.seek(frame)
            sizes.add(gif.size)
    assert len(sizes) == 1


def test_similarity_matrix_and_drift_curve(trace, tmp_path):
    ds, _ = trace
    da = ds.txt2img.sel(span="cat", layer="transformer_blocks.1")
    sim = analysis.head_similarity(da, metric="correlation")
    fig = analysis.similarity_matrix(sim, tmp_path / "sim.png")
    ax = fig.axes[0]
    annotations = [t.get_text() for t in ax.texts]
    assert len(annotations) == 9 and annotations[0] == "1.00"
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "head"
    assert ax.get_title().startswith("Pearson correlation · txt2img · span 'cat'")
    drift = analysis.step_drift(da, metric="js")
    fig = analysis.drift_curve(drift, tmp_path / "drift.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), drift.values)
    assert "Jensen–Shannon" in ax.get_ylabel()
    assert (tmp_path / "sim.png").stat().st_size > 0 and (tmp_path / "drift.png").stat().st_size > 0


def test_an_mp4_without_ffmpeg_says_how_to_get_it(monkeypatch):
    import sys

    import analysis.plot
    from analysis.errors import UsageError

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # not installed
    monkeypatch.setattr(analysis.plot.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match=r"pip install 'attnscope\[video\]'.*a \.gif needs"):
        analysis.plot.ffmpeg()
    monkeypatch.setattr(analysis.plot.shutil, "which", lambda name: "/usr/bin/ffmpeg")
    assert analysis.plot.ffmpeg() == "/usr/bin/ffmpeg"
