"""`attnscope view`: its options, its export file, and the warning off loopback."""

from __future__ import annotations

import json
import re

import pytest

from analysis.cli import main


def test_export_writes_one_self_contained_page(store, tmp_path):
    path, _ = store
    out = tmp_path / "cat.html"
    assert main(["view", str(path), "--export", str(out), "--span", "cat", "-q"]) == 0
    page = out.read_text()
    assert 'src="static/' not in page and 'href="static/' not in page  # nothing to fetch
    data = json.loads(re.search(r"window.ATTNSCOPE_EXPORT = (.*);\n", page).group(1))
    assert data["state"] == {"run": "run-0000", "direction": "txt2img", "span": "cat"}
    maps = [key for key in data["answers"] if key.startswith("api/map?")]
    assert len(maps) == 1 + 4 + 5 + 3  # all at the means, then each step, layer and head
    assert data["image"].startswith("data:image/png;base64,")
    assert not any("frame=" in key for key in data["answers"])  # an image run has no frames


def test_an_exported_video_page_holds_each_frame(make_store, tmp_path):
    from synthetic_trace import Run

    path, _ = make_store(Run(frames=3))
    out = tmp_path / "cat.html"
    assert main(["view", str(path), "--export", str(out), "--span", "cat", "-q"]) == 0
    page = out.read_text()
    data = json.loads(re.search(r"window.ATTNSCOPE_EXPORT = (.*);\n", page).group(1))
    maps = [key for key in data["answers"] if key.startswith("api/map?")]
    assert len(maps) == 1 + 4 + 5 + 3 + 3  # the means, each step, layer, head and frame
    assert any("frame=2" in key for key in maps)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--export", "x.png"], "--export writes an HTML page; name it .html"),
        (["--span", "cat", "--no-browser"], "--span and --direction choose what --export"),
        (["--run", "run-0007", "--no-browser"], "unknown run 'run-0007'"),
        (["--export", "x.html", "--span", "zebra"], "unknown span 'zebra'"),
    ],
)
def test_bad_options_fail_before_serving(store, tmp_path, capsys, argv, message, monkeypatch):
    path, _ = store
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serving_off_loopback_warns(store, capsys, monkeypatch, host, warned):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    path, _ = store
    assert main(["view", str(path), "--host", host, "--port", "8766", "--no-browser"]) == 0
    assert served == {"host": host, "port": 8766, "log_level": "warning"}
    assert ("not loopback" in capsys.readouterr().err) is warned
