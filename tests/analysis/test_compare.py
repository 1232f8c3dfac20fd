"""Comparisons, each against a NumPy reference computed from the stored arrays."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
import xarray as xr
from synthetic_trace import Run

import analysis

RTOL = 1e-9


@pytest.fixture
def trace(store):
    path, expected = store
    return analysis.open_trace(path), expected


# ---- NumPy references, written from the definitions --------------------------------------


def np_distribution(m: np.ndarray) -> np.ndarray:
    m = m.ravel().astype(np.float64)
    return m / m.sum()


def np_js(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np_distribution(p), np_distribution(q)
    m = (p + q) / 2
    kl_p = sum(pi * np.log2(pi / mi) for pi, mi in zip(p, m, strict=True) if pi > 0)
    kl_q = sum(qi * np.log2(qi / mi) for qi, mi in zip(q, m, strict=True) if qi > 0)
    return 0.5 * kl_p + 0.5 * kl_q


def np_cosine(u: np.ndarray, v: np.ndarray) -> float:
    u, v = u.ravel().astype(np.float64), v.ravel().astype(np.float64)
    return float(u @ v / np.sqrt((u @ u) * (v @ v)))


def np_tv(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np_distribution(p), np_distribution(q)
    return 0.5 * np.abs(p - q).sum()


def np_entropy(m: np.ndarray) -> float:
    p = np_distribution(m)
    return float(-sum(x * np.log2(x) for x in p if x > 0))


# ---- head similarity -------------------------------------------------------------------


def test_head_similarity_correlation_cosine_js(trace):
    ds, expected = trace
    da = ds.txt2img.sel(span="cat", layer="transformer_blocks.1")
    maps = expected["txt2img"][:, 1, :, 1]  # step, head, y, x
    vectors = np.moveaxis(maps, 1, 0).reshape(3, -1)  # each head over every step and cell
    corr = analysis.head_similarity(da)
    assert isinstance(corr.data, dask.array.Array)
    assert corr.dims == ("head", "head2")
    np.testing.assert_allclose(corr.values, np.corrcoef(vectors), rtol=RTOL)
    cos = analysis.head_similarity(da, metric="cosine").values
    js = analysis.head_similarity(da, metric="js").values
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(cos[i, j], np_cosine(vectors[i], vectors[j]), rtol=RTOL)
            np.testing.assert_allclose(
                js[i, j], np_js(vectors[i], vectors[j]), rtol=1e-8, atol=1e-15
            )
    assert np.all(np.diag(js) < 1e-12) and np.all(js <= 1)


def test_head_similarity_map_by_map_keeps_the_other_dims(trace):
    ds, expected = trace
    da = ds.img2txt.sel(span="mat")
    sim = analysis.head_similarity(da, over=("y", "x")).compute()
    assert sim.dims == ("step", "layer", "head", "head2")
    maps = expected["img2txt"][:, :, :, 2]
    for step in range(4):
        for layer in range(5):
            ref = np.corrcoef(maps[step, layer].reshape(3, -1))
            np.testing.assert_allclose(sim.values[step, layer], ref, rtol=RTOL)


def test_js_handles_zero_cells(trace):
    ds, _ = trace
    da = ds.txt2img.sel(span="cat", step=0, layer="transformer_blocks.0").compute()
    zeroed = da.where(da > np.quantile(da.values, 0.5), 0.0)
    js = analysis.head_similarity(zeroed, metric="js").values
    vectors = zeroed.values.reshape(3, -1)
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(
                js[i, j], np_js(vectors[i], vectors[j]), rtol=1e-8, atol=1e-15
            )


def test_similarity_of_steps(trace):
    ds, expected = trace
    sim = analysis.similarity(ds.txt2img.sel(span="prompt", head=0), "step", "cosine").compute()
    assert sim.dims == ("step", "step2")
    vectors = expected["txt2img"][:, :, 0, 0].reshape(4, -1)
    for i in range(4):
        for j in range(4):
            np.testing.assert_allclose(
                sim.values[i, j], np_cosine(vectors[i], vectors[j]), rtol=RTOL
            )


# ---- drift and convergence --------------------------------------------------------------


@pytest.mark.parametrize("metric", ["js", "tv", "cosine", "correlation"])
def test_step_drift_to_the_final_step(trace, metric):
    ds, expected = trace
    drift = analysis.step_drift(ds.img2txt.sel(span="cat"), metric=metric)
    assert drift.dims == ("step",)
    assert "timestep" in drift.coords
    maps = expected["img2txt"][:, :, :, 1]
    reference = {
        "js": np_js,
        "tv": np_tv,
        "cosine": lambda a, b: 1 - np_cosine(a, b),
        "correlation": lambda a, b: 1 - np.corrcoef(a.ravel(), b.ravel())[0, 1],
    }[metric]
    want = [reference(maps[s], maps[-1]) for s in range(4)]
    np.testing.assert_allclose(drift.values, want, rtol=1e-8, atol=1e-12)


def test_step_drift_to_the_previous_or_a_given_step(trace):
    ds, expected = trace
    da = ds.txt2img.sel(span="prompt", layer="single_transformer_blocks.0")
    maps = expected["txt2img"][:, 2, :, 0]
    previous = analysis.step_drift(da, metric="tv", reference="previous").values
    assert np.isnan(previous[0])
    np.testing.assert_allclose(previous[1:], [np_tv(maps[s], maps[s - 1]) for s in range(1, 4)])
    fixed = analysis.step_drift(da, metric="js", reference=1).values
    np.testing.assert_allclose(fixed, [np_js(maps[s], maps[1]) for s in range(4)], atol=1e-12)
    with pytest.raises(analysis.SelectionError, match="unknown reference step 9"):
        analysis.step_drift(da, reference=9)
    with pytest.raises(analysis.SelectionError, match="unknown drift metric 'l7'"):
        analysis.step_drift(da, metric="l7")


def test_convergence_is_the_first_step_from_which_drift_stays_small(trace):
    ds, expected = trace
    da = ds.txt2img.sel(span="cat")
    maps = expected["txt2img"][:, :, :, 1]
    drift = np.array([np_js(maps[s], maps[-1]) for s in range(4)])
    for tol in (0.0, drift[1] * 1.0001, drift.max() * 2):
        ok = drift <= tol
        first = next(s for s in range(4) if ok[s:].all())
        assert float(analysis.convergence(da, tol=tol)) == first
    per_map = analysis.convergence(da, tol=0.05, over=("y", "x")).compute()
    assert per_map.dims == ("layer", "head")
    for layer in range(5):
        for head in range(3):
            d = np.array([np_js(maps[s, layer, head], maps[-1, layer, head]) for s in range(4)])
            first = next(s for s in range(4) if (d[s:] <= 0.05).all())
            assert per_map.values[layer, head] == first


# ---- entropy and concentration ----------------------------------------------------------


def test_entropy_per_map(trace):
    ds, expected = trace
    got = analysis.entropy(ds.txt2img)
    maps = expected["txt2img"]
    assert got.dims == ("step", "layer", "head", "span")
    want = np.array([np_entropy(m) for m in maps.reshape(-1, 6, 10)]).reshape(got.shape)
    np.testing.assert_allclose(got.values, want, rtol=RTOL)
    normalized = analysis.entropy(ds.txt2img, normalized=True)
    np.testing.assert_allclose(normalized.values, want / np.log2(60), rtol=RTOL)
    # A map on one cell has entropy 0; a uniform one log2(cells).
    spike = xr.zeros_like(ds.txt2img.isel(step=0, layer=0, head=0, span=0)).compute()
    spike[2, 3] = 1.0
    assert analysis.entropy(spike).item() == 0.0
    assert analysis.entropy(spike * 0 + 1).item() == pytest.approx(np.log2(60))


def test_concentration_is_the_mass_of_the_top_cells(trace):
    ds, expected = trace
    got = analysis.concentration(ds.img2txt, top=0.1)
    flat = expected["img2txt"].reshape(-1, 60).astype(np.float64)
    top6 = np.sort(flat, axis=1)[:, -6:].sum(axis=1) / flat.sum(axis=1)
    np.testing.assert_allclose(got.values.ravel(), top6, rtol=RTOL)
    one = analysis.concentration(ds.img2txt, top=0.001)  # at least one cell
    np.testing.assert_allclose(one.values.ravel(), flat.max(axis=1) / flat.sum(axis=1), rtol=RTOL)
    with pytest.raises(analysis.SelectionError, match="top must be a fraction"):
        analysis.concentration(ds.img2txt, top=1.5)


# ---- agreement with a mask --------------------------------------------------------------

# Rows 12..35 and columns 20..51 of the 48 × 80 image: not aligned to the 8-pixel latent
# cells, so some cells are exactly half inside (they count as inside).
ENTITY = (slice(12, 36), slice(20, 52))


@pytest.fixture
def masked(make_store):
    path, expected = make_store(Run(entities={"entity0": ENTITY}))
    return analysis.open_trace(path), expected["run-0000"]


def np_grid_mask() -> np.ndarray:
    pixels = np.zeros((48, 80))
    pixels[ENTITY] = 1
    return pixels.reshape(6, 8, 10, 8).mean(axis=(1, 3)) >= 0.5


def test_mask_to_grid_pools_image_pixels(masked):
    ds, _ = masked
    pixels = xr.DataArray(np.zeros((48, 80)), dims=("image_y", "image_x"))
    pixels[ENTITY] = 1
    grid = analysis.mask_to_grid(pixels, ds.txt2img)
    assert grid.dims == ("y", "x")
    np.testing.assert_array_equal(grid.values, np_grid_mask())
    # A mask already on the latent grid passes through: the run's own, and an array.
    stored = ds.entity_mask.sel(entity="entity0")
    assert stored.dims == ("y", "x")
    np.testing.assert_array_equal(analysis.mask_to_grid(stored, ds.txt2img), np_grid_mask())
    np.testing.assert_array_equal(analysis.mask_to_grid(np_grid_mask(), ds.txt2img), np_grid_mask())
    with pytest.raises(analysis.SelectionError, match="must be 2-D"):
        analysis.mask_to_grid(np.zeros((2, 2, 2)), ds.txt2img)


def test_mask_agreement_iou_mass_and_pointing(masked):
    ds, expected = masked
    mask = ds.entity_mask.sel(entity="entity0")
    scores = analysis.mask_agreement(ds.txt2img.sel(span="cat"), mask, threshold=0.4).compute()
    inside = np_grid_mask()
    maps = expected["txt2img"][:, :, :, 1].astype(np.float64)
    for index in np.ndindex(maps.shape[:3]):
        m = maps[index]
        norm = (m - m.min()) / (m.max() - m.min())
        predicted = norm >= 0.4
        iou = (predicted & inside).sum() / (predicted | inside).sum()
        mass = m[inside].sum() / m.sum()
        hit = float(inside.ravel()[np.argmax(m)])
        np.testing.assert_allclose(scores.iou.values[index], iou, rtol=RTOL)
        np.testing.assert_allclose(scores.mass_inside.values[index], mass, rtol=RTOL)
        assert scores.pointing.values[index] == hit


def test_rank_heads_orders_by_the_chosen_score(masked):
    ds, expected = masked
    table = analysis.rank_heads(
        ds.txt2img.sel(span="cat"), ds.entity_mask.sel(entity="entity0"), by="mass_inside"
    )
    inside = np_grid_mask()
    maps = expected["txt2img"][:, :, :, 1].astype(np.float64)
    mass = (maps * inside).sum(axis=(-2, -1)) / maps.sum(axis=(-2, -1))  # step, layer, head
    mean = mass.mean(axis=0)  # layer, head
    layers = list(ds.layer.values)
    order = sorted(np.ndindex(mean.shape), key=lambda lh: -mean[lh])
    assert list(table.index) == [(layers[lh[0]], lh[1]) for lh in order]
    np.testing.assert_allclose(table["mass_inside"].values, [mean[lh] for lh in order], rtol=RTOL)
    assert list(table.columns) == ["iou", "mass_inside", "pointing"]


def test_bad_comparison_arguments_say_what_is_accepted(trace):
    ds, _ = trace
    with pytest.raises(
        analysis.SelectionError, match=r"unknown similarity metric 'l2'.*correlation"
    ):
        analysis.head_similarity(ds.txt2img, metric="l2")
    with pytest.raises(analysis.SelectionError, match="must not contain the compared dim 'head'"):
        analysis.head_similarity(ds.txt2img, over=("head", "y"))
    with pytest.raises(analysis.SelectionError, match=r"\['colour'\] not among the dims"):
        analysis.entropy(ds.txt2img, over=("colour",))
    with pytest.raises(analysis.SelectionError, match="mask on the latent grid has shape"):
        analysis.mask_agreement(ds.txt2img, xr.DataArray(np.ones((2, 2)), dims=("y", "x")))
    with pytest.raises(analysis.SelectionError, match="threshold must be in"):
        analysis.mask_agreement(ds.txt2img, np.ones((6, 10)), threshold=2)
    with pytest.raises(analysis.SelectionError, match="unknown ranking score"):
        analysis.rank_heads(ds.txt2img, np.ones((6, 10)), by="luck")
