"""The benchmark helpers' own logic (benchmarks/common.py): steal accounting and paired-ratio summaries."""

import os

import pytest

from common import median_ci, steal_seconds, total_ratio_ci


def test_steal_seconds_reads_the_aggregate_cpu_line(tmp_path):
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice; per-CPU lines must not count
    stat.write_text(f"cpu  10 0 5 900 1 0 2 {3 * tick} 0 0\ncpu0 5 0 2 450 0 0 1 {tick} 0 0\nintr 1\n")
    assert steal_seconds(stat) == pytest.approx(3.0)
    stat.write_text("cpu  10 0 5 900\n")  # a kernel without the steal column
    assert steal_seconds(stat) is None
    assert steal_seconds(tmp_path / "missing") is None


def test_median_ci_brackets_the_median():
    r = median_ci([0.9, 1.0, 1.1, 0.95, 1.05] * 10)
    assert r["median"] == pytest.approx(1.0)
    assert r["ci95"][0] <= r["median"] <= r["ci95"][1]
    assert r["pairs"] == 50


def test_total_ratio_counts_slow_pairs_in_full():
    pairs = [(1.0, 1.0)] * 9 + [(1.0, 2.0)]  # one pair twice as slow
    r = total_ratio_ci(pairs)
    assert r["ratio"] == pytest.approx(10 / 11, abs=1e-3)  # the median of ratios would say 1.0
    assert median_ci([a / b for a, b in pairs])["median"] == 1.0
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] <= 1.0
