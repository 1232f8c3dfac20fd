"""The page in a real browser (headless Chromium from Debian's packages, driven by Playwright):
what it received and drew is checked against plain xarray over the same store."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from playwright.sync_api import sync_playwright
from synthetic_trace import Run, open_plain, token_rows, write_store

from analysis.cli import main
from analysis.view.app import create_app
from analysis.view.maps import ViewStore

# Screenshots land here (git ignores *.png outside docs/img), for a person to look at.
SHOTS = Path(__file__).resolve().parents[3] / "test-output" / "view"


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "the browser tests need Debian's chromium: apt-get install chromium"
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("view") / "scene.zarr"
    write_store(path, [Run(scene=True, heads=4, steps=5)], 2)
    return path


@contextlib.contextmanager
def serving(store: Path) -> Iterator[str]:
    """The viewer of `store` on a free loopback port, in a thread; its address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(ViewStore(str(store))), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(store):
    with serving(store) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    page.close()


def received(page) -> np.ndarray:
    """The map values the page last received and drew."""
    page.wait_for_function("document.getElementById('map').dataset.values !== undefined")
    return np.array(page.evaluate("JSON.parse(document.getElementById('map').dataset.values)"))


def settle(page, action) -> np.ndarray:
    """Do `action`, then the values of the map drawn after it."""
    page.evaluate("delete document.getElementById('map').dataset.values")
    action()
    return received(page)


def expected(store, direction, token, step="mean", layer="mean", head="mean") -> np.ndarray:
    rows = open_plain(store, "run-0000")[direction].values.astype(np.float64)
    index = next(i for i, row in enumerate(token_rows()) if row.text == token)
    values = rows[:, :, :, index]
    for position in (step, layer, head):
        values = values.mean(0) if position == "mean" else values[position]
    return values


def expected_span(store, span, step=-1) -> np.ndarray:
    """A stored span's txt2img at a step (default the final), mean over layers and heads, from
    the positions the store's attributes name and its rows, in NumPy."""
    plain = open_plain(store, "run-0000")
    positions = set(plain.attrs["spans"][span])
    picked = [i for i, row in enumerate(token_rows()) if set(row.positions) & positions]
    rows = plain.txt2img.values.astype(np.float64)
    return rows[step][:, :, picked].mean(axis=(0, 1, 2))


def slide(page, dim, value):
    page.fill(f"#{dim}", str(value))
    page.dispatch_event(f"#{dim}", "input")


def test_click_slide_switch_and_grid_show_the_stored_maps(page, browser, url, store):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.goto(url)
    first = received(page)
    assert first.shape == (6, 10)
    assert "step=4" in page.url  # the final step first
    cat = page.locator("#tokens span", has_text="cat")
    values = settle(page, cat.click)
    np.testing.assert_allclose(values, expected(store, "txt2img", "cat", step=4), rtol=1e-5)
    assert "span=1%3A2" in page.url
    values = settle(page, lambda: slide(page, "step", 3))
    np.testing.assert_allclose(values, expected(store, "txt2img", "cat", step=3), rtol=1e-5)
    values = settle(page, lambda: slide(page, "layer", 4))
    np.testing.assert_allclose(values, expected(store, "txt2img", "cat", 3, 4), rtol=1e-5)
    values = settle(page, lambda: slide(page, "head", 1))
    np.testing.assert_allclose(values, expected(store, "txt2img", "cat", 3, 4, 1), rtol=1e-5)
    values = settle(page, lambda: page.check("input[value=img2txt]"))
    np.testing.assert_allclose(values, expected(store, "img2txt", "cat", 3, 4, 1), rtol=1e-5)
    page.screenshot(path=SHOTS / "map.png", full_page=True)
    page.click("#grid-toggle")
    page.wait_for_selector("#grid canvas")
    assert page.locator("#grid canvas").count() == 4
    page.screenshot(path=SHOTS / "heads.png", full_page=True)
    # The state is in the URL: opening it again shows the same map.
    again = browser.new_page()
    again.goto(page.url)
    np.testing.assert_array_equal(received(again), values)
    again.close()
    assert page.errors == []


def test_a_shift_click_makes_a_phrase_and_the_slider_end_averages(page, url, store):
    page.goto(url + "?span=cat&direction=txt2img")
    received(page)
    values = settle(page, lambda: page.locator("#tokens span", has_text="on").click())
    values = settle(
        page, lambda: page.locator("#tokens span", has_text="mat").click(modifiers=["Shift"])
    )
    assert "span=2%3A5" in page.url  # "on a mat": positions 2..4
    rows = open_plain(store, "run-0000").txt2img.isel(step=4, token=[2, 3, 4]).values
    np.testing.assert_allclose(values, rows.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-5)
    values = settle(page, lambda: slide(page, "step", 5))  # the slider's right end: the mean
    assert "step=mean" in page.url
    rows = open_plain(store, "run-0000").txt2img.isel(token=[2, 3, 4]).values.astype(np.float64)
    np.testing.assert_allclose(values, rows.mean(axis=(0, 1, 2, 3)), rtol=1e-5)
    assert page.errors == []


def test_bad_input_shows_a_message_and_no_map(page, url):
    page.goto(url + "?span=cat")
    received(page)
    page.fill("#span", "zebra")
    page.dispatch_event("#span", "change")
    page.wait_for_selector("#error:not([hidden])")
    assert "unknown span 'zebra'" in page.inner_text("#error")
    page.goto(url + "?span=cat&step=99")
    page.wait_for_selector("#error:not([hidden])")
    assert "step '99' is not a position of this run" in page.inner_text("#error")
    # The page said so itself; the failed requests are the only console errors.
    assert all("status of 404" in e or "status of 400" in e for e in page.errors)


def test_an_exported_page_shows_the_same_maps_without_a_server(page, store, tmp_path):
    out = tmp_path / "cat.html"
    assert main(["view", str(store), "--export", str(out), "--span", "cat", "-q"]) == 0
    page.goto(out.as_uri())
    np.testing.assert_allclose(received(page), expected(store, "txt2img", "cat"), rtol=1e-5)
    values = settle(page, lambda: slide(page, "step", 2))
    np.testing.assert_allclose(values, expected(store, "txt2img", "cat", step=2), rtol=1e-5)
    page.screenshot(path=SHOTS / "export.png", full_page=True)
    assert page.errors == []


def test_entities_are_listed_with_their_masks(page, make_store):
    path, _ = make_store(Run(entities={"kitten": (slice(0, 24), slice(0, 40))}))
    with serving(path) as address:
        page.goto(address + "?span=cat")
        received(page)
        page.wait_for_function("document.querySelectorAll('#entities canvas').length === 1")
        values = settle(page, lambda: page.click("#entities figure"))
        assert "span=kitten" in page.url
        np.testing.assert_allclose(values, expected_span(path, "kitten"), rtol=1e-5)
        drawn = page.evaluate(
            "Array.from(document.getElementById('mask').getContext('2d')"
            ".getImageData(0, 0, 80, 48).data).filter((v, i) => i % 4 === 3 && v > 0).length"
        )
        assert drawn > 0  # the mask is drawn over the map
    assert page.errors == []


def test_a_damaged_chunk_is_shown_as_damaged_never_drawn(page, make_store):
    path, _ = make_store(Run())
    shard = path / "run-0000" / "txt2img" / "c" / "3" / "0" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with serving(path) as address:
        page.goto(address + "?span=cat&step=3")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error").startswith("damaged data: run-0000/txt2img")
        assert "damaged" in page.get_attribute("#stack", "class")
        assert page.evaluate("document.getElementById('map').dataset.values") is None
        page.screenshot(path=SHOTS / "damaged.png")


def test_a_video_run_has_a_frame_slider_and_an_image_run_none(page, url, make_store):
    page.goto(url)
    received(page)
    assert not page.locator("#frame-control").is_visible()
    path, _ = make_store(Run(frames=3, heads=2))
    rows = open_plain(path, "run-0000").txt2img.values.astype(np.float64)
    cat = next(i for i, row in enumerate(token_rows()) if row.text == "cat")
    with serving(path) as address:
        page.goto(address + "?span=cat&direction=txt2img&step=1&layer=0&head=1")
        values = received(page)
        assert page.locator("#frame-control").is_visible()
        np.testing.assert_allclose(values, rows[1, 0, 1, cat].mean(0), rtol=1e-5)
        values = settle(page, lambda: slide(page, "frame", 2))
        np.testing.assert_allclose(values, rows[1, 0, 1, cat, 2], rtol=1e-5)
        assert "frame=2" in page.url
        page.screenshot(path=SHOTS / "frames.png", full_page=True)
    assert page.errors == []
