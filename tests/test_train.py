"""Trainer: golden loss curve, exact resume after kill -9 and Ctrl-C, damaged checkpoints, NaN stop."""

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import ConfigError
from engram.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from engram.train.config import apply_overrides, run_preset
from engram.train.run import read_metrics
from engram.train.trainer import Trainer, TrainingDiverged, lr_at, resolve_dtype

# The debug preset, made deterministic and small: fp32, one thread, a 512-token BPE.
OVERRIDES = ["train.steps=24", "train.ckpt_every=8", "train.eval_every=8", "train.dtype='float32'",
             "train.threads=1", "data.vocab_size=512"]
GOLDEN_NOTE = "debug preset on the synthetic corpus of tests/conftest.py, fp32, 1 thread, 12 steps"


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_corpus):
    base = tmp_path_factory.mktemp("train")
    corpus = make_corpus(base / "corpus")
    cache = base / "cache"
    from engram.data import prepare_data

    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=cache, progress=False)
    return {"base": base, "corpus": corpus, "cache": cache, "data": data}


def cfg_for(env, extra=()):
    return apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(env['corpus'])]!r}", *extra])


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_schedule():
    tc = run_preset("debug").train
    assert lr_at(0, tc) == pytest.approx(tc.lr / tc.warmup_steps)
    assert lr_at(tc.warmup_steps, tc) == pytest.approx(tc.lr)
    assert lr_at(tc.steps, tc) == pytest.approx(tc.lr * tc.min_lr_ratio)


def test_trainer_resolves_into_its_own_copy(env, tmp_path):
    """Vocabulary size, pad id, dtype=auto and threads=0 are resolved for the run, not in the caller's config."""
    cfg = cfg_for(env, ["train.dtype='auto'", "train.threads=0", "train.steps=2", "model.vocab_size=8192"])
    before = copy.deepcopy(cfg)
    tr = Trainer(cfg, tmp_path / "run", data=env["data"], progress=False)
    tr.train()
    assert cfg == before
    assert cfg.train.dtype == "auto" and cfg.train.threads == 0 and cfg.model.vocab_size == 8192
    assert tr.cfg is not cfg and tr.cfg.model.engram is not cfg.model.engram
    assert tr.cfg.model.vocab_size == env["data"].vocab_size != 8192
    assert tr.cfg.model.engram.pad_id == env["data"].pad_id
    assert tr.cfg.train.dtype in ("float32", "bfloat16") and tr.cfg.train.threads >= 1
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded == tr.cfg.to_dict()


def test_corpus_too_small_for_seq_len_is_a_config_error(env, tmp_path):
    small = dataclasses.replace(env["data"], val=env["data"].val[:40])
    with pytest.raises(ConfigError, match="validation split has 40 tokens.*train.seq_len"):
        Trainer(cfg_for(env), tmp_path / "run", data=small, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_autocast_dtype_resolution(env, tmp_path, monkeypatch):
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("auto", "cpu") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="train.dtype"):
        apply_overrides(run_preset("debug"), ["train.dtype='fp8'"])
    # "auto" picks bf16 exactly when a bf16 matmul is faster: fake both machines with a clock that
    # charges each matmul by its dtype.
    import engram.train.trainer as trainer_mod

    real_mm, clock = torch.Tensor.__matmul__, {"t": 0.0, "bf16_cost": 1.0}

    def mm(a, b):
        clock["t"] += clock["bf16_cost"] if a.dtype == torch.bfloat16 else 2.0
        return real_mm(a, b)

    for bf16_cost, want in ((1.0, "bfloat16"), (50.0, "float32")):
        clock["bf16_cost"] = bf16_cost
        monkeypatch.setattr(torch.Tensor, "__matmul__", mm)
        monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock["t"])
        assert resolve_dtype("auto", "cpu") == want
        monkeypatch.undo()
    # The run directory records the concrete choice, never "auto".
    tr = Trainer(cfg_for(env, ["train.dtype='auto'", "train.steps=1"]), tmp_path / "run", data=env["data"],
                 progress=False)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["train"]["dtype"] == tr.cfg.train.dtype in ("float32", "bfloat16")


def test_golden_loss_curve(env, tmp_path, one_thread, golden):
    res = Trainer(cfg_for(env, ["train.steps=12"]), tmp_path / "run", data=env["data"], progress=False).train()
    losses = [train_losses(tmp_path / "run")[s] for s in range(1, 13)]
    assert res.status == "finished" and res.step == 12
    want = golden("debug_loss_curve.json", {"note": GOLDEN_NOTE, "losses": losses})
    np.testing.assert_allclose(losses, want["losses"], atol=2e-3)
    assert losses[-1] < losses[0] - 0.5  # it learns
    # the run directory records what produced it
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert "torch" in meta["versions"] and "git_sha" in meta
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["steps"] == 12 and cfg["model"]["vocab_size"] == env["data"].vocab_size
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def _cli(env, run_dir, *extra):
    cmd = [sys.executable, "-m", "engram", "train", "--preset", "debug", "--run-dir", str(run_dir), "--no-progress",
           "--data", str(env["corpus"])]
    for ov in OVERRIDES:
        cmd += ["--set", ov]
    return cmd + list(extra)


def _subenv(env):
    return dict(os.environ, ENGRAM_CACHE=str(env["cache"]), PYTHONHASHSEED="0")


def _run_until(cmd, sub_env, metrics: Path, step: int, sig) -> int:
    """Start training, send `sig` once the metrics show `step`, return the exit code."""
    p = subprocess.Popen(cmd, env=sub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None:
            if metrics.is_file():
                steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines() if ln.strip()]
                if steps and max(steps) >= step:
                    p.send_signal(sig)
                    break
            time.sleep(0.01)
        return p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.slow
def test_resume_after_kill9_and_ctrl_c_is_exact(env):
    base = env["base"]
    sub_env = _subenv(env)
    ref = base / "uninterrupted"
    subprocess.run(_cli(env, ref), env=sub_env, check=True, timeout=300, capture_output=True)
    want = train_losses(ref)
    assert len(want) == 24

    # kill -9 somewhere between checkpoints, then resume
    killed = base / "killed"
    kill_step = int(np.random.default_rng(0).integers(9, 15))  # seeded: the same step on every run
    rc = _run_until(_cli(env, killed), sub_env, killed / "metrics.jsonl", kill_step, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    ck = latest_checkpoint(killed / "ckpt")
    assert ck is not None and json.loads(ck.read_text())["step"] % 8 == 0
    subprocess.run(_cli(env, killed, "--resume"), env=sub_env, check=True, timeout=300, capture_output=True)
    assert train_losses(killed) == want  # bit-identical losses, every step

    # Ctrl-C saves at the current step and exits cleanly; resuming finishes identically
    inter = base / "ctrlc"
    rc = _run_until(_cli(env, inter), sub_env, inter / "metrics.jsonl", 5, signal.SIGINT)
    assert rc == 130
    step = json.loads(latest_checkpoint(inter / "ckpt").read_text())["step"]
    assert 5 <= step < 24
    subprocess.run(_cli(env, inter, "--resume"), env=sub_env, check=True, timeout=300, capture_output=True)
    assert train_losses(inter) == want


def test_damaged_or_foreign_checkpoints_fail_clearly(env, tmp_path):
    run = tmp_path / "run"
    Trainer(cfg_for(env, ["train.steps=8"]), run, data=env["data"], progress=False).train()
    man = latest_checkpoint(run / "ckpt")
    pt = man.with_suffix(".pt")
    good = pt.read_bytes()

    # another config: refused by the run's record, and by the checkpoint itself
    with pytest.raises(ConfigError, match="cannot change model.d_model is 64 in the run, asked 32"):
        Trainer(cfg_for(env, ["train.steps=16", "model.d_model=32"]), run, resume=True, data=env["data"],
                progress=False)
    other = json.loads((run / "config.json").read_text())
    other["model"]["d_model"] = 32
    with pytest.raises(CheckpointError, match="another configuration"):
        load_checkpoint(man, other)
    # a fresh start over existing checkpoints is refused (nothing is overwritten)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(cfg_for(env, ["train.steps=16"]), run, data=env["data"], progress=False)
    # corrupted (same size, one byte flipped)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    pt.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(man)
    # truncated, and no older checkpoint to fall back to
    pt.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies: step-0000008.pt: .* truncated"):
        Trainer(cfg_for(env, ["train.steps=16"]), run, resume=True, data=env["data"], progress=False)
    pt.write_bytes(good)
    assert load_checkpoint(man)["step"] == 8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = Trainer(cfg_for(env, ["train.steps=20"]), run, data=env["data"], progress=False)
    real = tr.model.forward
    calls = {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if tr.model.training and tr.step >= 10:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 11"):
        tr.train()
    man = latest_checkpoint(run / "ckpt")
    assert json.loads(man.read_text())["step"] == 8
    state = load_checkpoint(man)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_generate_cli_on_trained_model(env, tmp_path):
    run = tmp_path / "run"
    Trainer(cfg_for(env, ["train.steps=4"]), run, data=env["data"], progress=False).train()
    res = subprocess.run([sys.executable, "-m", "engram", "generate", "--model", str(run / "model"), "--prompt",
                          "def value", "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True,
                         timeout=120, env=_subenv(env))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def value")
