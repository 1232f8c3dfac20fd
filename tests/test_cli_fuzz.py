"""Bad input across the CLI and the API, fuzzed: a clear message and a non-zero exit, never a
traceback; an existing store never overwritten or mixed without --overwrite or --append.

Hypothesis draws argument vectors from the real option names with hostile values (empty, huge,
unicode, separators, negative, NaN, paths that are files, folders or missing) and selection
strings for every parser. The only acceptable outcomes: a result, or exit 2 with one line
`attnscope: error: ...` (argparse's usage errors say `attnscope ...: error:` too).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "analysis"))
from synthetic_trace import Run, write_store

from analysis import store_format as sf
from analysis.cli import main
from analysis.selection import SelectionError, parse_selector, select

WORK = Path(tempfile.mkdtemp(prefix="attnscope-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
STORE = WORK / "trace.zarr"
write_store(
    STORE, [Run(steps=3, heads=2, grid=(4, 5), entities={"cat": (slice(0, 8), slice(0, 8))})]
)
NOT_A_STORE = WORK / "photos"
NOT_A_STORE.mkdir()
(NOT_A_STORE / "holiday.jpg").write_bytes(b"\xff\xd8 not really a picture")
A_FILE = WORK / "notes.txt"
A_FILE.write_text("not a store\n")
PROMPTS = WORK / "prompts.txt"
PROMPTS.write_text("a cat on a mat\n\n# comment\na dog\n")

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        # capsys is read and monkeypatch set afresh in every example
        HealthCheck.function_scoped_fixture,
    ],
)

# Text that stresses parsers: separators, globs, ranges, signs, unicode digits and letters.
hostile_text = st.text(
    alphabet=st.sampled_from([*"0123456789:,-*?[]!=. _ab", "٣", "é", "\n", "\x00", "🐈"]),
    max_size=20,
)
hostile = st.one_of(
    hostile_text,
    st.sampled_from(
        ["", " ", "-1", "0", "1e9", "nan", "inf", "-inf", "9" * 5000, "0:999999999999", "::0"]
    ),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Run `attnscope ARGV`: its exit status and stderr; fails on any other exception."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 for --help
        status = exc.code
        assert status in (0, 2), argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    assert isinstance(status, int), argv
    if status == 2:
        # A usage error: argparse's own, or attnscope's one line.
        assert "attnscope: error: " in err or ": error: argument" in err or "usage:" in err, (
            argv,
            err,
        )
    return status, err


# ---------------------------------------------------------------------------- selection parsers

NUMBERS = list(range(10))
LAYERS = [f"transformer_blocks.{i}" for i in range(3)] + [
    f"single_transformer_blocks.{i}" for i in range(12)
]
KINDS = {name: "single" if name.startswith("single") else "double" for name in LAYERS}


@SETTINGS
@given(text=hostile)
def test_selector_syntax_parses_or_names_what_exists(text):
    for labels, kinds in ((NUMBERS, None), (LAYERS, KINDS), (["prompt", "cat", "0:512"], None)):
        try:
            picked = parse_selector("dim", text, labels, kinds)
        except SelectionError as exc:
            assert str(exc)
            continue
        chosen = picked if isinstance(picked, list) else [picked]
        assert all(value in labels for value in chosen)


@SETTINGS
@given(step=hostile, head=hostile, span=hostile, layer=hostile)
def test_select_on_a_dataarray_never_fails_but_with_a_selection_error(step, head, span, layer):
    da = xr.DataArray(
        np.zeros((3, 3, 2, 2)),
        dims=("step", "layer", "head", "span"),
        coords={
            "step": [0, 5, 10],
            "layer": LAYERS[:2] + LAYERS[-1:],
            "layer_kind": ("layer", ["double", "double", "single"]),
            "head": [0, 1],
            "span": ["prompt", "cat"],
        },
    )
    try:
        select(da, step=step, layer=layer, head=head, span=span)
    except SelectionError as exc:
        assert str(exc)


@SETTINGS
@given(text=hostile)
def test_record_list_and_span_parsers_raise_only_their_own_errors(text):
    from analysis.cli.args import MAX_INTEGERS, integers
    from tracer.spans import parse_span_argument

    try:
        values = integers(text)
    except argparse.ArgumentTypeError as exc:
        assert str(exc)
    else:
        assert all(isinstance(v, int) for v in values) and len(values) <= MAX_INTEGERS
    try:
        name, request = parse_span_argument(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert name and request


# ------------------------------------------------------------------------- analysis verbs

STORES = [str(p) for p in (NOT_A_STORE, A_FILE, WORK / "missing.zarr")]
STORES += ["memory://nothing", "nosuch://bucket/x.zarr", ""]
stores = st.sampled_from([str(STORE)] * 3 + STORES)


def mostly(valid: list[str]) -> st.SearchStrategy[str]:
    """Valid values most of the time (so commands get far), hostile ones otherwise."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), hostile)


OPTIONS = {
    "--run": mostly(["0", "run-0000", "1"]),
    "--span": mostly(["cat", "prompt", "mat", "cat,mat", "*"]),
    "--layer": mostly(["single:*", "double:1", "transformer_blocks.0", "*.1"]),
    "--head": mostly(["0", "0,1", "0:1", "::2"]),
    "--step": mostly(["0", "0:2", "1,2", "2:"]),
    "--reduce": mostly(["mean", "max", "median"]),
    "--over": mostly(["step,layer", "head", "rgb", "step"]),
    "--direction": mostly(list(sf.DIRECTIONS)),
    "--metric": mostly(["correlation", "js", "cosine", "l1"]),
    "--reference": mostly(["final", "previous", "1"]),
    "--col-wrap": mostly(["2", "3"]),
    "--fps": mostly(["2", "0.5"]),
    "--cmap": mostly(["magma", "viridis"]),
    "--storage-option": hostile | st.sampled_from(["anon=true", "=x", "key="]),
    "--scheduler-timeout": st.sampled_from(["0.1", "-1", "nan"]),
    "-o": st.sampled_from(["fig.unknownext", "", "missing-dir/fig.png", str(STORE), "."]),
}
FLAGS = ["--json", "--overlay", "--gif", "-q", "--help"]


@st.composite
def analysis_argv(draw):
    verb = draw(st.sampled_from(["info", "heatmap", "heads", "steps", "verify", "nosuchverb"]))
    argv = [verb]
    if draw(st.booleans()) or verb != "nosuchverb":
        argv.append(draw(stores))
    for option in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True)):
        argv += [option, draw(OPTIONS[option])]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=1))
    if draw(st.integers(0, 9)) == 0:  # a cluster that is not there: refused within 0.2 s
        address = draw(st.sampled_from(["tcp://127.0.0.1:9", "nonsense", ""]))
        argv += ["--scheduler", address, "--scheduler-timeout", "0.2"]
    if verb in ("heatmap", "heads", "steps") and "-o" not in argv:
        argv += ["-o", "fig.png"]
    return argv


@settings(SETTINGS, max_examples=80)
@given(argv=analysis_argv())
def test_analysis_verbs_fail_with_a_message_never_a_traceback(argv, capsys, monkeypatch):
    monkeypatch.chdir(WORK)
    before = snapshot(STORE)
    run(argv, capsys)
    assert snapshot(STORE) == before  # analysis never writes into a store


# --------------------------------------------------------------------------------- record


class Loaded(Exception):
    """Raised instead of loading a model: the arguments passed every check before it."""


RECORD_OPTIONS = {
    "--prompt": mostly(["a cat on a mat", "", "   "]),
    "--prompts": st.sampled_from([str(PROMPTS), str(WORK / "none.txt"), str(WORK), ""]),
    "--seeds": mostly(["0,1", "0:3", "5"]),
    "--seed": mostly(["0", "-1", "7"]),
    "--span": mostly(["cat", "x=0:4", "x=4:0", "=", "a=b=c", "0:512"]),
    "--heads": mostly(["0,1", "0:2", "99"]),
    "--steps": mostly(["0", "0:2", "-3"]),
    "--layers": mostly(["single", "double", "transformer_blocks.0", "nope.*"]),
    "--directions": mostly(["txt2img", "img2txt,txt2img", "x"]),
    "--keepbits": mostly(["9", "0", "24", "-1"]),
    "--chunk-size": mostly(["64", "0", "-5"]),
    "--height": mostly(["64", "0", "-64", "7"]),
    "--num-inference-steps": mostly(["2", "0", "-1"]),
    "--dtype": mostly(["float32", "bfloat16"]),
    "--backend": mostly(["diffusers", "diffsynth"]),
    "--entity": mostly(["cat=a cat", "a dog"]),
    "--entity-mask": mostly(["0,0,8,8", "1,2,3", str(A_FILE)]),
}


@st.composite
def record_argv(draw, out: Path):
    source = draw(st.sampled_from([["--demo"], ["--demo"], ["--model", "x"], []]))
    argv = ["record", *source, "--out", str(out)]
    chosen = draw(st.lists(st.sampled_from(sorted(RECORD_OPTIONS)), max_size=4, unique=True))
    for option in chosen:
        argv += [option, draw(RECORD_OPTIONS[option])]
    argv += draw(st.lists(st.sampled_from(["--append", "--overwrite", "--lossless"]), max_size=2))
    return argv


@pytest.fixture
def no_model(monkeypatch):
    import tracer.cli as tracer_cli

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(tracer_cli, "_load_pipeline", load)


TARGETS = {"store": STORE, "folder": NOT_A_STORE, "file": A_FILE, "new": None}


@settings(SETTINGS, max_examples=150)
@given(data=st.data(), target=st.sampled_from(sorted(TARGETS)))
def test_record_arguments_fail_clearly_and_never_touch_what_they_must_not(
    data, target, capsys, monkeypatch, no_model
):
    # The working folder goes back before the scratch folder is removed: hypothesis resolves
    # the relative __file__ of modules imported meanwhile (torch.ops: "_ops.py") against it.
    with tempfile.TemporaryDirectory(dir=WORK) as scratch, monkeypatch.context() as patch:
        patch.chdir(scratch)
        out = Path(scratch) / "out"
        source = TARGETS[target]
        if source is not None and source.is_dir():
            shutil.copytree(source, out)
        elif source is not None:
            shutil.copyfile(source, out)
        before = snapshot(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
        argv = data.draw(record_argv(out))
        try:
            status, _ = run(argv, capsys)
        except Loaded:
            status = None  # valid arguments: it would load the model now
        overwrite, append = "--overwrite" in argv, "--append" in argv
        if target == "store" and not overwrite:
            assert snapshot(out) == before, argv  # never rewritten without --overwrite
        if target in ("folder", "file"):
            # Not a trace store: never replaced, never written into, whatever the flags.
            assert (snapshot(out) if out.is_dir() else out.read_bytes()) == before, argv
        if target == "new" and status is not None and status != 0:
            assert not out.exists() or not any(out.iterdir()), argv  # no empty store left
        if target == "store" and status is None and not (overwrite or append):
            assert "--prompts" in argv  # only a sweep (which resumes) may go on without intent


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--height", "7"], 2, "expected at least 16 pixels"),
        (["--num-inference-steps", "0"], 2, "expected a positive int, got"),
        (["--heads", "0:999999999999"], 2, "head '0:999999999999' is out of range"),
        (["--max-sequence-length", "100000"], 2, "cannot be greater than 512"),
        (["--device", "nonsense"], 2, "cannot load the demo pipeline on nonsense"),
        (["--append", "--out", str(NOT_A_STORE)], 2, "is a folder that is not a trace store"),
        (["--prompts", str(PROMPTS), "--out", str(NOT_A_STORE)], 2, "not a trace store"),
        (["--overwrite", "--out", str(NOT_A_STORE)], 2, "replaces attnscope trace stores only"),
        (["--overwrite", "--out", str(A_FILE)], 2, "replaces attnscope trace stores only"),
        (["--append", "--out", str(A_FILE)], 2, "is a file, not a trace store"),
    ],
)
def test_record_refuses_bad_numbers_and_foreign_paths_with_the_real_demo(
    extra, status, message, capsys, tmp_path
):
    before = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in (NOT_A_STORE, A_FILE)}
    argv = ["record", "--demo", "--num-inference-steps", "1", "--out", str(tmp_path / "x.zarr")]
    got, err = run([*argv, *extra], capsys)
    assert got == status and message in err, err
    after = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in (NOT_A_STORE, A_FILE)}
    assert after == before
    assert not (tmp_path / "x.zarr").exists() or "--out" in extra
