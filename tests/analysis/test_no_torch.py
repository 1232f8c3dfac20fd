"""The analysis half runs where torch cannot be imported, and never imports torch or the tracer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from synthetic_trace import Run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_torch(tmp_path) -> dict[str, str]:
    """An environment in which `import torch` fails, as on a laptop without it."""
    block = tmp_path / "blocked"
    (block / "torch").mkdir(parents=True)
    (block / "torch" / "__init__.py").write_text(
        'raise ImportError("No module named torch (blocked by the test)")\n'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), str(REPO)]), MPLBACKEND="Agg")
    return env


def python(env: dict[str, str], *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_cli_draws_every_figure_without_torch(make_store, no_torch, tmp_path):
    path, _ = make_store(Run(entities={"entity0": (slice(0, 24), slice(0, 40))}))
    blocked = python(no_torch, "-c", "import torch", cwd=tmp_path)
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr

    verbs = {
        "info": ["info", str(path)],
        "heatmap": ["heatmap", str(path), "--span", "cat", "--head", "1", "-o", "map.png"],
        "overlay": ["heatmap", str(path), "--span", "cat", "--overlay", "-o", "over.png"],
        "heads": ["heads", str(path), "--span", "cat", "--layer", "double:*", "-o", "heads.png"],
        "steps": ["steps", str(path), "--span", "mat", "--gif", "-o", "steps.png"],
        "view": ["view", str(path), "--export", "cat.html", "--span", "cat"],
    }
    outputs = {}
    for verb, argv in verbs.items():
        done = python(no_torch, "-m", "analysis", *argv, "-q", cwd=tmp_path)
        assert done.returncode == 0, f"{verb}: {done.stderr}"
        outputs[verb] = done.stdout
    assert "run-0000  complete" in outputs["info"]
    assert "window.ATTNSCOPE_EXPORT" in (tmp_path / "cat.html").read_text()
    figures = ["map.png", "over.png", "heads.png", "heads-similarity.png"]
    figures += ["steps.png", "steps-drift.png", "steps.gif"]
    for name in figures:
        with Image.open(tmp_path / name) as image:
            assert min(image.size) > 50, name

    record = python(no_torch, "-m", "analysis", "record", "--demo", "--out", "x.zarr", cwd=tmp_path)
    assert record.returncode != 0
    assert "pip install -e '.[tracer]'" in record.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_analysis_never_imports_torch_or_the_tracer(store, tmp_path):
    path, _ = store
    code = f"""
import json, sys
import analysis.store_format
light = sorted(m for m in ("matplotlib", "seaborn", "dask") if m in sys.modules)
import analysis
from analysis.cli import main
names = [getattr(analysis, name) for name in analysis.__all__]
status = main(["heatmap", {str(path)!r}, "--span", "cat", "-o", "m.png", "-q"])
status += main(["heads", {str(path)!r}, "--span", "cat", "-o", "h.png", "-q"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tracer"))
print(json.dumps({{"status": status, "heavy": heavy, "light": light, "names": len(names)}}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    done = python(env, "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"status": 0, "heavy": [], "light": [], "names": report["names"]}
    assert report["names"] > 20
