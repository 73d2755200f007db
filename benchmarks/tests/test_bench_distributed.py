"""bench_distributed: the scaling model's arithmetic, the cost fit, and a quick end-to-end run."""

import json
import subprocess
import sys

import pytest

import bench_distributed as bd


def test_scaling_model_invariants():
    rows = bd.scaling_model(0.3)
    assert [r["ranks"] for r in rows] == [8, 64, 512]
    per_token = [r["bytes_per_token"] for r in rows]
    assert per_token == sorted(per_token)  # a larger world owns less of each rank's ids locally
    limit = 2 * 16 * 0.3 * (8 + 6 * 160)  # every id remote
    assert all(p < limit for p in per_token) and per_token[-1] > 0.99 * limit
    for r in rows:
        lo, hi = r["exchange_s"]
        assert 0 < lo <= hi
        assert r["messages_per_rank_step"] == r["collectives_per_step"] * (r["ranks"] - 1)


def test_fit_recovers_alpha_beta():
    alpha, beta = 2e-4, 1e-9
    recs = [{"all_to_all_fwd_collectives": 3, "all_to_all_fwd_bytes": b,
             "all_to_all_fwd_comm_s": 3 * alpha + beta * b} for b in (1e3, 1e5, 1e7)]
    fit = bd.fit_alpha_beta({"per_rank": [recs]})
    assert fit["alpha_s_per_collective"] == pytest.approx(alpha, rel=1e-6)
    assert fit["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)


@pytest.mark.slow
def test_exchange_part_runs(benchmarks_dir, tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(benchmarks_dir / "bench_distributed.py"), "--quick", "--parts",
                          "exchange", "--out", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=benchmarks_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    big = data["exchange"]["per_rank"][0][-1]
    # The masked form moves every rank's rows to every rank: more bytes than the all-to-all's distinct rows.
    assert big["masked_fwd_bytes"] > big["all_to_all_fwd_bytes"] > 0
    assert big["all_to_all_fwd_collectives"] == 3
