"""The rate benchmark's projection: a writer's listings in, its warm-up and sustained rate out,
and a generation played through the writer's backpressure; against figures worked by hand."""

import pytest

from bench.rate import (
    HEADS,
    LOOK_SECONDS,
    TOKEN_ROWS,
    _durable_times,
    _seconds_per_step,
    _simulated_ratio,
    _sustained,
    layer_maps,
)

STEP_BYTES = 300_000_000


def test_a_writer_that_keeps_pace_costs_one_step_s_writing_after_the_last():
    # 28 steps of 0.15 s; each step durable 0.1 s after it was made, none waits.
    assert _simulated_ratio(0.1, 0.0) == pytest.approx((28 * 0.15 + 0.1) / (28 * 0.15))


def test_a_slow_writer_holds_the_generation_back_by_its_backpressure():
    # 0.3 s a step, 1 s more on the first: step 0 durable at 0.15 + 1 + 0.3; step 1 was made at
    # 0.3 and waits for it; step 2 is made once step 0 is durable (two pending at most).
    assert _durable_times(0.3, 1.0, 0.15, 4) == pytest.approx([1.45, 1.75, 2.05, 2.35])
    assert _simulated_ratio(0.3, 1.0) == pytest.approx((1.45 + 27 * 0.3) / (28 * 0.15))


def test_the_warm_up_read_from_paced_listings_is_the_one_the_projection_plays():
    figures = _sustained([1.45, 1.75, 2.05, 2.35], STEP_BYTES, 0.15)
    assert figures["warm_up_seconds"] == pytest.approx(1.0)
    assert figures["sustained_mb_s"] == pytest.approx(STEP_BYTES / 0.3 / 1e6)


def test_a_writer_without_warm_up_reads_none_when_fed_paced_or_at_once():
    # Paced: step 0 fed by 0.15 s, durable 0.3 s later, the next every 0.3 s.
    paced = _sustained([0.45, 0.75, 1.05, 1.35], STEP_BYTES, 0.15)
    assert paced["warm_up_seconds"] == pytest.approx(0.0)
    # All at once: the first durable after one step's writing.
    assert _sustained([0.3, 0.6, 0.9], STEP_BYTES, 0.0)["warm_up_seconds"] == pytest.approx(0.0)


def test_steps_listed_between_two_looks_took_at_most_a_look_each():
    # A short smoke run: the last two steps seen listed in the same look.
    figures = _sustained([0.237, 0.325, 0.325], STEP_BYTES, 0.0)
    assert figures["sustained_mb_s"] == pytest.approx(STEP_BYTES / LOOK_SECONDS / 1e6)


def two_cores(sustained_mb_s: float, disk_sync_mb_s: float = 1e9) -> dict:
    """Runs on two cores at `sustained_mb_s` decoded, 4 steps storing 100 MB each."""
    unthrottled = {"sustained_mb_s": sustained_mb_s, "stored_bytes": 4 * 100e6}
    return {"unthrottled": unthrottled, "steps": 4, "disk_sync_mb_s": disk_sync_mb_s}


def test_a_host_s_step_time_follows_amdahl_s_law_from_the_1_to_2_core_scaling():
    one = {"unthrottled": {"sustained_mb_s": 750.0}}
    # 2.2x from 1 to 2 cores is the shared cores' noise: 16 cores write 16 times one core.
    noisy = two_cores(1_650.0)
    assert _seconds_per_step(one, noisy, STEP_BYTES, 16) == pytest.approx(300 / (750 * 16))
    # 1.6x: 1 / (s + (1 - s) / 2) = 1.6 makes a serial fraction s of 0.25, so 8 cores speed one
    # up 1 / (0.25 + 0.75 / 8) = 2.909 times (three doublings of 1.6 would be 4.1).
    slower = two_cores(1_200.0)
    assert _seconds_per_step(one, slower, STEP_BYTES, 8) == pytest.approx(300 / (750 * 32 / 11))
    # Slower on two cores than on one: nothing scales.
    worse = two_cores(700.0)
    assert _seconds_per_step(one, worse, STEP_BYTES, 16) == pytest.approx(300 / 750)


def test_a_host_s_step_time_is_never_less_than_the_disk_takes_to_sync_it():
    one = {"unthrottled": {"sustained_mb_s": 750.0}}
    # 100 MB stored a step at 1,000 MB/s: 0.1 s, whatever the cores.
    slow_disk = two_cores(1_500.0, disk_sync_mb_s=1_000.0)
    assert _seconds_per_step(one, slow_disk, STEP_BYTES, 16) == pytest.approx(0.1)
    assert _seconds_per_step(one, slow_disk, STEP_BYTES, 1) == pytest.approx(300 / 750)


@pytest.mark.parametrize("rows", [260, 100, 25])
def test_a_fed_chunk_s_heads_are_different_maps_of_the_demo(rows):
    """Repeated maps inside a chunk compress and encode faster than real ones do."""
    import torch

    demo = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, 16)
    for layer in range(3):
        maps = layer_maps(demo, layer)
        assert maps.shape == (HEADS, TOKEN_ROWS, 16) and maps.is_contiguous()
        for token in range(TOKEN_ROWS):
            heads = maps[:, token, 0]
            assert len(set(heads.tolist())) == HEADS  # one chunk: every head a different row


def test_the_report_renders_the_figures_as_measured_as_it_does_read_back_from_json():
    # Measured, the runs are keyed by their cores as ints; read back from JSON, as strings.
    import json
    from pathlib import Path

    from bench.report import render

    results = json.loads((Path(__file__).parents[2] / "docs" / "benchmarks.json").read_text())
    as_measured = json.loads(json.dumps(results))
    as_measured["rate"]["runs"] = {int(k): v for k, v in results["rate"]["runs"].items()}
    assert render(as_measured) == render(results)
