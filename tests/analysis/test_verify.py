"""Corruption is reported, never plotted: `attnscope verify` and reads through `open_trace`.

Stores are written without attnscope's reader (synthetic_trace, through zarr), then damaged the
way disks and copies damage them: a flipped byte, a truncated or emptied object, a lost object.
The damage is found by decoding (each chunk's CRC32C, each shard index's own) and by the run's
metadata disagreeing with itself.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from synthetic_trace import Run

import analysis
from analysis import store_format as sf
from analysis.cli import main
from analysis.trust import CorruptChunkError
from analysis.verify import format_report, verify

ENTITIES = {"cat": (slice(0, 24), slice(0, 40))}


@pytest.fixture
def clean(make_store) -> Path:
    """A complete run, bit-rounded, with an image and an entity mask, plus a partial run."""
    path, _ = make_store(
        Run(keepbits=9, entities=ENTITIES),
        Run(steps=5, status=sf.RECORDING, complete=[0, 1], written=[0, 1, 2]),
    )
    return path


def flip(path: Path, offset: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset)] ^= 0x01
    path.write_bytes(bytes(data))


def objects(root: Path) -> list[str]:
    """Every data object (chunk or shard) of the store, as store keys."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )


def checksummed(root: Path, key: str) -> bool:
    """Whether the object's array puts a CRC32C on its chunks."""
    array = key.split("/c/")[0] if "/c/" in key else key.rsplit("/c", 1)[0]
    meta = json.loads((root / array / "zarr.json").read_text())
    return "crc32c" in json.dumps(meta["codecs"])


def test_a_clean_store_verifies(clean, capsys):
    report = verify(clean)
    assert report.ok, format_report(report)
    assert report.runs == 2
    # run-0000: 4 steps x 5 layers x 3 spans chunks per direction; run-0001: 3 steps written
    # (2 listed) of 5, and a chunk count that covers the whole grid either way.
    assert report.chunks >= 2 * (4 * 5 * 3) + 2 * (5 * 5 * 3)
    [note] = report.notes
    assert "run-0001" in note.where and "is partial" in note.message and "2..4" in note.message
    assert main(["verify", str(clean)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("ok: checked 2 runs")
    assert main(["verify", str(clean), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_a_flipped_byte_in_any_checksummed_object_is_reported_with_its_variable(clean, tmp_path):
    keys = [k for k in objects(clean) if checksummed(clean, k)]
    assert len(keys) >= 2 * 4 + 2 * 3 + 2  # shards of both runs, the image, the entity mask
    missed = []
    for key in keys:
        damaged = tmp_path / "damaged.zarr"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(clean, damaged)
        flip(damaged / key)
        report = verify(damaged)
        variable = re.sub(r"/c(/.*)?$", "", key)  # a scalar's only chunk is `<array>/c`
        hits = [f for f in report.errors if f.where == variable and key in f.message]
        if key.startswith("run-0001/") and "/c/2/" in key:
            # Step 2 of the partial run is written but unlisted: reported, as a note only.
            hits = [f for f in report.notes if f.where == variable and key in f.message]
        elif report.ok:
            missed.append(key)
        if not hits:
            missed.append(f"{key}: {format_report(report)}")
    assert not missed, "\n".join(missed)


def flip_stored_chunk(shard: Path, layer: int, token: int, shape: tuple[int, ...]) -> None:
    """Flip a byte in the middle of one (layer, token) chunk of a step shard of an array of
    `shape`, found through the shard's index (Zarr v3 sharding: at its end, an (offset, size)
    uint64 pair per chunk in C order over (layer, token), then the index's CRC32C)."""
    _, n_layers, _, n_tokens, *_ = shape
    data = bytearray(shard.read_bytes())
    index = len(data) - 4 - 16 * n_layers * n_tokens
    entry = index + 16 * (layer * n_tokens + token)
    offset, size = (int(v) for v in np.frombuffer(bytes(data[entry : entry + 16]), dtype="<u8"))
    data[offset + size // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_damaged_chunk_is_never_plotted(clean, tmp_path, capsys):
    shard = clean / "run-0000" / "txt2img" / "c" / "2" / "0" / "0" / "0" / "0" / "0"
    # A chunk the figure needs: layer 0's row of "cat", a token of the span `prompt`.
    rows = zarr.open_group(clean, path="run-0000", mode="r")["txt2img"]
    flip_stored_chunk(shard, layer=0, token=1, shape=rows.shape)
    ds = analysis.open_trace(clean, run=0)  # opening reads no chunk: it works
    with pytest.raises(CorruptChunkError) as caught:
        ds.txt2img.sel(span="prompt").mean(["step", "layer"]).compute()
    message = str(caught.value)
    assert "run-0000/txt2img" in message
    assert "stored chunk (2, " in message and "step 2" in message and "token " in message
    assert "run-0000/txt2img/c/2/0/0/0/0/0" in message
    # Steps that are intact still read.
    rows = analysis.open_trace(clean, run=0, tokens=True)
    np.testing.assert_array_equal(
        rows.txt2img.sel(step=[0, 1, 3]).values,
        zarr.open_group(clean, path="run-0000", mode="r")["txt2img"][[0, 1, 3]],
    )

    figure = tmp_path / "cat.png"
    argv = ["heatmap", str(clean), "--run", "0", "--span", "prompt", "-o", str(figure), "-q"]
    assert main(argv) == 2  # a damaged store: a user-facing error
    err = capsys.readouterr().err
    assert err.startswith("attnscope: error: run-0000/txt2img in ") and "stored chunk (2, " in err
    assert "Traceback" not in err
    assert not figure.exists()
    assert main(["verify", str(clean)]) == 1
    assert "FAILED: checked 2 runs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
        (lambda p: p.write_bytes(b""), "truncated"),
        (lambda p: p.unlink(), "is listed complete but its object"),
    ],
    ids=["truncated", "emptied", "lost"],
)
def test_truncated_emptied_or_lost_shards_of_listed_steps_are_reported(clean, damage, found):
    # An emptied shard reads as all fill values (NaN) through zarr: no decode error to catch.
    key = "run-0000/img2txt/c/1/0/0/0/0/0"
    damage(clean / key)
    report = verify(clean)
    assert not report.ok
    [error] = report.errors
    assert error.where == "run-0000/img2txt" and key in error.message and found in error.message
    ds = analysis.open_trace(clean, run=0)
    with pytest.raises(CorruptChunkError, match=r"run-0000/img2txt in .*step 1"):
        ds.img2txt.sel(step=1).values  # noqa: B018
    ds.img2txt.sel(step=[0, 2, 3]).values  # noqa: B018  (the rest reads)


@pytest.mark.parametrize("address", ["path", "url"], ids=["tensorstore", "zarr-python"])
def test_a_damaged_chunk_read_alone_is_refused(clean, address):
    # One map of a step: a partial read of its shard, which must still check that chunk. A
    # local folder's maps are read through TensorStore, a URL's through zarr-python.
    shard = clean / "run-0000" / "txt2img" / "c" / "2" / "0" / "0" / "0" / "0" / "0"
    rows = zarr.open_group(clean, path="run-0000", mode="r")["txt2img"]
    flip_stored_chunk(shard, layer=0, token=1, shape=rows.shape)
    ds = analysis.open_trace(clean if address == "path" else clean.as_uri(), run=0, tokens=True)
    # Alone (one stored chunk: zarr-python reads it either way), and with its neighbours (three
    # chunks of the shard: TensorStore reads them from a local folder).
    for tokens in (1, slice(0, 3)):
        with pytest.raises(CorruptChunkError, match=r"run-0000/txt2img in .*step 2"):
            ds.txt2img.isel(step=2, layer=0, token=tokens).values  # noqa: B018
    # Its neighbours in the same shard read.
    assert np.isfinite(ds.txt2img.isel(step=2, layer=0, token=2).values).all()
    assert np.isfinite(ds.txt2img.isel(step=2, layer=0, token=slice(2, 4)).values).all()


def test_one_unwritten_value_in_a_listed_step_is_refused_when_read(clean):
    # One NaN among a step's values (a chunk lost from inside its shard reads so): the read of
    # that step fails, naming it; the other steps read.
    array = zarr.open_array(clean / "run-0000" / "txt2img", mode="r+")
    array[1, 1, 2, 3, 4, 5] = np.nan
    ds = analysis.open_trace(clean, run=0)
    with pytest.raises(CorruptChunkError, match=r"run-0000/txt2img in .*step 1"):
        ds.txt2img_tokens.sel(step=1).values  # noqa: B018
    assert not np.isnan(ds.txt2img_tokens.sel(step=[0, 2, 3]).values).any()


def test_a_complete_run_missing_its_image_reports_it(clean):
    (clean / "run-0000" / "image" / "c" / "0" / "0" / "0").unlink()
    report = verify(clean)
    assert [f.where for f in report.errors] == ["run-0000/image"]
    ds = analysis.open_trace(clean, run=0)
    with pytest.raises(CorruptChunkError, match="image is missing"):
        ds.image.values  # noqa: B018


def edit_attrs(path: Path, run: str, **changes) -> None:
    group = zarr.open_group(path, path=run, mode="r+")
    group.attrs.update(changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({sf.STEPS_COMPLETE: [0, 1, 2]}, "is complete but steps 3 are not listed complete"),
        ({sf.STEPS_COMPLETE: [0, 1, 2, 3, 7]}, "lists steps [7] that the step coordinate lacks"),
        ({sf.STEPS_COMPLETE: [0, 1, 1, 2, 3]}, "repeats steps"),
        ({sf.STATUS: "done"}, "has status 'done'"),
        ({sf.SPANS: {"prompt": [0, 1], "pad": [7, 8]}}, "covers 2 of the 4 padding tokens"),
        ({sf.SPAN_TOKENS: {"cat": ["a", "cat"]}}, "1 token indices but 2 token strings"),
        ({"text_len": 3}, "reach outside the 3 text tokens"),
        ({"capture": {"layers": ["transformer_blocks.0"]}}, "'layer' (transformer_blocks.0"),
        ({"capture": {"heads": [0, 1, 2, 3]}}, "'head' (0..2) disagrees"),
        ({"capture": {"keepbits": 9}, "error_bound": 0.0}, "does not match keepbits 9"),
        ({"capture": {"keepbits": None}}, "stored with keepbits 9 but the capture settings say"),
        ({"capture": {"directions": ["txt2img"]}}, "holds ['img2txt'] but its capture"),
    ],
)
def test_metadata_that_disagrees_with_itself_is_an_error(clean, changes, message):
    edit_attrs(clean, "run-0000", **changes)
    report = verify(clean)
    assert not report.ok
    assert any(message in f.message for f in report.errors), format_report(report)


def test_crash_leftovers_are_notes_not_errors(clean):
    (clean / "zarr.4f2a.partial").write_bytes(b'{"attri')
    (clean / "run-0000" / "zarr.77aa.partial").write_bytes(b"{")
    shard_dir = clean / "run-0001" / "txt2img" / "c" / "3" / "0" / "0" / "0" / "0"
    shard_dir.mkdir(parents=True)
    (shard_dir / "0.9c1d.partial").write_bytes(b"\x00" * 100)
    (clean / "run-0002").mkdir()  # a run name claimed by a recorder killed at once
    report = verify(clean)
    assert report.ok, format_report(report)
    notes = "\n".join(f"{f.where}: {f.message}" for f in report.notes)
    for leftover in ("zarr.4f2a.partial", "run-0000/zarr.77aa.partial", "0.9c1d.partial"):
        assert f"stray temporary file {Path(leftover).name}" in notes or leftover in notes
    assert "run-0002: a folder without zarr.json" in notes
    # Readers are not disturbed either.
    assert [r.name for r in analysis.list_runs(clean)] == ["run-0000", "run-0001"]
    assert analysis.open_trace(clean, run=0).txt2img.notnull().all()


def test_flipped_coordinates_are_caught_by_their_cross_checks(clean):
    # Coordinate values are also checked against the run's attributes and the format:
    for name in ("step", "x"):
        damaged = clean.parent / f"{name}.zarr"
        shutil.copytree(clean, damaged)
        array = zarr.open_array(damaged / "run-0000" / name, mode="r+")
        values = array[:]
        values[1] += 1000
        array[:] = values
        report = verify(damaged)
        assert any(f.where == "run-0000" for f in report.errors), format_report(report)
        with pytest.raises(sf.FormatError, match="damaged"):
            analysis.open_trace(damaged, run=0).txt2img.values  # noqa: B018


def test_every_chunk_of_a_run_is_checksummed(clean):
    unchecked = [
        k for k in objects(clean) if k.startswith("run-0000/") and not checksummed(clean, k)
    ]
    assert not unchecked, unchecked


def test_a_broken_root_or_array_zarr_json_hides_no_damage_elsewhere(clean):
    (clean / "zarr.json").write_text("{truncated")
    (clean / "run-0001" / "txt2img" / "zarr.json").write_text("[]")
    shard = next(k for k in objects(clean) if k.startswith("run-0000/img2txt/"))
    flip(clean / shard)
    report = verify(clean)
    errors = {f.where: f.message for f in report.errors}
    assert "zarr.json is not valid JSON" in errors["store"]
    assert "is not Zarr v3 metadata" in errors["run-0001/txt2img"]
    assert "run-0000/img2txt" in errors and "cannot be decoded" in errors["run-0000/img2txt"]
    assert report.runs == 2


def test_a_broken_run_zarr_json_still_has_its_chunks_decoded(clean):
    (clean / "run-0000" / "zarr.json").write_text("")
    flip(clean / next(k for k in objects(clean) if k.startswith("run-0000/txt2img/")))
    errors = {f.where: f.message for f in verify(clean).errors}
    assert "run-0000" in errors
    assert "cannot be decoded" in errors["run-0000/txt2img"]


def test_a_variable_without_a_checksum_is_reported(clean):
    meta_path = clean / "run-0000" / "rgb" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
    meta_path.write_text(json.dumps(meta))
    [finding] = [f for f in verify(clean).errors if f.where == "run-0000/rgb"]
    assert "no CRC32C checksum" in finding.message
