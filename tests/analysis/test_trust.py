"""Untrusted stores: opening one runs no code and allocates nothing its metadata claims.

Each store here is a valid synthetic trace whose metadata was then edited as an attacker or a
broken writer would: codecs that unpickle or rescale, Zarr v2 nodes, absurd or negative shapes,
wrong dims and types, oversized or malformed JSON. Every entry point refuses it with a
FormatError naming the node, before reading a chunk, and with next to no memory.
"""

from __future__ import annotations

import builtins
import json
import pickle
import shutil
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.registry
from synthetic_trace import Run
from zarr.abc.codec import BytesBytesCodec

import analysis
from analysis import store_format as sf
from analysis.cli import main
from analysis.verify import verify


def edit(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def sharding(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["codecs"][0]["configuration"]


def set_shape(meta: dict[str, Any], dim: int, size: int) -> None:
    meta["shape"][dim] = size


def huge_step(root: Path) -> None:
    """A step coordinate (and maps) of 2**40 steps: reading it would need 8 TiB."""
    edit(root / "run-0000/step/zarr.json", lambda m: set_shape(m, 0, 2**40))
    for name in sf.DIRECTIONS:
        edit(root / f"run-0000/{name}/zarr.json", lambda m: set_shape(m, 0, 2**40))


def nested_json(root: Path) -> None:
    (root / "run-0000/zarr.json").write_text("[" * 100_000 + "]" * 100_000)


def oversized_json(root: Path) -> None:
    meta = json.loads((root / "run-0000/zarr.json").read_text())
    meta["attributes"]["padding"] = "x" * (17 * 2**20)
    (root / "run-0000/zarr.json").write_text(json.dumps(meta))


def v2_node(root: Path) -> None:
    (root / "run-0000/txt2img/zarr.json").rename(root / "run-0000/txt2img/.zarray")


def meta_edit(node: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda root: edit(root / node / "zarr.json", change)


TXT = "run-0000/txt2img"
CASES = [
    (
        meta_edit(TXT, lambda m: sharding(m)["codecs"].insert(1, {"name": "numcodecs.astype"})),
        "uses codec 'numcodecs.astype'",
    ),
    (
        meta_edit(
            TXT, lambda m: m["codecs"].append({"name": "numcodecs.fixedscaleoffset"})
        ),  # rescales values on decoding: a wrong picture
        "uses codec 'numcodecs.fixedscaleoffset'",
    ),
    (meta_edit("run-0000/step", lambda m: m.update(data_type="object")), "data type 'object'"),
    (huge_step, "with a dim longer than"),
    (meta_edit(TXT, lambda m: set_shape(m, 5, -10)), "negative size"),
    (meta_edit(TXT, lambda m: set_shape(m, 5, 11)), "has 11 values along 'x' but"),
    (
        meta_edit(TXT, lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[0] * 6)),
        "not 6 positive integers",
    ),
    (
        meta_edit(TXT, lambda m: sharding(m).update(chunk_shape=[1, 1, 3, 1, 2**15, 2**15])),
        "has chunks of",
    ),
    (
        meta_edit(
            TXT, lambda m: m.update(dimension_names=["step", "layer", "head", "span", "x", "y"])
        ),
        "has dims",
    ),
    (meta_edit(TXT, lambda m: m.update(dimension_names=None)), "dimension names None"),
    (meta_edit(TXT, lambda m: m.update(data_type="float64")), "the format says one of"),
    (meta_edit(TXT, lambda m: m["attributes"].update(scale_factor=10.0)), "change its values"),
    (meta_edit(TXT, lambda m: m.update(storage_transformers=[{"name": "x"}])), "transformers"),
    (meta_edit("run-0000/rgb", lambda m: set_shape(m, 0, 4)), "the format says 3"),
    (
        meta_edit("run-0000", lambda m: m["attributes"].update(steps_complete="0,1,2,3")),
        "'steps_complete' attribute that is not a list of ints",
    ),
    (
        meta_edit("run-0000", lambda m: m["attributes"].update(spans={"cat": "1"})),
        "'spans' attribute that is not name -> list of ints",
    ),
    (nested_json, "is not valid JSON"),
    (oversized_json, "larger than 16 MiB"),
    (v2_node, "Zarr v2 metadata"),
]


@pytest.fixture
def hostile(make_store) -> Path:
    path, _ = make_store(Run(entities={"cat": (slice(0, 24), slice(0, 40))}))
    return path


@pytest.mark.parametrize(("damage", "message"), CASES, ids=[m for _, m in CASES])
def test_absurd_metadata_is_refused_before_anything_is_read(hostile, capsys, damage, message):
    damage(hostile)
    tracemalloc.start()
    try:
        with pytest.raises(sf.FormatError) as caught:
            analysis.open_trace(hostile)
        with pytest.raises(sf.FormatError):
            analysis.trace_info(hostile)
        report = verify(hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in str(caught.value), str(caught.value)
    assert "run-0000" in str(caught.value)
    assert not report.ok and any(message in f.message for f in report.errors), report.findings
    assert peak < 64 * 2**20 or damage is oversized_json, f"peak {peak / 2**20:.0f} MiB"
    assert main(["info", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnscope: error: ") and message in err and "Traceback" not in err


# ------------------------------------------------------------------------ code execution

MARKER: Path | None = None


class Payload:
    """Unpickling this creates MARKER: proof that a store ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@dataclass(frozen=True)
class PickleCodec(BytesBytesCodec):
    """A pickling codec, as an installed plugin could register one under a numcodecs name."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PickleCodec:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": "numcodecs.pickle"}

    async def _decode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        pickle.loads(chunk_bytes.to_bytes())  # the attack under test
        raise ValueError("unpickled a chunk")

    async def _encode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return chunk_bytes

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
        raise NotImplementedError


@pytest.fixture
def pickling_codec(monkeypatch):
    registry = getattr(zarr.registry, "__codec_registries")["numcodecs.pickle"]
    monkeypatch.setitem(registry, "tests.PickleCodec", PickleCodec)


def plant_pickle(root: Path, marker: Path) -> None:
    """Make the step coordinate decode through the pickling codec, with a payload chunk."""
    edit(
        root / "run-0000/step/zarr.json",
        lambda m: m.update(codecs=[m["codecs"][0], {"name": "numcodecs.pickle"}]),
    )
    (root / "run-0000/step/c/0").write_bytes(pickle.dumps(Payload(marker)))


def test_a_pickling_codec_is_never_decoded(hostile, tmp_path, pickling_codec, capsys):
    marker = tmp_path / "code-ran"
    # The threat is real here: plain zarr decodes through the registered codec and runs it.
    control = tmp_path / "control.zarr"
    shutil.copytree(hostile, control)
    plant_pickle(control, marker)
    with pytest.raises(ValueError, match="unpickled"):
        zarr.open_array(control / "run-0000/step", mode="r")[:]
    assert marker.exists()
    marker.unlink()

    plant_pickle(hostile, marker)
    for call in (analysis.list_runs, analysis.open_trace, analysis.trace_info):
        with pytest.raises(sf.FormatError, match=r"uses codec 'numcodecs\.pickle'"):
            call(hostile)
    assert not verify(hostile).ok
    for verb in ("info", "verify"):
        assert main([verb, str(hostile)]) == (1 if verb == "verify" else 2)
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def test_a_zarr_v2_store_with_a_pickle_filter_is_never_opened(tmp_path):
    marker = tmp_path / "code-ran"
    root = tmp_path / "v2.zarr"
    (root / "run-0000" / "step").mkdir(parents=True)
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / ".zattrs").write_text(json.dumps({sf.FORMAT_ATTR: sf.FORMAT_VERSION}))
    (root / "run-0000" / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    array = {
        "zarr_format": 2,
        "shape": [1],
        "chunks": [1],
        "dtype": "|O",
        "compressor": None,
        "fill_value": None,
        "filters": [{"id": "pickle"}],
        "order": "C",
    }
    (root / "run-0000" / "step" / ".zarray").write_text(json.dumps(array))
    (root / "run-0000" / "step" / "0").write_bytes(pickle.dumps(np.array([Payload(marker)])))
    for call in (analysis.list_runs, analysis.open_trace, analysis.trace_info):
        with pytest.raises(sf.FormatError, match="Zarr v2 metadata"):
            call(root)
    assert [f.level for f in verify(root).findings] == ["error"]
    assert not marker.exists()
