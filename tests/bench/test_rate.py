"""The rate benchmark's projection: a writer's listings in, its warm-up and sustained rate out,
and a generation played through the writer's backpressure; against figures worked by hand."""

import pytest

from bench.rate import _durable_times, _seconds_per_step, _simulated_ratio, _sustained

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


def test_a_host_s_step_time_scales_one_core_s_rate_per_doubling_of_cores_at_most_twice():
    one = {"unthrottled": {"sustained_mb_s": 750.0}}
    # 2.2x from 1 to 2 cores is the shared cores' noise: 16 cores write 16 times one core.
    noisy = {"unthrottled": {"sustained_mb_s": 1_650.0}}
    assert _seconds_per_step(one, noisy, STEP_BYTES, 16) == pytest.approx(300 / (750 * 16))
    # 1.8x per doubling: 8 cores are three doublings.
    slower = {"unthrottled": {"sustained_mb_s": 1_350.0}}
    assert _seconds_per_step(one, slower, STEP_BYTES, 8) == pytest.approx(300 / (750 * 1.8**3))
