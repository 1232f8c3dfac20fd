"""The `attnscope` verbs info, heatmap, heads, steps and the record stand-in, run in-process."""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from PIL import Image
from synthetic_trace import Run

import analysis.cli.figures
from analysis import store_format as sf
from analysis.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_info_shows_runs_prompt_spans_dims_steps_and_size(make_store, capsys):
    path, _ = make_store(
        Run(),
        Run(steps=5, status=sf.RECORDING, complete=[0, 1, 2], grid=(4, 7), keepbits=9),
    )
    status, out, err = run_cli(capsys, "info", path)
    assert status == 0, err
    assert "run-0000  complete   4/4 steps complete" in out
    assert "run-0001  recording  3/5 steps complete" in out
    assert "recording (steps 3, 4 missing)" in out
    assert "prompt    'a cat on a mat.'" in out
    assert "cat     tokens 1  'cat'" in out and "prompt  tokens 0..5  'a cat on a mat .'" in out
    assert "step 5 · layer 5 · head 3 · token 7 · y 4 · x 7  (layers: 2 double, 3 single)" in out
    assert "    prompt: 0 a · 1 cat · 2 on · 3 a · 4 mat · 5 . · 6..9 <pad>" in out
    assert "relative error <= 0.000977" in out

    status, out, _ = run_cli(capsys, "info", path, "--run", "run-0000", "--json")
    info = json.loads(out)["run"]
    run_dir = Path(path) / "run-0000"
    for name in sf.DIRECTIONS:
        var = info["variables"][name]
        on_disk = directory_bytes(run_dir / name)
        written = 4 * 5 * 3 * 7 * 6 * 10 * 4  # every step written, float32, 7 token rows
        assert var["bytes_written"] == written
        assert var["bytes_on_disk"] == on_disk
        assert var["compression_ratio"] == pytest.approx(written / var["bytes_on_disk"])
    assert info["spans"]["mat"] == {"tokens": [4], "strings": ["mat"]}
    assert info["dims"] == {"step": 4, "layer": 5, "head": 3, "token": 7, "y": 6, "x": 10}


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


def test_heatmap_reduces_what_it_is_told(store, tmp_path, capsys, captured):
    path, expected = store
    out = tmp_path / "cat.png"
    argv = ["heatmap", path, "--span", "cat", "--head", "2", "--reduce", "mean"]
    status, stdout, err = run_cli(capsys, *argv, "--over", "step,layer", "-o", out)
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
    status, _, err = run_cli(capsys, *argv)
    assert status == 0, err
    (m, _), _ = captured["heatmap"][1]
    want = expected["img2txt"][1:3, 2:][:, :, [0, 2], 2].max(axis=(0, 1, 2))
    np.testing.assert_allclose(m.values, want, rtol=1e-6)

    status, _, err = run_cli(capsys, "heatmap", path, "--span", "cat", "--overlay", "-o", out)
    assert status == 0, err
    (m, image, _), _ = captured["overlay"][0]
    np.testing.assert_allclose(
        m.values, expected["txt2img"][:, :, :, 1].mean(axis=(0, 1, 2)), rtol=1e-6
    )
    assert image.dims == sf.IMAGE_DIMS


def test_heads_draws_the_grid_and_the_similarity(store, tmp_path, capsys, captured):
    path, expected = store
    out = tmp_path / "heads.png"
    argv = ["heads", path, "--span", "cat", "--layer", "transformer_blocks.1", "--metric", "js"]
    status, stdout, err = run_cli(capsys, *argv, "-o", out)
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


def test_steps_draws_the_grid_the_drift_and_a_gif(store, tmp_path, capsys, captured):
    path, _ = store
    out = tmp_path / "steps.png"
    argv = ["steps", path, "--span", "cat", "--layer", "single:*", "--metric", "tv"]
    status, stdout, err = run_cli(capsys, *argv, "--gif", "-o", out)
    assert status == 0, err
    written = [out, tmp_path / "steps-drift.png", tmp_path / "steps.gif"]
    assert stdout.split() == [str(p) for p in written]
    assert all(p.stat().st_size > 0 for p in written)
    (drift, _), _ = captured["drift_curve"][0]
    assert drift.attrs["metric"] == "tv" and drift.sizes["step"] == 4
    with Image.open(tmp_path / "steps.gif") as gif:
        assert gif.n_frames == 4
    gif = tmp_path / "elsewhere.gif"
    status, stdout, err = run_cli(capsys, *argv, "--reference", "previous", "--gif", gif, "-o", out)
    assert status == 0, err
    assert gif.exists()


def test_a_phrase_or_a_token_range_is_a_span_when_reading(store, tmp_path, capsys, captured):
    path, _ = store
    rows = zarr.open_group(path, path="run-0000", mode="r")["txt2img"][...].astype(np.float64)
    out = tmp_path / "x.png"
    for span, positions in (("cat on", [1, 2]), ("1:3", [1, 2]), ("cat,mat", [1, 4])):
        status, _, err = run_cli(capsys, "heatmap", path, "--span", span, "--head", "0", "-o", out)
        assert status == 0, err
        (m, _), _ = captured["heatmap"][-1]
        want = rows[:, :, 0][:, :, positions].mean(axis=(0, 1, 2))
        np.testing.assert_allclose(m.values, want, rtol=1e-6)
    status, _, err = run_cli(capsys, "heatmap", path, "--span", "3:8", "-o", out)
    assert status == 2 and "keep_tokens=(6, 10)" in err


def test_an_unknown_span_exits_non_zero_listing_the_spans(store, tmp_path, capsys):
    path, _ = store
    status, _, err = run_cli(capsys, "heatmap", path, "--span", "kat", "-o", tmp_path / "x.png")
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
def test_bad_selections_exit_non_zero_naming_what_exists(store, tmp_path, capsys, argv, words):
    path, _ = store
    verb, *rest = argv
    status, _, err = run_cli(capsys, verb, path, "--span", "cat", *rest, "-o", tmp_path / "x.png")
    assert status == 2
    for word in words:
        assert word in err


def test_bad_stores_exit_non_zero(make_store, tmp_path, capsys):
    status, _, err = run_cli(capsys, "info", tmp_path / "nothing.zarr")
    assert status == 2 and "does not exist" in err
    path, _ = make_store(Run(), version=99)
    status, _, err = run_cli(capsys, "info", path)
    assert status == 2 and "format version 99" in err


@pytest.mark.parametrize("verb", ["info", "heatmap", "heads", "steps"])
def test_a_file_or_a_damaged_store_is_one_line_and_exit_2(store, tmp_path, capsys, verb):
    path, _ = store
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a store")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(path, damaged)
    (damaged / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    for target, words in ((a_file, "is a file, not a trace store"), (damaged, "not valid JSON")):
        figure = () if verb == "info" else ("--span", "cat", "-o", tmp_path / "x.png")
        status, _, err = run_cli(capsys, verb, target, *figure)
        assert status == 2
        assert words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_a_partial_run_warns_on_stderr_and_draws_its_complete_steps(make_store, tmp_path, capsys):
    path, _ = make_store(Run(status=sf.RECORDING, complete=[0, 1]))
    out = tmp_path / "s.png"
    status, _, err = run_cli(capsys, "steps", path, "--span", "cat", "-o", out, "-q")
    assert status == 0
    assert "attnscope: warning: run-0000" in err and "steps 2, 3 are missing" in err


def test_urls_and_storage_options(store, tmp_path, capsys):
    path, _ = store
    fs = fsspec.filesystem("memory")
    name = f"/cli-{uuid.uuid4().hex}.zarr"
    fs.put(str(path), name, recursive=True)
    try:
        argv = ["heatmap", f"memory://{name}", "--span", "cat", "-o", tmp_path / "m.png", "-q"]
        status, _, err = run_cli(capsys, *argv, "--storage-option", "skip_instance_cache=true")
        assert status == 0, err
    finally:
        fs.rm(name, recursive=True)
    status, _, err = run_cli(capsys, "info", path, "--storage-option", "oops")
    assert status == 2 and "KEY=VALUE" in err


def test_record_without_the_tracer_says_how_to_install_it(monkeypatch, capsys):
    # A None entry makes `import tracer.cli` raise ImportError, as on a machine without torch.
    monkeypatch.setitem(sys.modules, "tracer.cli", None)
    status, _, err = run_cli(capsys, "record", "--demo", "--out", "x.zarr")
    assert status == 2
    assert "pip install -e '.[tracer]'" in err


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for verb in ("info", "heatmap", "heads", "steps", "record"):
        assert verb in out
