"""`attnscope info`: runs, prompt, tokens, spans, dims, steps and size, as text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic_trace import Run

from analysis import store_format as sf


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_info_shows_runs_prompt_spans_dims_steps_and_size(make_store, capsys, run_cli):
    path, _ = make_store(
        Run(),
        Run(steps=5, status=sf.RECORDING, complete=[0, 1, 2], grid=(4, 7), keepbits=9),
    )
    status, out, err = run_cli("info", path)
    assert status == 0, err
    assert "run-0000  complete   4/4 steps complete" in out
    assert "run-0001  recording  3/5 steps complete" in out
    assert "recording (steps 3, 4 missing)" in out
    assert "prompt    'a cat on a mat.'" in out
    assert "cat     tokens 1  'cat'" in out and "prompt  tokens 0..5  'a cat on a mat .'" in out
    assert "step 5 · layer 5 · head 3 · token 7 · y 4 · x 7  (layers: 2 double, 3 single)" in out
    assert "    prompt: 0 a · 1 cat · 2 on · 3 a · 4 mat · 5 . · 6..9 <pad>" in out
    assert "relative error <= 0.000977 (9 mantissa bits kept)" in out

    status, out, _ = run_cli("info", path, "--run", "run-0000", "--json")
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
