"""bench_import_v41 runs end to end at the tiny size, and skips with its reason when the disk is too small."""

import json
import subprocess
import sys
from collections import namedtuple

import pytest

import bench_import_v41


@pytest.mark.slow
def test_the_import_benchmark_runs_at_the_tiny_size(benchmarks_dir, tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(benchmarks_dir / "bench_import_v41.py"), "--size", "tiny", "--dir",
                          str(tmp_path / "work"), "--out", str(out), "--verify"],
                         capture_output=True, text=True, timeout=600, cwd=benchmarks_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data == json.loads(out.read_text())
    assert data["status"] == "ok" and data["rss_under_2gb"] and data["machine"]["cores"] >= 1
    assert 0 < data["import_peak_rss_mib"] < 2048 and data["import_seconds"] > 0
    # the store holds every table byte (rows packed with their scales) plus headers, checksums, dense weights
    assert data["store_bytes"] > data["table_bytes"] > 0
    assert list((tmp_path / "work").iterdir()) == []  # cleaned up without --keep


def test_too_little_free_disk_is_a_skip_with_its_reason(monkeypatch, tmp_path, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bench_import_v41.shutil, "disk_usage", lambda p: usage(10 << 30, 9 << 30, 1 << 30))
    assert bench_import_v41.main(["--dir", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "skipped" and "1.0 GiB free" in data["reason"]
    assert data["table_bytes"] > 32 * 10**9 and data["needed_disk_bytes"] > 2.2 * data["table_bytes"]
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # nothing written but the result
