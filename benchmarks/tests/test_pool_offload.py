"""Pooling bench_offload runs (benchmarks/pool_offload.py): what is pooled, how, and what is refused."""

import json
from pathlib import Path

import numpy as np
import pytest

from pool_offload import PoolError, main, pool, pooled


def _run(path, prefill, decode, *, sha="abc1234", d_model=512, name="disk", rounds=1, shared=True):
    """A bench_offload-shaped result whose `name` configuration has the given (ram_s, offloaded_s) pairs."""
    per_round = len(prefill) // rounds
    dec_round = len(decode) // rounds
    res = {
        "benchmark": "offload_throughput",
        "machine": {"git_sha": sha, "date": "2026-12-02"},
        "table": {"rows": 100, "row_bytes": 256}, "cache_bytes": 1000,
        "backbone": {"d_model": d_model, "n_layers": 12}, "layout": {"placed_rows": 5},
        "prefill": {"batch": [8, 256], "batches": per_round}, "decode": {"text": [4, 128], "steps": 64},
        "backbone_shared": shared,
        "summary": {"ram_model": {"prefill_tok_s": 1000.0, "decode_tok_s": 60.0}},
        "runs": [{name: {"prefill_pairs_s": prefill[i * per_round:(i + 1) * per_round],
                         "decode_pairs_s": decode[i * dec_round:(i + 1) * dec_round]}}
                 for i in range(rounds)],
    }
    Path(path).write_text(json.dumps(res))
    return str(path)


def test_pooled_ratios_are_ram_time_over_offloaded_time_over_every_pair():
    a = [(1.0, 1.0)] * 9 + [(1.0, 2.0)]
    b = [(2.0, 2.0)] * 10
    r = pooled([np.array(a), np.array(b)])
    assert r["pairs"] == 20 and r["runs"] == 2
    assert r["median"] == 1.0
    assert r["total"] == pytest.approx(30 / 31, abs=1e-3)  # the slow pair counts in full
    assert r["total_ci95"][0] <= r["total"] <= r["total_ci95"][1]


def test_the_bootstrap_resamples_within_each_run():
    # run A: every pair 0.90, run B: every pair 1.00. Resampling within runs keeps their shares fixed,
    # so every resample's median lies between the runs, and the total ratio's interval collapses.
    a = [(0.9, 1.0)] * 30
    b = [(1.0, 1.0)] * 10
    r = pooled([np.array(a), np.array(b)])
    assert r["median"] == pytest.approx(0.9)
    assert r["median_ci95"] == [0.9, 0.9]
    assert r["total_ci95"][0] == r["total_ci95"][1] == r["total"] == pytest.approx(37 / 40, abs=1e-3)


def test_pool_over_runs_and_rounds_and_the_target_verdict(tmp_path):
    rng = np.random.default_rng(1)
    good = [(1.0, float(1.0 + e)) for e in rng.uniform(0.0, 0.01, 60)]  # ~0.5% slower
    bad = [(1.0, float(1.0 + e)) for e in rng.uniform(0.05, 0.07, 60)]  # ~6% slower
    p1 = _run(tmp_path / "a.json", good[:30], good[:40], rounds=2)
    p2 = _run(tmp_path / "b.json", good[30:], good[:21], sha="def5678", rounds=3)
    res = pool([p1, p2])
    c = res["configs"]["disk"]
    assert c["prefill"]["pairs"] == 60 and c["decode"]["pairs"] == 61
    assert c["meets_target_prefill"] and c["meets_target_decode"]
    assert c["median_interval_above_target"] == {"prefill": True, "decode": True}
    assert res["git_shas"] == ["abc1234", "def5678"]
    assert [r["prefill"]["pairs"] for r in c["per_run"]] == [30, 30]
    p3 = _run(tmp_path / "c.json", bad, bad)
    c = pool([p1, p3])["configs"]["disk"]
    assert not c["meets_target_prefill"]  # 2/3 of the pairs 6% slower: the interval reaches below 0.97
    assert not c["median_interval_above_target"]["prefill"]


def test_runs_that_measured_different_things_are_refused(tmp_path):
    pairs = [(1.0, 1.0)] * 4
    p1 = _run(tmp_path / "a.json", pairs, pairs)
    with pytest.raises(PoolError, match="'backbone'"):
        pool([p1, _run(tmp_path / "b.json", pairs, pairs, d_model=1024)])
    with pytest.raises(PoolError, match="'backbone_shared'"):
        pool([p1, _run(tmp_path / "c.json", pairs, pairs, shared=False)])
    with pytest.raises(PoolError, match="--same-sha"):
        pool([p1, _run(tmp_path / "d.json", pairs, pairs, sha="0000000")], same_sha=True)
    with pytest.raises(PoolError, match="'ram_store' is not in every round"):
        pool([p1], ["ram_store"])


def test_unusable_files_give_a_clear_error_and_exit_code(tmp_path, capsys):
    old = tmp_path / "old.json"
    res = json.loads(Path(_run(tmp_path / "x.json", [(1.0, 1.0)], [(1.0, 1.0)])).read_text())
    del res["runs"][0]["disk"]["prefill_pairs_s"]
    old.write_text(json.dumps(res))
    with pytest.raises(PoolError, match="keeps no pair timings"):
        pool([str(old)])
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "access_distribution"}))
    with pytest.raises(PoolError, match="not a bench_offload.py result"):
        pool([str(tmp_path / "other.json")])
    (tmp_path / "broken.json").write_text("{")
    assert main([str(tmp_path / "broken.json")]) == 2
    assert "cannot read a bench_offload result" in capsys.readouterr().err


def test_the_recorded_pooled_result_is_what_the_recorded_runs_give(results_dir):
    """benchmarks/results keeps four runs and their pooled result (RESULTS.md's table): recomputing it
    from the runs must give the same numbers, so the table stays traceable to its data."""
    d = results_dir / "offload_d512_2026-12-02"
    recorded = json.loads((d / "pooled.json").read_text())
    res = pool([str(p) for p in sorted(d.glob("c*.json"))])
    for name, c in recorded["configs"].items():
        for key in ("prefill", "decode", "meets_target_prefill", "meets_target_decode",
                    "median_interval_above_target"):
            assert res["configs"][name][key] == c[key], (name, key)
    assert res["configs"]["disk_static_layout"]["prefill"]["pairs"] == 432
