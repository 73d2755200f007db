"""`gpu_check.py --device cpu --tiny` runs every check on the CPU and records each one as ok."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_check_dry_run_records_every_check(benchmarks_dir, tmp_path):
    import gpu_check

    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(benchmarks_dir / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--out", str(out), "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["machine"]["device"] == "cpu"
    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == list(gpu_check.checks())  # every check, once, in order
    for name, c in checks.items():
        assert c["status"] == "ok", (name, c.get("error"), c.get("reason"))
        assert c["seconds"] >= 0 and c["error"] is None
    for name in ("train_demo", "train_d768"):
        assert checks[name]["engram"]["memory_params"] > 0 == checks[name]["moe"]["memory_params"]
        assert checks[name]["engram_over_moe"] > 0
    assert checks["hashing"]["bit_equal"] and checks["generate"]["tokens_equal"]
    assert checks["offload"]["host"]["outputs_equal"] and checks["offload"]["disk_cache10"]["outputs_equal"]
    assert not list(tmp_path.glob("gpu_check-*"))  # the scratch space is removed


def test_a_failing_check_is_recorded_and_the_rest_go_on(tmp_path):
    import gpu_check

    def boom(ctx, rec):
        rec["measured"] = 1
        raise RuntimeError("boom")

    def skip(ctx, rec):
        raise gpu_check.Skip("no room")

    out = tmp_path / "r.json"
    report = gpu_check.Report(out, {"torch": "x"}, {})
    for name, fn in (("a", boom), ("b", skip), ("c", lambda ctx, rec: rec.update(v=2))):
        report.run(name, fn, None)
        written = json.loads(out.read_text())["checks"]
        assert written[-1]["name"] == name and written[-1]["status"] != "running"  # rewritten after each
    a, b, c = json.loads(out.read_text())["checks"]
    assert a["status"] == "failed" and "RuntimeError: boom" in a["error"] and a["measured"] == 1
    assert b["status"] == "skipped" and b["reason"] == "no room"
    assert c["status"] == "ok" and c["v"] == 2
