"""Nothing in analysis writes into a trace store: every file is byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

from synthetic_trace import Run

import analysis
from analysis import store_format as sf
from analysis.cli import main


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(root)) + "/": (0, 0, "") for p in root.rglob("*") if p.is_dir()}


def test_every_call_and_verb_leaves_the_store_untouched(make_store, tmp_path, capsys):
    path, _ = make_store(
        Run(entities={"entity0": (slice(0, 24), slice(0, 40))}),
        Run(status=sf.RECORDING, complete=[0, 1, 2]),
    )
    before = snapshot(path)
    out = tmp_path / "out"
    out.mkdir()

    assert analysis.open_store(path).store.read_only
    ds = analysis.open_trace(path, run=0)
    da = ds.txt2img.sel(span="cat")
    mask = ds.entity_mask.sel(entity="entity0")
    analysis.head_similarity(da, metric="js").compute()
    analysis.step_drift(da).compute()
    analysis.convergence(da, tol=0.1).compute()
    analysis.entropy(da).compute()
    analysis.concentration(da).compute()
    analysis.mask_agreement(da, mask).compute()
    analysis.rank_heads(da, mask)
    analysis.trace_info(path)
    analysis.heatmap(da.mean(["step", "layer", "head"]), path=out / "a.png")
    analysis.overlay(da.mean(["step", "layer", "head"]), ds.image, out / "b.png")
    analysis.grid(da.mean("layer"), row="head", col="step", path=out / "c.png")
    analysis.animate(da.mean(["layer", "head"]), out / "d.gif", progress=False)
    for argv in (
        ["info", path],
        ["heatmap", path, "--span", "cat", "-o", out / "e.png"],
        ["heads", path, "--span", "cat", "-o", out / "f.png"],
        ["steps", path, "--span", "cat", "--gif", "-o", out / "g.png"],
        ["steps", path, "--run", "0", "--span", "mat", "--gif", "-o", out / "h.png"],
    ):
        assert main([str(a) for a in argv] + (["-q"] if argv[0] != "info" else [])) == 0
    capsys.readouterr()

    assert snapshot(path) == before
    assert len(list(out.iterdir())) == 13  # every output went where it was told
