"""`gpu_check.py --device cpu --tiny` runs every check on the CPU and records each one (ok, or skipped
with the reason where a check needs CUDA), and the pieces of the checks that can be tested without it."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

NEEDS_CUDA = {"syncs"}  # skipped on a CPU, after running the step path


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
        assert c["status"] == ("skipped" if name in NEEDS_CUDA else "ok"), (name, c.get("error"), c.get("reason"))
        assert c["seconds"] >= 0 and c["error"] is None
    assert "needs a CUDA device" in checks["syncs"]["reason"] and checks["syncs"]["table_optimizer"] == "SparseRowAdam"
    assert checks["syncs"]["step_s_deferred"] > 0 and checks["syncs"]["step_s_immediate"] > 0  # the path ran
    nccl = checks["nccl_smoke"]
    assert nccl["backend"] == "gloo" and nccl["all_to_all_single_equal"] and nccl["all_reduce_equal"]
    assert nccl["all_to_all"]["rows_equal"] and nccl["masked"]["rows_equal"]
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


def test_sync_recorder_names_the_project_site(monkeypatch):
    """A sync warning raised inside torch's call made by the project is counted at the project's line,
    the torch-side frame kept as ``via``; other warnings pass through untouched."""
    import gpu_check_syncs
    from engram.optim import sparse_adam

    real_unique = torch.unique

    def syncing_unique(*a, **kw):  # what sync debug mode makes of torch.unique on CUDA
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        return real_unique(*a, **kw)

    monkeypatch.setattr(torch, "unique", syncing_unique)
    p = torch.nn.Parameter(torch.zeros(10, 4))
    with gpu_check_syncs.SyncRecorder() as rec:
        for _ in range(3):
            p.grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]]), torch.ones(3, 4), (10, 4),
                                             check_invariants=True)
            sparse_adam.clip_grad_norm_([p], 1.0)  # coalesces the gradient: torch.unique
        with pytest.warns(UserWarning, match="unrelated"):
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    (site,) = rec.per_step(3)
    assert site["site"].startswith("engram/optim/sparse_adam.py:") and site["site"].endswith("(sparse_rows)")
    assert site["per_step"] == 1.0
    (via,) = site["via"]
    assert "test_gpu_check.py" in via and "syncing_unique" in via and site["via"][via] == 3
    assert not any(Path(s.split(":")[0]).is_absolute() for s in (site["site"], via))  # no machine's paths


def test_nccl_smoke_runs_with_gloo_and_leaves_no_group(tmp_path):
    import torch.distributed as dist

    import gpu_check
    import gpu_check_nccl

    rec = {}
    gpu_check_nccl.check_nccl_smoke(gpu_check.Context(torch.device("cpu"), True, tmp_path, 0.0), rec)
    assert rec["backend"] == "gloo" and rec["distinct_ids"] < rec["ids"]  # duplicates, summed by the backward
    for form in ("all_to_all", "masked"):
        assert rec[form]["rows_equal"] and rec[form]["grad_sparse"] and rec[form]["grad_rel_diff"] < 1e-5
    assert not dist.is_initialized()
