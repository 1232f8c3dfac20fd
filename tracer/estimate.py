"""What a recording will cost, said before anything is generated: bytes and host throughput."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analysis import store_format as fmt
from analysis.errors import WriterError
from tracer.adapters import adapter_for
from tracer.durable import disk_sync_rate, unwritten_bytes_allowed
from tracer.rounding import MODEL_PRECISION, keepbits_for
from tracer.session import Selector, check_max_pending_steps, select_indices, select_layers
from tracer.spans import token_rows
from tracer.store import folder_beside
from tracer.write_probe import writer_rate

# Stored bytes per value at keepbits 9 (a float32 model's default) down to 5 (a bf16 model's
# default is 7), as docs/benchmarks.md measures them (*Compressor choice*: the format's
# bit-shuffled LZ4 over a real demo recording's FLUX-shaped chunks; `python -m bench --rerun
# codecs`). Other settings are estimated without any compression credit: sign, exponent and kept
# mantissa bits, rounded up to whole bytes.
MEASURED_BYTES_PER_VALUE = {9: 1.67, 8: 1.54, 7: 1.42, 6: 1.30, 5: 1.17}
H100_STEP_SECONDS = 0.15  # FLUX.1-dev, 1024², bf16
# Large enough that a disk's cache does not answer for it, small enough to say at once.
DISK_PROBE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Estimate:
    """The size of one recorded generation and the rate it needs."""

    layers: int
    heads: int
    rows: int
    grid: tuple[int, ...]  # (y, x); a video's (frame, y, x)
    steps: int
    directions: tuple[str, ...]
    keepbits: int | None
    step_seconds: float
    fsync: bool = True  # each step synced before it is listed (tracer.trace's fsync)
    disk_rate: float | None = None  # bytes/s the disk the store goes to synced; None: not probed
    disk_error: str | None = None  # why the disk could not be probed (a full or read-only one)
    # With fsync off, the unsynced bytes the kernel lets a writer leave before it waits for the
    # disk (tracer.durable.unwritten_bytes_allowed); None: not known.
    unwritten_allowed: int | None = None
    device: str = "cpu"  # where the maps are made (and rounded, before the copy to the host)
    max_pending_steps: int = 2  # steps taken and not yet on disk (tracer.trace's)
    # Decoded bytes/s the writer sustained here in a probe, this host's cores and disk together
    # (tracer.write_probe); None: not probed.
    write_rate: float | None = None
    write_error: str | None = None  # why the writer could not be probed

    @property
    def step_bytes(self) -> int:
        """Decoded bytes of one step's maps."""
        return (
            self.layers * self.heads * self.rows * math.prod(self.grid) * 4 * len(self.directions)
        )

    @property
    def generation_bytes(self) -> int:
        """Decoded bytes of the whole generation."""
        return self.step_bytes * self.steps

    @property
    def stored_bytes(self) -> float:
        """Expected bytes on disk for the whole generation."""
        per_value = MEASURED_BYTES_PER_VALUE.get(self.keepbits)
        if per_value is None:
            bits = 32 if self.keepbits is None else 1 + 8 + self.keepbits
            per_value = -(-bits // 8)
        return self.generation_bytes / 4 * per_value

    @property
    def rate_needed(self) -> float:
        """Decoded bytes per second the host must write to keep up at `step_seconds` a step."""
        return self.step_bytes / self.step_seconds

    @property
    def disk_rate_needed(self) -> float:
        """Expected bytes per second the disk must take (and sync) to keep up at `step_seconds`
        a step: where the disk is slower, the generation waits for it."""
        return self.stored_bytes / self.steps / self.step_seconds

    @property
    def disk_ratio(self) -> float | None:
        """The least traced/untraced the probed disk allows at `step_seconds` a step: the
        generation waits for the disk once it is slower than the steps (1.0 where it keeps up);
        None where no disk was probed."""
        if self.disk_rate is None:
            return None
        return max(1.0, self.stored_bytes / self.disk_rate / (self.steps * self.step_seconds))

    @property
    def write_ratio(self) -> float | None:
        """The least traced/untraced the probed writer allows at `step_seconds` a step: the
        generation waits for it once it takes steps slower than they come (1.0 where it keeps
        up); None where it was not probed."""
        if self.write_rate is None:
            return None
        return max(1.0, self.rate_needed / self.write_rate)

    @property
    def _kept(self) -> str:
        if self.keepbits is None:
            return "lossless"
        return f"{self.keepbits} mantissa bits kept, relative error <= 2^-{self.keepbits + 1}"

    def __str__(self) -> str:
        lines = [
            f"maps: {self.layers} layers × {self.heads} heads × {self.rows} token rows × "
            f"{'×'.join(map(str, self.grid))}, {' + '.join(self.directions)}, {self.steps} "
            f"steps",
            f"per step: {_size(self.step_bytes)} decoded",
            f"per generation: {_size(self.generation_bytes)} decoded, about "
            f"{_size(self.stored_bytes)} on disk ({self._kept})",
            f"needs {_size(self.rate_needed)}/s decoded, about "
            f"{_size(self.disk_rate_needed)}/s to disk, at {self.step_seconds} s a step",
        ]
        if not self.fsync:
            crash = "a listed step survives a crash of the process, not of the machine"
            if self.unwritten_allowed is None:
                lines.append(
                    "fsync off: steps are left in the page cache unsynced, so the generation "
                    "does not wait for the disk to sync them, only, past the kernel's limit on "
                    f"unwritten pages, for it to write them ({crash})"
                )
            else:
                fits = self.stored_bytes <= self.unwritten_allowed
                lines.append(
                    f"fsync off: steps are left in the page cache unsynced ({crash}); the kernel "
                    f"lets {_size(self.unwritten_allowed)} wait unwritten here before a writer "
                    f"waits for the disk (vm.dirty_*), "
                    + (
                        "so the generation does not wait for the disk"
                        if fits
                        else "so past that the generation waits for the disk to write them"
                    )
                )
        if self.disk_error is not None:
            lines.append(f"the disk it goes to could not be probed: {self.disk_error}")
        if self.disk_rate is not None:
            synced = f"the disk it goes to synced {_size(self.disk_rate)}/s in a probe"
            if self.disk_ratio > 1.0:
                lines.append(
                    f"{synced}: the generation would wait for it and take about "
                    f"{self.disk_ratio:.2f}× as long as untraced, or longer (a faster disk; "
                    f"fewer bytes: keepbits, layers, heads, steps, directions; or fsync off, "
                    f"whose listed steps survive a crash of the process, not of the machine)"
                )
            else:
                lines.append(f"{synced}: it keeps up")
        if self.write_error is not None:
            lines.append(f"the writer could not be probed here: {self.write_error}")
        if self.write_rate is not None:
            wrote = (
                f"the writer, on this host's cores and disk alone, sustained "
                f"{_size(self.write_rate)}/s decoded in a probe"
            )
            if self.write_ratio > 1.0:
                lines.append(
                    f"{wrote}: the generation would wait for it and take about "
                    f"{self.write_ratio:.2f}× as long as untraced, or longer (fewer bytes: "
                    f"keepbits, layers, heads, steps, directions; more cores; or more steps in "
                    f"flight, max pending steps, each holding a step of maps in host memory)"
                )
            else:
                lines.append(f"{wrote}: it keeps up")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _weights_device(attention: Any) -> Any:
    """Where an attention's weights are: where the model computes, and the maps are made."""
    return next((p.device for p in attention.parameters()), "cpu")


def _weights_dtype(attention: Any) -> Any:
    """The dtype of an attention's weights: before any call, the closest to the dtype it computes
    in that there is (a recording reads its latents')."""
    return next((p.dtype for p in attention.parameters()), None)


def estimate(
    pipe: Any,
    call: Mapping[str, Any],
    *,
    layers: Selector | None = None,
    heads: Selector | None = None,
    steps: Selector | None = None,
    directions: Sequence[str] = fmt.DIRECTIONS,
    keep_tokens: tuple[int, int] | None = None,
    keepbits: int | str | None = MODEL_PRECISION,
    step_seconds: float = H100_STEP_SECONDS,
    entity_names: Sequence[str] | None = None,
    fsync: bool = True,
    max_pending_steps: int = 2,
    out: str | os.PathLike[str] | None = None,
) -> Estimate:
    """What `tracer.trace(pipe, out, same options)` would record for `pipe(**call)`: nothing is
    generated. `step_seconds` is the step time the recording must keep up with. With a local
    `out`, the host is probed beside the store, and what was written there removed
    (`host_facts`)."""
    adapter = adapter_for(pipe, entity_names)
    absent = adapter.absent_directions  # none recorded (Sana's, Wan's txt2img)
    chosen = select_layers(adapter.layers(), layers)
    n_heads = len(select_indices("head", heads, chosen[0].heads))
    generation = adapter.generation(call)
    text = generation.text
    keep = range(*keep_tokens) if keep_tokens is not None else ()
    rows = token_rows(text, text.length, sorted(keep))
    sizes = {key: call.get(key) for key in ("height", "width")} | generation.attrs
    n_steps = int(call.get("num_inference_steps") or 28)
    cost = Estimate(
        layers=len(chosen),
        heads=n_heads,
        rows=len(rows),
        grid=adapter.latent_grid(sizes),
        steps=len(select_indices("step", steps, n_steps)),
        directions=tuple(d for d in fmt.check_directions(directions) if d not in absent),
        keepbits=keepbits_for(keepbits, _weights_dtype(chosen[0].attention)),
        step_seconds=step_seconds,
        fsync=fsync,
        device=str(_weights_device(chosen[0].attention)),
        max_pending_steps=check_max_pending_steps(max_pending_steps),
    )
    return cost if out is None else dataclasses.replace(cost, **host_facts(cost, out))


def host_facts(cost: Estimate, out: str | os.PathLike[str]) -> dict[str, Any]:
    """What probes beside local store path `out` say about recording `cost`, as Estimate's
    fields: the disk it goes to (`disk_facts`) and the writer itself (`writer_facts`)."""
    return disk_facts(cost, out) | writer_facts(cost, out)


def disk_facts(cost: Estimate, out: str | os.PathLike[str]) -> dict[str, Any]:
    """What the disk that local store path `out` goes to says about recording `cost`, as
    Estimate's fields: the rate it syncs at in a probe (`disk_rate`, or `disk_error`), up to
    DISK_PROBE_BYTES written beside the store as the writer writes, and removed; with fsync off,
    what the kernel lets a writer leave unwritten instead (`unwritten_allowed`): the synced rate
    is not what such a recording waits for. Nothing for a URL."""
    folder = folder_beside(out)
    if folder is None:
        return {}
    if not cost.fsync:
        return {"unwritten_allowed": unwritten_bytes_allowed()}
    # As many files side by side as the writer has shards in flight (its pending steps'), each
    # written in one piece as a shard is, in whole MiB (O_DIRECT writes whole pages).
    files = cost.max_pending_steps * len(cost.directions)
    probe = min(DISK_PROBE_BYTES, max(files * 2**20, math.ceil(cost.stored_bytes)))
    block = probe // files // 2**20 * 2**20
    try:
        return {"disk_rate": disk_sync_rate(folder, files * block, files=files, block_bytes=block)}
    except OSError as error:
        return {"disk_error": f"{type(error).__name__}: {error}"}


def writer_facts(cost: Estimate, out: str | os.PathLike[str]) -> dict[str, Any]:
    """What a probe of the writer says about recording `cost` to local store path `out`, as
    Estimate's fields: the decoded rate it sustained (`write_rate`, or `write_error`) on steps of
    the recording's shape, made on its device and written as it would write them (fsync, steps
    in flight) into stores beside it, which are removed (tracer.write_probe). Nothing for a URL."""
    folder = folder_beside(out)
    if folder is None:
        return {}
    try:
        rate = writer_rate(
            folder,
            layers=cost.layers,
            heads=cost.heads,
            rows=cost.rows,
            grid=cost.grid,
            directions=cost.directions,
            keepbits=cost.keepbits,
            device=cost.device,
            fsync=cost.fsync,
            max_pending_steps=cost.max_pending_steps,
        )
    except (OSError, WriterError) as error:
        return {"write_error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {"write_rate": rate}
