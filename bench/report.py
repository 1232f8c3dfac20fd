"""docs/benchmarks.md from the results of `python -m bench` (see bench/__main__.py)."""

from __future__ import annotations

from typing import Any

from bench.common import GEOMETRIES, Geometry
from bench.notes import limits, method
from bench.rate import BASELINE, BUFFERED, HOSTS, PACED_LATER, TOKEN_ROWS
from bench.summary import TARGETS, bytes_per_value, growth_summary, memory_summary
from bench.variants import LABELS, describe


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _ok(good: bool) -> str:
    return "met" if good else "**missed**"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _geo(result: dict[str, Any]) -> Geometry:
    return Geometry(**result["geometry"])


# ------------------------------------------------------------------------------- sections


def _header(r: dict[str, Any]) -> str:
    m = r["machine"]
    mode = " (quick subset)" if r["quick"] else ""
    rows = [
        ["CPU", f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"],
        ["memory", f"{m['memory_gib']} GiB"],
        ["GPU", m.get("gpu", "none")],
        ["OS, Python", f"{m['os']}, Python {m['python']}"],
        [
            "libraries",
            ", ".join(
                f"{name} {m[name]}"
                for name in ("torch", "diffusers", "transformers", "zarr", "numcodecs", "dask")
            )
            + f", attention-map-diffusers {m['attention-map-diffusers']}",
        ],
        ["load average at start", " / ".join(str(x) for x in m.get("load_average", []))],
    ]
    return "\n\n".join(
        [
            "# Benchmarks",
            f"Written by `{r['command']}` (`make bench`) on {r['date']}{mode}, in "
            f"{r['total_seconds'] / 60:.1f} min. Do not edit by hand: rerun the command. The "
            "cores are shared with other jobs, so every figure is a ratio or size measured in "
            "the same run as its baseline, and a median over several measurements (see *How it "
            "is measured* at the end)."
            + "".join(
                f" Rerun since by `{again['command']}` on {again['date']}: "
                f"{', '.join(again['sections'])}."
                for again in r.get("reruns", [])
            ),
            "## Machine",
            _table(["", ""], rows),
        ]
    )


def _summary(r: dict[str, Any]) -> str:
    main = "quick" if r["quick"] else "flux-cpu"
    rows = []
    over = r["overhead"][main]
    ratio = over["ratio"]["attnscope"]
    rows.append(
        [
            f"tracing overhead, traced / untraced wall time, CPU {main} geometry",
            f"≤ {TARGETS['overhead_cpu']:.2f}" + (" (for flux-cpu)" if r["quick"] else ""),
            f"{ratio:.3f}",
            "n/a in --quick" if r["quick"] else _ok(ratio <= TARGETS["overhead_cpu"]),
        ]
    )
    gpu = r["overhead"].get("flux-dev-gpu")
    if gpu:
        g = gpu["ratio"]["attnscope"]
        rows.append(
            [
                "tracing overhead, FLUX.1-dev shape on GPU",
                f"≤ {TARGETS['overhead_gpu']:.2f}",
                f"{g:.3f}",
                _ok(g <= TARGETS["overhead_gpu"]),
            ]
        )
        peaks = gpu.get("cuda_peak", {})
        if "untraced" in peaks and "attnscope" in peaks:
            extra = peaks["attnscope"] / peaks["untraced"] - 1
            rows.append(
                [
                    "extra peak GPU memory (max_memory_allocated), FLUX.1-dev shape",
                    f"≤ {TARGETS['extra_memory']:.0%}",
                    f"{extra:+.1%}",
                    _ok(extra <= TARGETS["extra_memory"]),
                ]
            )
    elif r.get("gpu_box"):
        g = r["gpu_box"]["traced_over_untraced"]
        rows.append(
            [
                f"tracing overhead, FLUX.1-dev shape on an {r['gpu_box']['device']} "
                "(`python -m bench.gpu`)",
                f"≤ {TARGETS['overhead_gpu']:.2f}",
                f"{g:.3f}",
                _ok(g <= TARGETS["overhead_gpu"]),
            ]
        )
    else:
        reason = r["skipped"].get("flux-dev-gpu", "not run")
        rows.append(
            [
                "tracing overhead, FLUX.1-dev shape on an H100",
                f"≤ {TARGETS['overhead_gpu']:.2f}",
                f"not measured: {reason}",
                "—",
            ]
        )
    mem = memory_summary(r)
    extra = mem["attnscope"]["extra_fraction"]
    rows.append(
        [
            f"extra peak host RSS over the untraced run, {main} geometry (mmap threshold fixed)",
            f"≤ {TARGETS['extra_memory']:.0%}",
            f"{extra:+.1%} ({_mib(mem['attnscope']['extra'])})",
            _ok(extra <= TARGETS["extra_memory"]),
        ]
    )
    growth = growth_summary(r)
    rows.append(
        [
            f"extra peak RSS at 2 → 8 steps ({r['growth']['geometry']['name']})",
            "does not grow",
            f"{_mib(growth[2])} → {_mib(growth[8])}",
            _ok(growth[8] - growth[2] <= max(0.02 * growth["peak"], 16 * 2**20)),
        ]
    )
    store = r["store"][main]
    for name, d in store["directions"].items():
        rows.append(
            [
                f"store, {name}: bytes per value (ratio vs float32), max relative error",
                f"error ≤ bound {store['error_bound']:.2e}",
                f"{d['bytes_per_value']:.2f} B ({d['ratio']:.2f}×), {d['max_relative_error']:.2e}",
                _ok(d["max_relative_error"] <= store["error_bound"]),
            ]
        )
    rows += _analysis_rows(r["analysis"])
    a = r["analysis"]
    first = a["cli"]["one_map_seconds"]
    rows.append(
        [
            "time to first heatmap, cold CLI start, one map",
            f"≤ {TARGETS['first_heatmap_s']:.0f} s",
            f"{first:.2f} s",
            _ok(first <= TARGETS["first_heatmap_s"]),
        ]
    )
    rows += _writer_rows(r)
    return "## Summary against the targets\n\n" + _table(["figure", "target", "measured", ""], rows)


def _analysis_rows(a: dict[str, Any]) -> list[list[str]]:
    """The mean's targets, in a process as the library leaves its allocator and, where measured,
    in one as the `attnscope` command sets it."""
    means = {"as the library leaves the allocator": a["mean"]}
    if "mean_tuned" in a:
        means["allocator as the `attnscope` command sets it"] = a["mean_tuned"]
    rates = {
        name: a["mean"]["decoded_bytes"] / m["compute_seconds"] / 1e6 for name, m in means.items()
    }
    peaks = {name: m["peak_rss"] for name, m in means.items()}
    which = " (" + " / ".join(means) + ")" if len(means) > 1 else ""
    return [
        [
            f"analysis: mean heatmap of a {_size(a['mean']['decoded_bytes'])} store, decoded "
            f"MB/s{which}",
            f"≥ {TARGETS['analysis_mb_s']:,.0f} MB/s",
            " / ".join(f"{rate:,.0f} MB/s" for rate in rates.values()),
            _each_ok({name: rate >= TARGETS["analysis_mb_s"] for name, rate in rates.items()}),
        ],
        [
            f"analysis: its peak RSS{which}",
            "≤ 1 GB",
            " / ".join(_size(peak) for peak in peaks.values()),
            _each_ok({name: peak <= TARGETS["analysis_rss"] for name, peak in peaks.items()}),
        ],
    ]


def _each_ok(good: dict[str, bool]) -> str:
    """`_ok` of one figure, or of each named one."""
    if len(good) == 1:
        return _ok(*good.values())
    return ", ".join(f"{name} {_ok(ok)}" for name, ok in good.items())


def _writer_rows(r: dict[str, Any]) -> list[list[str]]:
    """The writer's targets, as `attnscope record` runs it (allocator tuned)."""
    rate = r.get("rate") or {}
    tuned = rate.get("tuned")
    # Figures of a run from before the sustained rate was measured are left out, not misread.
    if not tuned or "warm_up_seconds_first_run" not in tuned:
        return []
    where = "writer, allocator as `attnscope record` sets it"
    per_core, scaling = tuned["decoded_mb_s_per_core"], tuned["scaling_1_to_2_cores"]
    limit = TARGETS["writer_projected_ratio"]
    projected = {
        "first run in a process": tuned["projected_ratio_h100_16_cores"],
        "later runs": tuned["projected_ratio_h100_16_cores_later_run"],
        "by CPU time": tuned["projected_ratio_h100_16_cores_by_cpu_time"],
    }
    emulated = tuned.get("projected_ratio_h100_16_cores_later_run_emulated")
    if emulated is not None:
        projected["later runs, emulated on 2 cores"] = emulated
    starting = rate["start_run_ms"]
    return [
        [
            f"{where}: sustained decoded MB/s on one core",
            f"≥ {TARGETS['writer_mb_s_per_core']:,.0f} MB/s",
            f"{per_core:,.0f} MB/s",
            _ok(per_core >= TARGETS["writer_mb_s_per_core"]),
        ],
        [
            f"{where}: sustained, 1 → 2 cores",
            f"≥ {TARGETS['writer_scaling']:.1f}×",
            f"{scaling:.2f}×",
            _ok(scaling >= TARGETS["writer_scaling"]),
        ],
        [
            f"{where}: projected traced/untraced, 28 H100 steps, 16 cores ("
            + " / ".join(projected)
            + ")",
            f"≤ {limit:.2f}",
            " / ".join(f"{ratio:.2f}" for ratio in projected.values()),
            _each_ok({name: ratio <= limit for name, ratio in projected.items()}),
        ],
        [
            "starting a run on the generation's thread (claim, writer; the run laid down during "
            "its first step)",
            f"≤ {TARGETS['run_fixed_ms']:.0f} ms",
            f"{starting:.0f} ms",
            _ok(starting <= TARGETS["run_fixed_ms"]),
        ],
    ]


def _overhead(r: dict[str, Any]) -> str:
    parts = ["## Tracing overhead"]
    for name, res in r["overhead"].items():
        geo = _geo(res)
        rows = []
        for variant in res["median_wall"]:
            out = res["outputs"].get(variant, {})
            ratio = res["ratio"].get(variant)
            walls = res["ratios"].get(variant, {}).get("wall", [])
            rows.append(
                [
                    LABELS[variant],
                    f"{res['median_wall'][variant]:.2f} s",
                    "1" if ratio is None else f"**{ratio:.3f}**",
                    "" if not walls else ", ".join(f"{x:.2f}" for x in walls),
                    "" if ratio is None else f"{res['cpu_ratio'][variant]:.3f}",
                    _size(out["bytes"]) if out.get("bytes") else "—",
                    (
                        _mib(res["cuda_peak"][variant])
                        if variant in res.get("cuda_peak", {})
                        else describe(variant, geo)
                    ),
                ]
            )
        last = "peak GPU memory" if res.get("cuda_peak") else "what it records"
        parts += [
            f"### {name}: {geo.describe()}",
            _table(
                [
                    "variant",
                    "median wall time",
                    "ratio (median)",
                    "ratio per pair",
                    "CPU-time ratio",
                    "written per generation",
                    last,
                ],
                rows,
            ),
        ]
        amd = res["outputs"].get("amd")
        if amd:
            parts.append(
                f"attention-map-diffusers installed its processor on {amd['processors_installed']}"
                f" attention modules and returned maps for {len(amd['layers_with_maps'])} of "
                f"them ({amd['records']} records): "
                + ", ".join(f"`{x}`" for x in amd["layers_with_maps"])
                + "."
            )
    return "\n\n".join(parts)


def _memory(r: dict[str, Any]) -> str:
    main = "quick" if r["quick"] else "flux-cpu"
    geo = GEOMETRIES[main]

    def rows(allocator: str) -> list[list[str]]:
        return [
            [
                LABELS[v],
                _mib(m["peak"]),
                "—" if v == "untraced" else f"{_mib(m['extra'])} ({m['extra_fraction']:+.1%})",
                ", ".join(_mib(p) for p in m["peaks"]),
            ]
            for v, m in memory_summary(r, allocator).items()
        ]

    growth = growth_summary(r)
    growth_geo = Geometry(**r["growth"]["geometry"])
    growth_rows = [
        [
            f"{steps} steps",
            _mib(growth["medians"][("untraced", steps)]),
            _mib(growth["medians"][("attnscope", steps)]),
            _mib(growth[steps]),
        ]
        for steps in (2, 8)
    ]
    header = ["variant", "peak RSS", "extra over untraced", "each process"]
    parts = [
        "## Peak memory",
        f"Peak host RSS of one generation, one fresh process per run, {main} geometry "
        f"({geo.describe()}), glibc's mmap threshold fixed at 1 MiB (why: *How it is "
        "measured*):",
        _table(header, rows("fixed")),
    ]
    default = rows("default")
    if default:
        parts += [
            "The same with glibc's default (sliding) mmap threshold, two processes each, "
            "medians; each process's peak shows how far apart identical runs land:",
            _table(header, default),
        ]
    parts += [
        f"Growth with the number of steps on {growth_geo.name} ({growth_geo.describe()}: "
        "the same token layout, maps and tracer buffers as the FLUX geometry, on narrower "
        "heads), mmap threshold fixed:",
        _table(["", "untraced", "attnscope", "extra"], growth_rows),
    ]
    return "\n\n".join(parts)


def _store(r: dict[str, Any]) -> str:
    parts = ["## Store size and error"]
    for name, s in r["store"].items():
        geo = _geo(s)
        rows = [
            [
                f"`{d}`",
                "×".join(str(x) for x in v["shape"]),
                _size(v["bytes"]),
                f"{v['bytes_per_value']:.3f} B",
                f"{v['ratio']:.2f}×",
                f"{v['lossless_bytes_per_value']:.3f} B ({v['lossless_ratio']:.2f}×)",
                f"{v['max_relative_error']:.3e}",
            ]
            for d, v in s["directions"].items()
        ]
        parts += [
            f"{name} geometry ({geo.describe()}), default token rows; keepbits {s['keepbits']}, "
            f"stated bound {s['error_bound']:.3e}:",
            _table(
                [
                    "variable",
                    "shape (step, layer, head, token, y, x)",
                    "on disk",
                    "per value",
                    "ratio vs float32",
                    "lossless: per value (ratio)",
                    "max relative error",
                ],
                rows,
            ),
        ]
    return "\n\n".join(parts)


def _rows(r: dict[str, Any]) -> str:
    """Format 2's token rows against format 1's span rows (bench/rows.py)."""
    if "rows" not in r:
        return ""
    rows = []
    for entry in (v for k, v in r["rows"].items() if k != "geometry"):
        v1, v2 = entry["v1"], entry["v2"]
        rows.append(
            [
                f"{entry['words']} words, {entry['tokens']} tokens",
                f"{v1['rows']} → {v2['rows']}",
                f"{_size(v1['decoded_bytes'])} → {_size(v2['decoded_bytes'])}",
                f"{_size(v1['stored_bytes'])} → {_size(v2['stored_bytes'])}",
                f"{v1['capture_seconds'] * 1e3:.0f} → {v2['capture_seconds'] * 1e3:.0f} ms "
                f"({v2['capture_seconds'] / v1['capture_seconds']:.1f}×)",
            ]
        )
    layers, heads, text, image, steps = r["rows"]["geometry"]
    return "\n\n".join(
        [
            "## Token rows (format 2) against span rows (format 1)",
            f"FLUX.1-dev's shape: {layers} layers × {heads} heads, {text} text + {image} image "
            f"tokens, {steps} steps, both directions; prompts tokenized by the demo's T5 "
            "tokenizer (trained on image-prompt English, so it splits more than T5's own). "
            "Format 1 stored `prompt` and one span per distinct word; format 2 one row per token "
            "and `</s>`, and one summed row for the padding.",
            _table(
                [
                    "prompt",
                    "rows per step",
                    "decoded per generation",
                    "stored per generation",
                    "capture, one layer (CPU)",
                ],
                rows,
            ),
            "Format 2 costs more in two places, both by design. Bytes grow with the rows: one per "
            "token instead of one per distinct word (the price of asking about any span later). "
            "Capture time grows more: `txt2img` of the padding "
            "row averages the softmax rows of every padding query, so each traced attention "
            "now computes all 512 text queries against the image keys instead of the prompt's "
            "few. That is 512/4608 of the model's own QKᵀ for the layer (about 6% of its "
            "attention FLOPs); on the CPU, where the model's attention is the same order of "
            "work, it shows as the ratio above. `keep_tokens` adds a row per kept position and "
            "nothing to the capture.",
            "Command: `python -m bench` (section `rows`, `bench/rows.py`).",
        ]
    )


def _rate_tuned(rate: dict[str, Any]) -> str:
    """What the allocator setting of `attnscope record` (analysis.allocator) changes."""
    tuned = rate.get("tuned")
    if not tuned:
        return ""
    return (
        "With the allocator set as `attnscope record` sets it (analysis.allocator: one arena, no "
        "mmap'd blocks, no trimming, so the next step reuses the buffers zarrs frees instead of "
        "faulting fresh pages in; about 45% of the encoder's CPU time in a perf profile): "
        + _rate_figures(tuned)
        + f" By CPU time {tuned['cpu_seconds_per_decoded_gb']:.2f} CPU seconds per decoded GB, "
        f"{tuned['cores_needed_at_h100']:.1f} cores at an H100's rate, projected "
        f"{tuned['projected_ratio_h100_8_cores_by_cpu_time']:.2f}× on 8 cores and "
        f"{tuned['projected_ratio_h100_16_cores_by_cpu_time']:.2f}× on 16. One arena serves every "
        "thread: whether that holds its scaling up to 16 cores is not measurable on this machine."
        + _rate_emulated(rate)
    )


def _rate_emulated(rate: dict[str, Any]) -> str:
    """Later runs played at a host's load on this machine's two cores (bench.rate.emulate)."""
    emulated = rate.get("emulated")
    if not emulated:
        return ""
    runs = [(str(host), emulated[str(host)]) for host in HOSTS]
    return (
        " Emulated: later runs of a 28-step generation fed to the writer on 2 cores (allocator "
        "tuned), each step's period stretched by how much longer 2 cores here take to write a "
        "step than the host is projected to, so the writer faces the host's load; traced / "
        "untraced is then measured (warm-up, backpressure and the flush after the last step "
        "as they happen), not played by the model above. "
        + "; ".join(
            f"{host} cores: a step every {run['period']:.2f} s, "
            f"{run['traced_over_untraced']:.2f}× (the generation waited "
            f"{run['put_wait_seconds']:.2f} s in put(), the flush after the last step took "
            f"{run['close_seconds']:.2f} s)"
            for host, run in runs
        )
        + ". The model above reads "
        + " and ".join(
            f"{rate['tuned'][f'projected_ratio_h100_{host}_cores_later_run']:.2f}× on {host}"
            for host, _ in runs
        )
        + ": where the writer keeps up the two agree; where it does not, the generation fills "
        "one of the two step buffers while the writer has only the other step to write, which "
        "the model does not play. The emulation assumes, as the projection does, that all of a "
        "step's writing scales with the cores: copying a shard into zarrs and writing it out "
        "are serial per shard (four in flight), so a 16-core host may scale less."
    )


def _rate_figures(rate: dict[str, Any]) -> str:
    """Sustained and whole-run rates, the warm-up, and the projection, in a few sentences."""
    return (
        f"per core {rate['decoded_mb_s_per_core']:,.0f} MB/s decoded sustained "
        f"({rate['whole_run_mb_s_per_core']:,.0f} MB/s over the whole run), "
        f"{rate['scaling_1_to_2_cores']:.2f}× from 1 to 2 cores "
        f"({rate['whole_run_scaling_1_to_2_cores']:.2f}× over whole runs). The warm-up on 2 "
        f"cores: {rate['warm_up_seconds_first_run']:.2f} s in a process's first run, "
        f"{rate['warm_up_seconds_later_run']:.2f} s in a later one. Projected traced/untraced "
        f"for 28 steps: {rate['projected_ratio_h100_8_cores']:.2f}× on 8 cores and "
        f"{rate['projected_ratio_h100_16_cores']:.2f}× on 16 for a process's first run, "
        f"{rate['projected_ratio_h100_8_cores_later_run']:.2f}× and "
        f"{rate['projected_ratio_h100_16_cores_later_run']:.2f}× for later ones."
    )


def _rate_by_cpu_time(rate: dict[str, Any]) -> str:
    """The projection from the host CPU time a decoded byte costs, which no disk caps."""
    if "cpu_seconds_per_decoded_gb" not in rate:
        return ""
    return (
        f"Without the disk: one core's unthrottled run spent "
        f"{rate['cpu_seconds_per_decoded_gb']:.2f} CPU seconds per decoded GB (every thread: "
        f"the puts' copies, encoding, writing, syncing), so an H100's step rate needs "
        f"{rate['cores_needed_at_h100']:.1f} such cores scaling perfectly, and a disk that "
        f"syncs {rate['disk_mb_s_needed_at_h100']:,.0f} MB/s. Projected "
        f"traced/untraced on that basis: "
        f"{rate['projected_ratio_h100_8_cores_by_cpu_time']:.2f}× on 8 cores, "
        f"{rate['projected_ratio_h100_16_cores_by_cpu_time']:.2f}× on 16."
    )


def _rate(r: dict[str, Any]) -> str:
    """The writer against a GPU's step rate (bench/rate.py)."""
    rate = r.get("rate")
    if not rate or "faulted_gb_first_run" not in rate.get("tuned", {}):
        return ""
    tuned, memory = rate["tuned"], rate["memory"]
    rows = []
    for cores, run in sorted(rate["runs"].items()):
        for label, measured in (("", run), (", allocator tuned", run.get("tuned"))):
            if measured is None:
                continue
            paced, later, fast = measured["paced"], measured[PACED_LATER], measured["unthrottled"]
            others = [measured.get(name) for name in (BUFFERED, "unthrottled, no fsync", BASELINE)]
            rows.append(
                [
                    f"{cores}{label}",
                    f"{fast['decoded_mb_s']:,.0f} / {fast['sustained_mb_s']:,.0f} MB/s",
                    f"{paced['warm_up_seconds']:.2f} s / {later['warm_up_seconds']:.2f} s",
                    *(f"{o['decoded_mb_s']:,.0f} MB/s" if o else "—" for o in others),
                    f"{paced['decoded_mb_s']:,.0f} MB/s",
                    f"{paced['put_wait_seconds']:.1f} s of {paced['seconds']:.1f} s",
                    f"{paced['start_seconds'] * 1e3:,.0f} ms / "
                    f"{paced['laid_down_seconds'] * 1e3:,.0f} ms / {paced['close_seconds']:.1f} s",
                ]
            )
    step = next(iter(rate["runs"].values()))
    fastest = max(
        measured["unthrottled"]["decoded_mb_s"]
        for run in rate["runs"].values()
        for measured in (run, run.get("tuned"))
        if measured
    )
    return "\n\n".join(
        [
            "## Writer rate against a GPU",
            f"The real writer fed FLUX.1-dev-shaped steps ({_size(step['step_bytes'])} decoded "
            f"a step: 57 layers × 24 heads × 26 token rows × 64×64, both directions) made of a "
            f"real demo recording's maps, {step['steps']} steps, one every {step['period']} s "
            "(paced) and as fast as it takes them (unthrottled), on 1 and 2 cores. The maps "
            f"arrive rounded{_rounded_as(step)}, as from a GPU; each step's shards are encoded "
            "by zarrs, written past the page cache (O_DIRECT), synced and renamed into place "
            "before the step is listed, every pending step's shards in flight at once. Beside "
            "it: the same through the page cache, without fsync (through the page cache, "
            "unsynced), and on zarr-python's own codec pipeline (the baseline, through the page "
            "cache).",
            _table(
                [
                    "cores",
                    "unthrottled, decoded: whole run / sustained",
                    "warm-up: first run / later run",
                    "through the page cache",
                    "no fsync",
                    "zarr-python's pipeline",
                    "paced, decoded",
                    "generation waited in put()",
                    "starting the run / laying it down, meanwhile / flush after the last step",
                ],
                rows,
            ),
            f"An H100 needs {rate['needed_mb_s_at_h100']:,.0f} MB/s (one step every 0.15 s). "
            "Sustained: the steps after the first two, from when each was listed durable. "
            "Warm-up: how much later than their feeding plus two sustained steps the first two "
            "were durable (the step buffers and zarrs' working memory faulted in), in a paced "
            "run that is a process's first and in one after it. Paced runs get each layer's maps "
            "as a GPU makes them, spread over the step's 0.15 s. On 2 cores (allocator tuned) "
            f"the first paced run faulted {tuned['faulted_gb_first_run']:.1f} GB of memory in, "
            f"the later one {tuned['faulted_gb_later_run']:.1f} GB. This machine is a virtual "
            "machine whose balloon hands the memory its guest frees back to the host. Touching "
            "memory (a fresh process touching 2 GB, 5 s after the last measurement, then at once "
            "again) cost "
            f"{memory['touch_seconds_per_gb_4k_pages_after_a_pause']:.2f} s per GB after a pause "
            f"and {memory['touch_seconds_per_gb_4k_pages_just_freed']:.2f} s just after it was "
            "freed in 4 KiB pages, as the writer's buffers are faulted in (neither glibc nor "
            "torch asks for more); in transparent huge pages, as NumPy asks for its large arrays, "
            f"{memory['touch_seconds_per_gb_huge_pages_after_a_pause']:.2f} s and "
            f"{memory['touch_seconds_per_gb_huge_pages_just_freed']:.2f} s. A first run's "
            "warm-up here pays the 4 KiB pages' cost; a later run reuses its memory. "
            "The projection takes the sustained per-core rate sped up by Amdahl's law, with the "
            "serial fraction its 1 → 2 scaling gives (the scaling at most 2: more is the shared "
            "cores' noise), never faster "
            "than this machine's disk syncs a step's stored bytes (below), keeps the "
            "warm-up measured on 2 cores, and plays a 28-step generation at 0.15 s a step through "
            "the writer's backpressure (a step starts only while fewer than two are not "
            "durable): traced / untraced is when the last step is durable over 28 × 0.15 s. "
            "As the library leaves the allocator: " + _rate_figures(rate),
            "zarrs against zarr-python's pipeline: "
            + ", ".join(
                f"{ratio:.2f}× on {cores} core{'s' if int(cores) > 1 else ''}"
                for cores, ratio in sorted(rate["zarrs_over_zarr_python"].items())
            )
            + "; written past the page cache against through it: "
            + ", ".join(
                f"{ratio:.2f}× on {cores} core{'s' if int(cores) > 1 else ''}"
                for cores, ratio in sorted(rate.get("direct_io_over_page_cache", {}).items())
            )
            + f"; fsync costs {rate['fsync_cost']:.2f}× on 2 cores. This machine's disk synced "
            # The figure the ceiling and the projection take: the 2-core process's.
            f"{_on_cores(rate, 2)['disk_sync_mb_s']:,.0f} MB/s written sequentially (beside the "
            "2-core runs), so at this compression "
            f"no writer makes steps durable here faster than "
            f"{rate['disk_ceiling_decoded_mb_s']:,.0f} MB/s decoded"
            + (
                ", and the fastest figures here are capped by it."
                if fastest >= 0.8 * rate["disk_ceiling_decoded_mb_s"]
                else "."
            ),
            _rate_by_cpu_time(rate),
            _rate_tuned(rate),
            _rate_against_the_gpu_box(r),
            "Command: `python -m bench rate --json rate.json`.",
            *_slow_disk(r),
        ]
    )


def _on_cores(rate: dict[str, Any], cores: int) -> dict[str, Any]:
    """The rate benchmark's runs on `cores` cores, keyed by int as measured or by str as read
    back from JSON."""
    return next(run for key, run in rate["runs"].items() if int(key) == cores)


def _slow_disk(r: dict[str, Any]) -> list[str]:
    """Paced runs on a disk slower than the steps, fsync on and off (bench/slow_disk.py)."""
    slow = r.get("slow_disk")
    if not slow:
        return []
    disks = [disk for disk in slow if isinstance(slow[disk], dict)]
    rows = [
        [disk, "skipped: " + slow[disk]["skipped"], ""]
        if "skipped" in slow[disk]
        else [disk] + [_with_estimate(slow[disk][name]) for name in FSYNC]
        for disk in disks
    ]
    return [
        f"**A disk slower than the steps** (`attnscope record --no-fsync`): the writer fed "
        f"{slow['steps']} paced steps of {slow['layers']} of those layers (what 2 cores encode at "
        f"{slow['period']} s a step), each run's time over the steps' own (traced / untraced), "
        "the faster of two; on the disk as it is, and with this process's writes to it "
        "throttled by the kernel's block I/O controller, as a slow disk would take them. "
        "Unsynced, the steps wait in the page cache (the kernel's threads write them back, "
        "outside the throttle): what the generation waits for is the cores, not the disk."
        + (
            " On the disk as it is, which keeps up, fsync off is the slower: its copies into the "
            "page cache cost the cores more than syncing past it does."
            if "skipped" not in slow[disks[0]]
            and slow[disks[0]]["fsync off"]["traced_over_untraced"]
            > slow[disks[0]]["fsync on"]["traced_over_untraced"]
            else ""
        )
        + (
            " In brackets, what `record --estimate` predicts for those steps there from its probe "
            "of the writer (short recordings of synthetic maps of their shape, written as these "
            "are, its maps rounded on the host as a CPU recording's are, where these arrive "
            "rounded as from a GPU): a lower bound, as the estimate says, for it times the steps "
            "sustained, without what a run pays once (laying it down, the flush after its last "
            "step)."
            if any(
                isinstance(run, dict) and "estimate" in run
                for disk in disks
                for run in slow[disk].values()
            )
            else ""
        ),
        _table(["disk", *FSYNC], rows),
        "Command: `python -m bench` (section `slow disk`, `bench/slow_disk.py`).",
    ]


def _with_estimate(run: dict[str, Any]) -> str:
    """A slow-disk run's ratio, and the estimate's prediction for it where measured."""
    ratio = f"{run['traced_over_untraced']:.2f}"
    return ratio + (f" (estimate {run['estimate']:.2f})" if "estimate" in run else "")


FSYNC = ("fsync on", "fsync off")


def _rate_against_the_gpu_box(r: dict[str, Any]) -> str:
    """The projection beside what a GPU box measured, where one did (`python -m bench gpu`)."""
    box = r.get("gpu_box")
    if not box:
        return ""
    rows = box["token_rows"]
    return (
        f"**Measured on a GPU box instead** (*GPU at FLUX.1-dev's shape*): "
        f"{box['traced_over_untraced']:.2f} on an {box['device']}, its traced generation writing "
        f"{box['decoded_gb_s']:.2f} GB/s decoded. The projection did not hold there. Its steps "
        f"have {TOKEN_ROWS} token rows of a real recording's maps; the box's had {rows} "
        f"({rows / TOKEN_ROWS:.2f}× the bytes decoded), from random weights, at "
        f"{bytes_per_value(box):.2f} bytes per value on disk. And it "
        "scales the per-core rate measured on 1 and 2 cores to 16, where the writer keeps only "
        "its pending steps' shards in flight (two steps, four shards, by default)."
    )


def _s3(r: dict[str, Any]) -> str:
    """Through a bucket against local disk (bench/s3.py)."""
    s3 = r.get("s3")
    if not s3:
        return ""
    store = s3["analysis_store"]
    rows = [
        [
            where,
            f"{s3['overhead'][where]['ratio']:.3f} "
            f"({', '.join(f'{x:.2f}' for x in s3['overhead'][where]['runs'])})",
            f"{s3['analysis_mb_s'][where]:,.0f} MB/s",
        ]
        for where in ("local disk", "bucket")
    ]
    return "\n\n".join(
        [
            "## Through an S3 bucket",
            f"moto's S3 server on 127.0.0.1 against this machine's disk. Recording: the "
            f"{s3['geometry']} geometry's generation traced into each, traced/untraced in "
            "alternating pairs (median, then each pair). Reading: the mean over step, layer and "
            f"head of every span of a synthetic store of shape {store['shape']} "
            f"({_size(store['decoded_bytes'])} decoded, {_size(store['stored_bytes'])} stored), "
            "copied into the bucket, read through each. moto's server is one Python process "
            "answering one request at a time: the bucket column measures it, not S3; against "
            "a real bucket the figures are its network's latency and bandwidth.",
            _table(["store", "tracing overhead", "analysis, decoded"], rows),
            "Command: `python -m bench` (section `s3`).",
        ]
    )


def _families(r: dict[str, Any]) -> str:
    """Tracing overhead per model family at each geometry (bench/families.py)."""
    found = r.get("families")
    if not found:
        return ""
    from bench.families import GEOMETRIES

    parts = [
        "## Model families",
        "Each family's demo pipeline with four traced attentions, at two geometries (each "
        "family's text as its pipeline lays it out: padded or not, in its template; see "
        "bench/families.py), each pipeline's own guidance. Every head, step, layer and direction "
        "the model has (Sana: img2txt only). Ratios are medians of traced/untraced pairs in "
        "alternating order; target for attnscope: ≤ 1.10 and below the peer.",
    ]
    for name, families in found.items():
        shape = GEOMETRIES[name]
        first = next(iter(families.values()))
        parts.append(
            f"### {name}: {shape.heads} heads × {shape.head_dim}, a {shape.grid}×{shape.grid} "
            f"token grid, `max_sequence_length={shape.text_len}`, {shape.steps} steps, "
            f"{first['pairs']} pairs per recorder"
        )
        if shape.peers:
            parts.append(
                "attention-map-diffusers (its `AttentionCapture`, saved raw) runs beside attnscope "
                "where it supports the family (it refuses Qwen-Image's, Lumina2's, CogView4's and "
                "HiDream-I1's processors; its FLUX processor records the double-stream blocks "
                "only, see *Tracing overhead*). These generations last about a second, so a "
                "run's fixed cost (laying the run down, syncing its last step) and the writer's "
                "compression, which shares the two cores with the model, weigh far more than at "
                "the FLUX CPU geometry."
            )
        else:
            parts.append(
                "FLUX's CPU geometry of *Tracing overhead*. attnscope only: "
                "attention-map-diffusers would save gigabytes of raw maps per generation here."
            )
        headers = ["pipeline", "untraced", "attnscope", "attnscope store"]
        if shape.peers:
            headers += ["attention-map-diffusers", "its files"]
        rows = []
        for f in families.values():
            row = [
                f["pipeline"],
                f"{f['untraced_s']:.2f} s",
                f"{f['ratio']['attnscope']:.3f} {_ok(f['ratio']['attnscope'] <= 1.10)}",
                _size(f["bytes"]["attnscope"]),
            ]
            if shape.peers:
                row += [
                    f"{f['ratio']['amd']:.2f}" if "amd" in f["ratio"] else "not supported",
                    _size(f["bytes"]["amd"]) if "amd" in f["bytes"] else "—",
                ]
            rows.append(row)
        parts.append(_table(headers, rows))
    parts.append("Command: `python -m bench` (section `families`).")
    return "\n\n".join(parts)


def _video(r: dict[str, Any]) -> str:
    """Video models: overhead beside attention-map-diffusers, capture memory (bench/video.py)."""
    found = r.get("video")
    if not found:
        return ""
    from bench.video import CALL, STEPS, TEXT_LEN, WAN_480P, WIDTH

    rows = [
        [
            f["pipeline"],
            f"{f['untraced_s']:.2f} s",
            f"{f['ratio']['attnscope']:.3f}",
            _size(f["bytes"]["attnscope"]),
            f"{f['ratio']['amd']:.2f}",
            _size(f["bytes"]["amd"]),
        ]
        for f in found["overhead"].values()
    ]
    memory = found["memory"]
    memory_rows = [
        [chunk, f"{c['largest_block'] / 2**20:.1f} MiB", f"{c['seconds']:.2f} s"]
        for chunk, c in memory["chunks"].items()
    ]
    first = next(iter(found["overhead"].values()))
    return "\n\n".join(
        [
            "## Video models",
            f"Each demo video pipeline (Wan: cross-attention, img2txt only; CogVideoX: joint, "
            f"both directions) with {WIDTH['num_attention_heads']} heads × "
            f"{WIDTH['attention_head_dim']}, {WIDTH['num_layers']} traced attentions, "
            f"{CALL['num_frames']} frames of {CALL['height']}×{CALL['width']} pixels (3 latent "
            f"frames of 16×28 tokens), `max_sequence_length={TEXT_LEN}`, {STEPS} steps, guided "
            "(a second call per step). Both recorders keep every step, layer and head, per "
            "token (attention-map-diffusers: its video relations, saved raw). Ratios are "
            f"medians of {first['pairs']} traced/untraced pairs in alternating order.",
            _table(
                [
                    "pipeline",
                    "untraced",
                    "attnscope",
                    "attnscope store",
                    "attention-map-diffusers",
                    "its files",
                ],
                rows,
            ),
            f"The capture's memory on one cross-attention call of Wan 2.1 at 480p, 81 frames "
            f"({WAN_480P['heads']} heads × {WAN_480P['head_dim']}, {WAN_480P['video_tokens']:,} "
            f"video queries, {WAN_480P['text_len']} text keys, bfloat16, 27 token rows): the "
            "largest block it allocates besides the maps it returns "
            f"({_size(memory['maps_bytes'])}), from torch's profiler. Taking every query to "
            f"float32 at once, as the capture did before, took "
            f"{_size(memory['queries_in_float32'])}.",
            _table(["chunk_size", "largest block", "time (CPU)"], memory_rows),
            "Command: `python -m bench` (section `video`).",
        ]
    )


def _view(r: dict[str, Any]) -> str:
    """`attnscope view` on a full-FLUX-shaped store (bench/view.py)."""
    found = r.get("view")
    if not found:
        return ""
    shape = " × ".join(str(n) for n in found["store"]["shape"])
    rows = [
        [
            "first map after the page load",
            f"{found['first_map_s']:.2f} s",
            "≤ 1.5 s",
            _ok(found["first_map_s"] <= 1.5),
        ],
        [
            "repaint per slider move, median",
            f"{1000 * found['repaint_median_s']:.0f} ms",
            "≤ 150 ms",
            _ok(found["repaint_median_s"] <= 0.150),
        ],
        [
            "repaint per slider move, 95th percentile",
            f"{1000 * found['repaint_p95_s']:.0f} ms",
            "≤ 400 ms",
            _ok(found["repaint_p95_s"] <= 0.400),
        ],
        [
            "server peak memory (RSS)",
            _size(found["server_peak_rss"]),
            "< 500 MB",
            _ok(found["server_peak_rss"] < 500e6),
        ],
    ]
    return "\n\n".join(
        [
            "## Viewer",
            f"`attnscope view` on a synthetic store of FLUX.1-dev's shape ({shape}: step, layer, "
            f"head, token row, y, x; txt2img; {_size(found['store']['decoded_bytes'])} decoded, "
            f"{_size(found['store']['stored_bytes'])} on disk), written by the real writer. The "
            "server runs as `attnscope view --no-browser`; headless Chromium loads the page "
            "(the final step, every layer and head averaged) and moves the step, layer and head "
            f"sliders at random, {found['moves']} moves, each timed until the new map is drawn. "
            "The drift curve and head grid wait for the sliders to rest (250 ms), so they are "
            "not asked for while scrubbing.",
            _table(["measure", "this machine", "target", ""], rows),
            "Command: `python -m bench` (section `view`), or `python -m bench.view`.",
        ]
    )


def _codecs(r: dict[str, Any]) -> str:
    """Compressor choice on real maps (bench/codecs.py)."""
    if "codecs" not in r:
        return ""
    rows = [
        [
            c["codec"],
            f"{c['encode_mb_s']:,.0f} MB/s",
            f"{c['decode_mb_s']:,.0f} MB/s",
            f"{c['bytes_per_value']:.3f} B",
        ]
        for c in r["codecs"]["codecs"]
    ]
    return "\n\n".join(
        [
            "## Compressor choice",
            f"{r['codecs']['chunks']} stored chunks (24 heads × 64×64) of a real demo "
            "recording's maps, bit-rounded to keepbits 9 as stored; one thread (Blosc's own "
            "threads off), so per core; best of 3. The format uses LZ4-5 with bit-shuffle. The "
            "unshuffled LZ4 and Zstandard streams are what a GPU compressor (nvCOMP) writes that "
            "Zarr readers decode: Zarr v3's only shuffle is inside Blosc's frame.",
            _table(["compressor", "encode", "decode", "stored per value"], rows),
            *_by_keepbits(r["codecs"]),
            "Command: `python -m bench` (section `codecs`, `bench/codecs.py`).",
        ]
    )


def _rounded_as(run: dict[str, Any]) -> str:
    """The keepbits the rate benchmark's maps were rounded to, where its figures say."""
    if "keepbits" not in run:
        return ""
    return f" to keepbits {run['keepbits']} (what a recording of FLUX.1-dev, in bf16, keeps)"


def _by_keepbits(codecs: dict[str, Any]) -> list[str]:
    """Bytes stored per value as the kept mantissa bits go down (the format's compressor)."""
    stored = codecs.get("bytes_per_value_by_keepbits")
    if not stored:
        return []
    rows = [
        [keepbits, f"2^-{int(keepbits) + 1} = {2.0 ** -(int(keepbits) + 1):.2e}", f"{b:.3f} B"]
        for keepbits, b in stored.items()
    ]
    return [
        "The same chunks rounded to fewer mantissa bits (`attnscope record --keepbits N`), "
        "through the format's LZ4 with bit-shuffle: each bit kept costs about an eighth of a "
        "byte per value, the exponent bits the rest. bf16, which FLUX computes in, carries 7 "
        "(8 significant).",
        _table(["keepbits", "relative error bound", "stored per value"], rows),
    ]


def _analysis(r: dict[str, Any]) -> str:
    a = r["analysis"]
    w, m, c = a["write"], a["mean"], a["cli"]
    rate = m["decoded_bytes"] / m["compute_seconds"] / 1e6
    rows = [
        ["synthetic store (step, layer, head, token, y, x)", "×".join(str(x) for x in w["shape"])],
        ["decoded / on disk", f"{_size(w['decoded_bytes'])} / {_size(w['stored_bytes'])}"],
        [
            "written by the real writer in",
            f"{w['write_seconds']:.1f} s "
            f"({w['decoded_bytes'] / w['write_seconds'] / 1e6:,.0f} MB/s decoded)",
        ],
        [
            "opening the run (`analysis.open_trace(STORE)`: metadata and small coordinates), "
            "the first in a process",
            f"{m['open_seconds'] * 1e3:,.0f} ms",
        ],
        [
            "mean over step, layer, head of every span (`ds.txt2img.mean([...]).compute()`)",
            f"{m['compute_seconds']:.1f} s = **{rate:,.0f} MB/s** decoded"
            + (
                " (median of runs: "
                + ", ".join(f"{x:.1f}" for x in m["compute_runs"])
                + " s; the first also imports TensorStore on its first read)"
                if "compute_runs" in m
                else ""
            ),
        ],
        [
            'mean of one word\'s span (`ds.txt2img.sel(span="cat").mean([...])`)',
            f"{m['span_compute_seconds']:.2f} s = "
            f"{m['span_decoded_bytes'] / m['span_compute_seconds'] / 1e6:,.0f} MB/s of its row "
            f"({_size(m['span_decoded_bytes'])})",
        ],
        ["drawing one span's heatmap from it", f"{m['draw_seconds']:.2f} s"],
        ["peak RSS of that process (imports included)", _size(m["peak_rss"])],
    ]
    tuned = a.get("mean_tuned")
    if tuned:
        rows.append(
            [
                "the same mean, the allocator set as the `attnscope` command sets it "
                "(`analysis.allocator.reuse_freed_memory()`, a process of its own)",
                f"{tuned['compute_seconds']:.1f} s = **"
                f"{m['decoded_bytes'] / tuned['compute_seconds'] / 1e6:,.0f} MB/s** decoded "
                "(median of runs: "
                + ", ".join(f"{x:.1f}" for x in tuned["compute_runs"])
                + f" s), peak RSS {_size(tuned['peak_rss'])}",
            ]
        )
    rows += [
        [
            "cold CLI, one map (one step, layer, head, span)",
            f"**{c['one_map_seconds']:.2f} s** (runs: "
            + ", ".join(f"{x:.2f}" for x in c["one_map_runs"])
            + f"), peak RSS {_size(c['one_map_peak_rss'])}",
        ],
        [
            "cold CLI, one span's mean over every step, layer and head",
            f"{c['span_mean_seconds']:.2f} s, peak RSS {_size(c['span_mean_peak_rss'])}",
        ],
    ]
    return "\n\n".join(
        [
            "## Analysis speed",
            _table(["", ""], rows),
            f"Commands: `{c['commands']['one_map']}` and `{c['commands']['span_mean']}`.",
        ]
    )


def render(r: dict[str, Any]) -> str:
    sections = [
        _header(r),
        _summary(r),
        _overhead(r),
        _memory(r),
        _store(r),
        _rows(r),
        _codecs(r),
        _rate(r),
        _s3(r),
        _families(r),
        _video(r),
        _view(r),
        _analysis(r),
        limits(r),
        method(r),
    ]
    return "\n\n".join(section for section in sections if section).rstrip() + "\n"
