"""The benchmark scripts run end to end in their --quick form."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_hashing.py", "bench_verify.py"])
def test_benchmark_smoke(script, benchmarks_dir):
    res = subprocess.run([sys.executable, str(benchmarks_dir / script), "--quick"], capture_output=True,
                         text=True, timeout=600, cwd=benchmarks_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["machine"]["cores"] >= 1
