"""The slow-disk benchmark: its throttle says why where it cannot be had, and its report."""

from bench import slow_disk
from bench.report import _slow_disk


def test_a_machine_without_a_blkio_cgroup_is_told_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(slow_disk, "CGROUP_V1", tmp_path / "no-cgroup")
    with slow_disk.throttled_writes(tmp_path, 150) as why_not:
        assert why_not.startswith("no blkio cgroup to throttle writes in (")
    assert list(tmp_path.iterdir()) == []


def test_the_report_gives_each_disk_s_ratios_and_says_which_is_slower():
    def runs(on: float, off: float) -> dict:
        ratio = "traced_over_untraced"
        return {"fsync on": {ratio: on}, "fsync off": {ratio: off}}

    slow = {"layers": 8, "steps": 20, "period": 0.15, "as it is": runs(1.03, 1.25)}
    said = "\n".join(_slow_disk({"slow_disk": slow | {"throttled": runs(2.98, 1.26)}}))
    assert "| as it is | 1.03 | 1.25 |" in said and "| throttled | 2.98 | 1.26 |" in said
    assert "fed 20 paced steps of 8 of those layers" in said
    assert "fsync off is the slower" in said
    said = "\n".join(_slow_disk({"slow_disk": slow | {"as it is": runs(1.03, 1.01)}}))
    assert "fsync off is the slower" not in said
    said = "\n".join(_slow_disk({"slow_disk": slow | {"throttled": {"skipped": "no root"}}}))
    assert "| throttled | skipped: no root |  |" in said
    assert _slow_disk({}) == []


def test_the_report_gives_the_estimates_prediction_beside_each_ratio_where_measured():
    def runs(on: float, off: float) -> dict:
        return {
            "fsync on": {"traced_over_untraced": on, "estimate": on * 0.9},
            "fsync off": {"traced_over_untraced": off, "estimate": 1.0},
        }

    slow = {"layers": 8, "steps": 20, "period": 0.15, "as it is": {"skipped": "no root"}}
    said = "\n".join(_slow_disk({"slow_disk": slow | {"throttled": runs(3.0, 1.2)}}))
    assert "| throttled | 3.00 (estimate 2.70) | 1.20 (estimate 1.00) |" in said
    assert "In brackets, what `record --estimate` predicts" in said
    said = "\n".join(_slow_disk({"slow_disk": slow}))
    assert "estimate" not in said
