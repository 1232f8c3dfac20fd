"""The viewer's JSON answers against plain xarray over the same store, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.testclient import TestClient
from synthetic_trace import Run, open_plain, token_rows, write_store

from analysis import open as analysis_open
from analysis.view.app import create_app
from analysis.view.maps import ViewStore


@pytest.fixture
def client(store):
    path, _ = store
    return TestClient(create_app(ViewStore(str(path))))


def row_of(token):
    return next(i for i, row in enumerate(token_rows()) if row.text == token)


def test_meta_lays_out_the_run(client, store):
    meta = client.get("/api/meta").json()
    plain = open_plain(store[0], "run-0000")
    assert meta["run"]["name"] == "run-0000" and meta["directions"] == ["txt2img", "img2txt"]
    assert meta["steps"] == plain.step.values.tolist()
    assert meta["layers"] == plain.layer.values.tolist()
    assert meta["grid"] == [6, 10] and len(meta["colormap"]) == 256 and meta["has_image"]
    assert [t["text"] for t in meta["run"]["tokens"]] == [r.text for r in token_rows()]


@pytest.mark.parametrize("direction", ["txt2img", "img2txt"])
@pytest.mark.parametrize(
    ("step", "layer", "head"), [(2, 3, 1), ("mean", 0, 2), (1, "mean", "mean")]
)
def test_a_map_is_the_stored_row_at_those_positions(client, store, direction, step, layer, head):
    params = dict(direction=direction, span="cat", step=step, layer=layer, head=head)
    answer = client.get("/api/map", params=params).json()
    rows = open_plain(store[0], "run-0000")[direction].isel(token=row_of("cat")).values
    expected = rows.astype(np.float64)  # (step, layer, head, y, x)
    for position in (step, layer, head):  # each takes the leading dim away
        expected = expected.mean(0) if position == "mean" else expected[position]
    np.testing.assert_allclose(np.array(answer["values"]), expected, rtol=1e-6)
    assert answer["max"] == pytest.approx(expected.max(), rel=1e-6)


def test_each_token_row_is_read_in_chunks_of_many_layers(store, monkeypatch):
    """One step and one token row a dask chunk, and as many layers as fit in ROW_CHUNK_BYTES:
    a mean over every step and layer is a few tasks, not one per stored chunk."""
    path, _ = store
    maps = ViewStore(str(path)).tokens(None).txt2img
    sizes = maps.sizes
    assert maps.chunksizes["step"] == (1,) * sizes["step"]
    assert maps.chunksizes["token"] == (1,) * sizes["token"]
    assert maps.chunksizes["layer"] == (sizes["layer"],)  # a small store's layers all fit
    per_layer = 4 * sizes["head"] * sizes["y"] * sizes["x"]  # float32, one step and row
    monkeypatch.setattr(analysis_open, "ROW_CHUNK_BYTES", 2 * per_layer + 1)
    view = ViewStore(str(path))
    assert view.tokens(None).txt2img.chunksizes["layer"] == (2, 2, 1)  # 5 layers, 2 a chunk
    # Read across those chunks, the maps are the stored ones.
    plain = open_plain(path, "run-0000").txt2img.isel(token=row_of("cat")).values
    answer = TestClient(create_app(view)).get(
        "/api/map", params=dict(direction="txt2img", span="cat", step=1, layer="mean", head=2)
    )
    expected = plain[1, :, 2].astype(np.float64).mean(0)
    np.testing.assert_allclose(answer.json()["values"], expected, rtol=1e-6)


def test_a_phrase_is_the_mean_or_sum_of_its_rows(client, store):
    plain = open_plain(store[0], "run-0000")
    # "on a": the rows of "on" (position 2) and of the "a" after it (position 3).
    for direction, combine in (("txt2img", np.mean), ("img2txt", np.sum)):
        params = dict(direction=direction, span="on a", step=0, layer=1, head=0)
        answer = client.get("/api/map", params=params).json()
        rows = plain[direction].isel(step=0, layer=1, head=0, token=[2, 3]).values
        np.testing.assert_allclose(answer["values"], combine(rows.astype(np.float64), 0), rtol=1e-6)


def test_heads_grid_and_similarity(client, store):
    params = dict(direction="txt2img", span="mat", step=1, layer=2)
    answer = client.get("/api/heads", params=params).json()
    rows = open_plain(store[0], "run-0000").txt2img.isel(step=1, layer=2, token=row_of("mat"))
    maps = rows.values.astype(np.float64)
    np.testing.assert_allclose(answer["maps"], maps, rtol=1e-6)
    flat = maps.reshape(len(maps), -1)
    np.testing.assert_allclose(answer["similarity"], np.corrcoef(flat), atol=1e-6)


def test_drift_is_zero_at_the_final_step(client):
    drift = client.get("/api/drift", params=dict(direction="img2txt", span="cat")).json()["drift"]
    assert len(drift) == 4 and drift[-1] == pytest.approx(0.0, abs=1e-9) and drift[0] > 0


def test_the_image_is_served_as_png(client):
    response = client.get("/api/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        (dict(run="run-0009"), 404, "unknown run 'run-0009'"),
        (dict(span="zebra"), 400, "unknown span 'zebra'"),
        (dict(step="9"), 404, "step '9' is not a position of this run: give an index 0..3"),
        (dict(head="x"), 404, "head 'x' is not a position"),
        (dict(direction="sideways"), 404, "has no 'sideways' maps"),
    ],
)
def test_bad_input_answers_json_with_a_4xx_never_a_trace(client, params, status, message):
    response = client.get("/api/map", params=dict(direction="txt2img", span="cat") | params)
    assert response.status_code == status
    assert message in response.json()["error"] and "Traceback" not in response.text


def test_a_direction_the_model_lacks_is_named_with_why(make_store):
    path, _ = make_store(Run(directions=("img2txt",)))
    import zarr

    zarr.open_group(path, path="run-0000").attrs["directions_absent"] = {"txt2img": "no queries"}
    client = TestClient(create_app(ViewStore(str(path))))
    assert client.get("/api/meta").json()["directions_absent"] == {"txt2img": "no queries"}
    response = client.get("/api/map", params=dict(direction="txt2img", span="cat"))
    assert response.status_code == 404 and "(the model has none: no queries)" in response.text


def test_a_damaged_chunk_is_answered_as_damaged_never_drawn(store):
    path, _ = store
    shard = path / "run-0000" / "txt2img" / "c" / "2" / "0" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # its index is lost
    client = TestClient(create_app(ViewStore(str(path))))
    response = client.get("/api/map", params=dict(direction="txt2img", span="cat", step=2))
    assert response.status_code == 409 and response.json()["damaged"]
    assert "run-0000/txt2img" in response.json()["error"]
    ok = client.get("/api/map", params=dict(direction="txt2img", span="cat", step=1))
    assert ok.status_code == 200  # the intact steps still answer


@pytest.mark.parametrize(
    "url", ["/static/../maps.py", "/static/%2e%2e/maps.py", "/..%2f..%2fpyproject.toml"]
)
def test_no_path_from_the_url_reaches_the_file_system(client, url):
    assert client.get(url).status_code == 404


def test_an_entity_mask_is_served_as_stored(make_store):
    entities = {"kitten": (slice(0, 24), slice(0, 40))}
    path, _ = make_store(Run(entities=entities))
    client = TestClient(create_app(ViewStore(str(path))))
    assert client.get("/api/meta").json()["run"]["entities"] == ["kitten"]
    answer = client.get("/api/entity", params={"entity": "kitten"}).json()
    stored = open_plain(path, "run-0000").entity_mask.sel(entity="kitten").values
    np.testing.assert_array_equal(np.array(answer["values"]), stored)
    missing = client.get("/api/entity", params={"entity": "puppy"})
    assert missing.status_code == 404 and "its entities: ['kitten']" in missing.json()["error"]


def test_a_bucket_store_is_served_as_the_local_one(s3, tmp_path):
    import s3fs

    local = tmp_path / "local.zarr"
    write_store(local, [Run()])
    url = f"s3://{s3.bucket()}/view.zarr"
    s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True).put(
        str(local), url, recursive=True
    )
    remote = TestClient(create_app(ViewStore(url, s3.storage_options)))
    here = TestClient(create_app(ViewStore(str(local))))
    params = dict(direction="img2txt", span="on a", step=2, layer="mean", head=1)
    answer = remote.get("/api/map", params=params)
    assert answer.status_code == 200
    assert answer.json() == here.get("/api/map", params=params).json()
    assert remote.get("/api/meta").json()["store"] == url


def test_run_attributes_json_cannot_hold_are_answered_as_text(store):
    import zarr

    path, _ = store
    run = zarr.open_group(path, path="run-0000")
    run.attrs["scheduler_config"] = {"lambda_min_clipped": float("-inf")}  # as DPM-Solver's
    meta = TestClient(create_app(ViewStore(str(path)))).get("/api/meta")
    assert meta.status_code == 200
    assert meta.json()["run"]["attrs"]["scheduler_config"] == {"lambda_min_clipped": "-inf"}


def test_a_video_runs_maps_are_per_frame_or_their_mean(make_store):
    path, _ = make_store(Run(frames=3))
    client = TestClient(create_app(ViewStore(str(path))))
    assert client.get("/api/meta").json()["frames"] == [0, 1, 2]
    rows = open_plain(path, "run-0000").txt2img.isel(token=row_of("cat")).values
    rows = rows.astype(np.float64)  # (step, layer, head, frame, y, x)
    for frame, expected in ((2, rows[1, 0, 2, 2]), ("mean", rows[1, 0, 2].mean(0))):
        params = dict(direction="txt2img", span="cat", step=1, layer=0, head=2, frame=frame)
        answer = client.get("/api/map", params=params).json()
        np.testing.assert_allclose(answer["values"], expected, rtol=1e-6)
    # Without a frame, the mean over frames: a map is always one (y, x) image.
    params = dict(direction="txt2img", span="cat", step=1, layer=0, head=2)
    answer = client.get("/api/map", params=params).json()
    np.testing.assert_allclose(answer["values"], rows[1, 0, 2].mean(0), rtol=1e-6)
    heads = client.get("/api/heads", params=dict(params, frame=1) | {"head": None}).json()
    np.testing.assert_allclose(heads["maps"], rows[1, 0, :, 1], rtol=1e-6)
    response = client.get("/api/map", params=dict(params, frame=3))
    assert response.status_code == 404 and "frame '3'" in response.text


def test_an_image_run_has_no_frames(client):
    assert client.get("/api/meta").json()["frames"] == []
    params = dict(direction="txt2img", span="cat", frame=0)
    response = client.get("/api/map", params=params)
    assert response.status_code == 404 and "has no frames" in response.text
