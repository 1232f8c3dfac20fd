"""`attnscope verify STORE`: decode every stored chunk and check every run's metadata.

A store is checked as a stranger's would be: the metadata first, as plain JSON, against the
format and sane limits (`analysis.trust`), before any array is opened; then every chunk of every
array of every run is read and decoded (each chunk carries a CRC32C, each shard index its own), and
every step a run lists complete must hold data. The metadata must agree with itself: the format
version, each variable's dims, the coordinates with the run's attributes (`steps_complete`,
`spans`, `span_tokens`, `capture`), the status with the steps listed.

Findings are errors (the store is damaged or inconsistent: something a reader would show wrongly
or fail on) or notes (what a crash leaves and readers handle: a partial or failed run, stray
`*.partial` temporary files, an interrupted run creation). `verify` never writes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr

from . import store_format as sf
from . import trust
from .consistency import Finding, run_findings
from .open import PathLike, location, read_only_store
from .selection import describe_values

BLOCK_BYTES = 64 * 2**20  # decoded bytes read at once; a damaged block is re-read chunk by chunk
MAX_FINDINGS_PER_ARRAY = 20


@dataclass
class Report:
    """What `verify` checked and found."""

    store: str
    findings: list[Finding] = field(default_factory=list)
    runs: int = 0
    arrays: int = 0
    chunks: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "note"]

    @property
    def ok(self) -> bool:
        """True when nothing is damaged or inconsistent (notes allowed)."""
        return not self.errors

    def error(self, where: str, message: str) -> None:
        self.findings.append(Finding("error", where, message, blocks_reading=True))

    def note(self, where: str, message: str) -> None:
        self.findings.append(Finding("note", where, message))

    def summary(self) -> str:
        errors, notes = len(self.errors), len(self.notes)
        return (
            f"checked {self.runs} runs, {self.arrays} arrays, {self.chunks} chunks: "
            f"{errors} error{'s' * (errors != 1)}, {notes} note{'s' * (notes != 1)}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "runs": self.runs,
            "arrays": self.arrays,
            "chunks": self.chunks,
            "findings": [asdict(f) for f in self.findings],
        }


def verify(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> Report:
    """Check every run, variable and chunk of the store at `path`; never writes.

    Raises FileNotFoundError when a local path does not exist; everything else is a finding.
    """
    where = location(path)
    report = Report(store=where)
    try:
        store = read_only_store(path, storage_options)
    except sf.FormatError as exc:
        report.error("store", str(exc))
        return report
    keys = set(trust.list_prefix(store, ""))
    try:
        attrs = trust.check_root(store, where)
        sf.check_version(attrs, where=where)
    except sf.FormatError as exc:
        report.error("store", str(exc))
        if "zarr.json" not in keys:
            return report  # not a Zarr v3 store at all: nothing below to check
        # A damaged root hides nothing below it: every run is still checked.
    partials = sorted(_partial_prefixes(keys))
    for key in partials[:MAX_FINDINGS_PER_ARRAY]:
        report.note("store", f"stray temporary file {key} left by an interrupted write")
    if len(partials) > MAX_FINDINGS_PER_ARRAY:
        report.note("store", f"... and {len(partials) - MAX_FINDINGS_PER_ARRAY} more")
    runs = []
    for entry in trust.list_dir(store, ""):
        if entry in ("zarr.json", sf.CLAIMS) or entry.endswith(".partial"):
            continue
        if sf.run_index(entry) is not None:
            if trust.exists(store, f"{entry}/zarr.json"):
                runs.append(entry)
            else:
                report.note(
                    entry,
                    "a folder without zarr.json: a run whose creation was interrupted before "
                    "its metadata was written; readers ignore it",
                )
        else:
            report.note("store", f"{entry} is not part of the format; readers ignore it")
    if not runs:
        report.error("store", f"{where} holds no runs (no {sf.RUN_PREFIX}NNNN groups)")
    for name in runs:
        _verify_run(store, name, where, keys, report)
    return report


# ------------------------------------------------------------------------------------ one run


def _verify_run(store: Any, name: str, where: str, keys: set[str], report: Report) -> None:
    report.runs += 1
    try:
        attrs: dict[str, Any] | None = trust.check_run_group(store, name, where)
    except sf.FormatError as exc:
        report.error(name, str(exc))
        attrs = None  # its arrays are still checked, with what their own metadata says
    arrays = trust.check_run_arrays(
        store, name, where, on_problem=lambda node, exc: report.error(node, str(exc))
    )
    for array_name, info in arrays.items():
        if not info["checksummed"]:
            report.error(
                f"{name}/{array_name}",
                "has no CRC32C checksum: damage to its chunks would go unnoticed",
            )
    with sf.quiet_zarr():
        opened = {a: zarr.open_array(store, path=f"{name}/{a}", mode="r") for a in arrays}
    status = None if attrs is None else attrs.get(sf.STATUS)
    complete = status == sf.COMPLETE
    coords: dict[str, np.ndarray] = {}
    for coord in [a for a, info in arrays.items() if len(info["shape"]) <= 1]:
        values = _read_small(opened[coord], name, coord, arrays[coord], report, complete, where)
        if values is not None:
            coords[coord] = values
    if attrs is not None:
        keepbits = {d: sf.keepbits_of(opened[d]) for d in sf.DIRECTIONS if d in arrays}
        report.findings += run_findings(name, attrs, arrays, coords, keepbits)

    steps = [int(s) for s in coords.get("step", [])]
    listed = set(int(s) for s in (attrs or {}).get(sf.STEPS_COMPLETE, []))
    labels = {
        dim: [v.item() if isinstance(v, np.generic) else v for v in coords[dim]]
        for dim in ("step", "layer", "head", "span", "token")
        if dim in coords
    }
    for array_name, info in arrays.items():
        if len(info["shape"]) <= 1:
            continue
        positions = None
        if array_name in sf.DIRECTIONS and attrs is not None:
            positions = {i for i, s in enumerate(steps) if s in listed}
        elif array_name in sf.DIRECTIONS:
            positions = set()  # which steps are complete is unknown: check decoding only
        _verify_array(
            keys,
            opened[array_name],
            name,
            array_name,
            info,
            positions,
            labels,
            complete,
            where,
            report,
            steps_unknown=attrs is None,
            skipped=sf.skipped_positions(attrs or {}, steps, labels.get("layer", [])),
        )

    if status is not None and not complete:
        missing = [s for s in steps if s not in listed]
        state = "still recording or was killed" if status == sf.RECORDING else status
        done = [s for s in steps if s in listed]
        report.note(
            name,
            f"is partial ({state}): steps {describe_values(missing) or 'none'} are not complete; "
            f"readers use the {len(done)} complete steps {describe_values(done) or '(none)'}",
        )


def _read_small(
    array: zarr.Array,
    run: str,
    name: str,
    info: Mapping[str, Any],
    report: Report,
    complete: bool,
    where: str,
) -> np.ndarray | None:
    """Read a coordinate (a 0-d or 1-d array) whole, reporting a missing or damaged object."""
    report.arrays += 1
    checked = trust.CheckedArray(array, f"{run}/{name} in {where}", dims=info["dims"])
    report.chunks += array.nchunks
    if array.nchunks_initialized < array.nchunks and math.prod(info["shape"]) > 0:
        message = f"{run}/{name}: its data object is missing (it reads as fill values)"
        (report.error if complete else report.note)(f"{run}/{name}", message)
        return None
    try:
        return np.asarray(checked[...])
    except trust.CorruptChunkError as exc:
        report.error(f"{run}/{name}", str(exc))
        return None


def _blocks(shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int] | None, itemsize):
    """Regions to read, aligned to chunks: whole shards, narrowed until under BLOCK_BYTES."""
    block = list(shards or chunks)
    for dim in range(len(block)):
        if math.prod(block) * itemsize <= BLOCK_BYTES:
            break
        block[dim] = chunks[dim]
    ranges = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
    for start in itertools.product(*ranges):
        yield tuple(slice(s, min(s + b, n)) for s, b, n in zip(start, block, shape, strict=True))


def _verify_array(
    present: set[str],
    array: zarr.Array,
    run: str,
    name: str,
    info: Mapping[str, Any],
    listed: set[int] | None,
    labels: Mapping[str, Sequence[Any]],
    complete: bool,
    where: str,
    report: Report,
    steps_unknown: bool = False,
    skipped: Sequence[tuple[int, int]] = (),
) -> None:
    """Decode every chunk of one array; listed steps of an attention variable must hold data."""
    report.arrays += 1
    label = f"{run}/{name}"
    checked = trust.CheckedArray(array, f"{label} in {where}", labels=labels, dims=info["dims"])
    findings = 0

    def found(level: str, message: str) -> None:
        nonlocal findings
        findings += 1
        if findings <= MAX_FINDINGS_PER_ARRAY:
            (report.error if level == "error" else report.note)(label, message)

    for region in _blocks(array.shape, array.chunks, array.shards, array.dtype.itemsize):
        indices = list(checked.chunks_in(region))
        report.chunks += len(indices)
        step = region[0].start if name in sf.DIRECTIONS else None
        must_hold = listed is None or step in listed  # other arrays: always
        objects = {trust.object_key(array, i) for i in indices}
        absent = sorted(k for k in objects if k not in present)
        if absent:
            if name in sf.DIRECTIONS:
                if must_hold:
                    found(
                        "error",
                        f"step {labels['step'][step]} is listed complete but its "
                        f"object {absent[0]} is missing",
                    )
                continue  # an unlisted step never written: nothing to check
            message = f"object {absent[0]} is missing (its {name} reads as fill values)"
            found("error" if complete else "note", message)
            continue
        try:
            values = np.asarray(array[region])
        except Exception:
            values = None
        if values is not None and not (must_hold and values.dtype.kind == "f"):
            continue
        if values is not None and not np.isnan(values).any():
            continue
        # Something is wrong in this block: name every chunk that is.
        failures: list[tuple[tuple[int, ...], Exception]] = []
        lost: list[tuple[int, ...]] = []
        for index in indices:
            try:
                chunk = checked.read_chunk(index)
            except Exception as exc:
                failures.append((index, exc))
                continue
            by_design = name in sf.DIRECTIONS and tuple(index[:2]) in skipped
            if must_hold and chunk.dtype.kind == "f" and np.isnan(chunk).any() and not by_design:
                lost.append(index)
        # A run whose own metadata is unreadable can't say which steps it completed: a chunk
        # that fails to decode there is damage either way.
        damage = must_hold or steps_unknown
        suffix = "" if damage else "; its step is not listed complete, readers ignore it"
        level = "error" if damage else "note"
        if failures and len(failures) == len(indices) > 1:
            index, exc = failures[0]
            found(
                level,
                f"every one of the {len(indices)} chunks in object {trust.object_key(array, index)}"
                f" fails to decode ({type(exc).__name__}: {trust.short_reason(exc)}): the object "
                f"is truncated or overwritten{suffix}",
            )
            failures = []
        for index, exc in failures:
            found(
                level,
                f"{checked.describe(index)} cannot be decoded ({type(exc).__name__}: "
                f"{trust.short_reason(exc)}){suffix}",
            )
        for index in lost:
            found(
                "error",
                f"step {labels['step'][index[0]]} is listed complete but "
                f"{checked.describe(index)} reads as never written (NaN): the object is empty "
                f"or lost the chunk",
            )
    if findings > MAX_FINDINGS_PER_ARRAY:
        report.error(label, f"... and {findings - MAX_FINDINGS_PER_ARRAY} more findings")


# ------------------------------------------------------------------------------- metadata


def format_report(report: Report) -> str:
    """The report as the CLI prints it."""
    lines = [f"verify {report.store}"]
    for finding in report.findings:
        lines.append(f"  {finding.level:<5}  {finding.where}: {finding.message}")
    lines.append(("ok: " if report.ok else "FAILED: ") + report.summary())
    return "\n".join(lines)


def _partial_prefixes(keys: set[str]) -> set[str]:
    """Temporary files and folders (`*.partial`) among store keys, each named once."""
    found = set()
    for key in keys:
        parts = key.split("/")
        for i, part in enumerate(parts):
            if part.endswith(".partial"):
                found.add("/".join(parts[: i + 1]))
                break
    return found
