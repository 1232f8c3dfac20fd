"""bench.gpu is run on a GPU box only now and then: its code path is kept working here."""

from __future__ import annotations

import json

import pytest

from bench.gpu import main, requires


def test_the_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["geometry"]["name"] == "quick"
    assert figures["traced_over_untraced"] > 0
    # The first traced run in the process and a later one, each against its own pair.
    first = figures["traced_over_untraced_first_run"]
    later = figures["traced_over_untraced_later_run"]
    assert first > 0 and later > 0
    assert figures["traced_over_untraced"] == pytest.approx((first + later) / 2)  # two pairs
    assert figures["bytes_written"] > 0
    # A 6-word prompt: its tokens, </s> and the padding row.
    assert figures["token_rows"] >= 7
    layers = figures["geometry"]["num_layers"] + figures["geometry"]["num_single_layers"]
    grid = (figures["geometry"]["height"] // 16) * (figures["geometry"]["width"] // 16)
    per_row = figures["geometry"]["steps"] * layers * figures["geometry"]["num_attention_heads"]
    assert figures["decoded_bytes"] == 2 * per_row * figures["token_rows"] * grid * 4
    assert figures["decoded_gb_s"] > 0
    assert figures["gpu_memory_added_bytes"] is None  # no CUDA here


def test_the_wheels_it_carries_cover_what_the_tracer_imports_and_leave_torch():
    pins = {pin.split("==")[0].lower() for pin in requires()}
    needed = {"diffusers", "transformers", "tokenizers", "zarr", "zarrs", "numcodecs", "xarray"}
    assert needed | {"dask"} <= pins
    assert not pins & {"torch", "torchvision", "numpy", "attnscope"}
