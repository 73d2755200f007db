"""Trainer: golden loss curve, exact resume after kill -9 and Ctrl-C, damaged checkpoints, NaN stop."""

import copy
import dataclasses
import json
import math
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


# ------------------------------------------------------------- every documented option value runs

def _documented_choices() -> list[tuple[str, object]]:
    """``(field, value)`` for every value of every config field that takes one of a few: each choice of a
    Literal field and both values of a bool field, found from the annotations (new ones join by themselves)."""
    import typing

    from engram.config import EngramConfig, ModelConfig
    from engram.train.config import DataConfig, TrainConfig
    from engram.train.overrides import field_types

    out = []
    for section, cls in (("train", TrainConfig), ("model", ModelConfig), ("model.engram", EngramConfig),
                         ("data", DataConfig)):
        for name, tp in field_types(cls).items():
            values = (False, True) if tp is bool else typing.get_args(tp) if typing.get_origin(tp) is typing.Literal \
                else ()
            out += [(f"{section}.{name}", v) for v in values]
    return out


CHOICES = _documented_choices()
TINY = ["train.steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.eval_tokens=256"]


def _run_tiny(env, tmp_path, extra):
    tr = Trainer(cfg_for(env, TINY + list(extra)), tmp_path / "run", data=env["data"], progress=False)
    tables_before = [p.detach().clone() for p in tr.model.engram_parameters()]
    res = tr.train()
    assert res.status == "finished" and res.step == 2 and math.isfinite(res.val_loss)
    if tables_before:  # the memory learned: the tables' optimizer ran
        assert any(not torch.equal(a, b.detach()) for a, b in zip(tables_before, tr.model.engram_parameters(),
                                                                   strict=True))
    return tr, json.loads((tmp_path / "run" / "config.json").read_text())


def test_the_documented_choices_are_found():
    keys = {k for k, _ in CHOICES}
    assert {"train.engram_optimizer", "train.dtype", "train.compile_engram", "model.engram.table_dtype",
            "model.engram.conv_init", "model.engram.sparse", "model.tie_embeddings", "model.hc_dynamic"} <= keys
    assert [v for k, v in CHOICES if k == "train.engram_optimizer"] == ["sparse_row_adam", "dense_adamw",
                                                                        "torch_sparse_adam"]


@pytest.mark.parametrize("key, value", [pytest.param(k, v, marks=pytest.mark.slow) if (k, v) == (
    "train.compile_engram", True) else (k, v) for k, v in CHOICES], ids=[f"{k}={v}" for k, v in CHOICES])
def test_every_documented_value_trains(key, value, env, tmp_path):
    """A tiny training run (2 steps of the debug preset) with the value set as a user would: --set key=value.
    torch.compile (compile_engram=true) costs ~15 s of compiling, hence slow."""
    extra = [f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    if key == "model.hc_dynamic":
        extra.append("model.hc_mult=2")  # the dynamic part exists only with several residual branches
    tr, recorded = _run_tiny(env, tmp_path, extra)
    section = recorded
    for part in key.split("."):
        section = section[part]
    if key != "train.dtype" or value != "auto":  # "auto" is resolved for the run
        assert section == value
    if key == "train.engram_optimizer":
        assert type(tr.table_opt).__name__ == {"sparse_row_adam": "SparseRowAdam", "dense_adamw": "NoneType",
                                               "torch_sparse_adam": "TorchSparseAdam"}[value]


@pytest.mark.parametrize("optimizer", ["sparse_row_adam", "dense_adamw", "torch_sparse_adam"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
def test_every_optimizer_takes_either_gradient_layout(optimizer, sparse, table_dtype, env, tmp_path):
    """dense_adamw builds the tables with dense gradients (torch AdamW takes no sparse ones) and the run
    records it; the sparse optimizers take the layout the config asks for, sparse or dense rows."""
    tr, recorded = _run_tiny(env, tmp_path, [f"train.engram_optimizer={optimizer}", f"model.engram.sparse={sparse}",
                                             f"model.engram.table_dtype={table_dtype}"])
    want_sparse = sparse and optimizer != "dense_adamw"
    assert recorded["model"]["engram"]["sparse"] is want_sparse
    assert all(t.sparse is want_sparse for t in (b.engram.table for b in tr.model.blocks if b.engram is not None))
    tables = {id(p) for p in tr.model.engram_parameters()}
    in_adamw = {id(p) for g in tr.opt.param_groups for p in g["params"]} & tables
    assert in_adamw == (tables if optimizer == "dense_adamw" else set())


def test_generate_with_its_default_length_fits_the_debug_model(env, tmp_path, capsys, monkeypatch):
    """The debug model's context is 64 tokens, fewer than --max-new-tokens' default (100): `engram generate`
    caps, says so on stderr and samples up to the context, from RAM or through a memory provider."""
    from engram.cli import main
    from engram.tokenizer import load_tokenizer

    _run_tiny(env, tmp_path, [])
    capsys.readouterr()
    model = tmp_path / "run" / "model"
    monkeypatch.setenv("ENGRAM_CACHE", str(env["cache"]))
    n_prompt = len(load_tokenizer(str(model / "tokenizer"))("def value", add_special_tokens=False).input_ids)
    for memory in ([], ["--memory", "ram", "--data", str(env["corpus"])]):
        assert main(["generate", "--model", str(model), "--prompt", "def value", "--temperature", "0", *memory]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("def value")
        assert (f"--max-new-tokens 100 capped to {64 - n_prompt} to fit the model's 64-token context "
                f"(prompt: {n_prompt} tokens)") in err
    assert main(["generate", "--model", str(model), "--prompt", "def value " * 40]) == 2
    assert capsys.readouterr().err.startswith("engram: error: the prompt has ")


@pytest.fixture(scope="module")
def served(env, tmp_path_factory):
    """A debug model trained for 2 steps and its exported store."""
    from engram.serve import export_tables

    root = tmp_path_factory.mktemp("served")
    Trainer(cfg_for(env, TINY), root / "run", data=env["data"], progress=False).train()
    return root / "run" / "model", export_tables(root / "run" / "model", root / "store")


def _cli_choices(command: str) -> list[tuple[str, str]]:
    import argparse

    from engram.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [(a.option_strings[0], c) for a in sub._actions if a.choices and a.dest != "preset" for c in a.choices]


EVAL_CHOICES = _cli_choices("eval")


def test_the_cli_choices_are_found():
    assert {o for o, _ in EVAL_CHOICES} == {"--memory", "--policy", "--io"}
    assert {o for o, _ in _cli_choices("generate")} == {"--memory", "--policy", "--io"}


@pytest.mark.parametrize("option, value", EVAL_CHOICES, ids=[f"{o}={v}" for o, v in EVAL_CHOICES])
def test_every_documented_serving_choice_runs(option, value, served, env, capsys, monkeypatch):
    """`engram eval` with each value of each option that takes a choice gives the loss of the tables in RAM
    (a disk store where the option is about the store; a small cache where it is about the cache)."""
    from engram.cli import main

    model, store = served
    monkeypatch.setenv("ENGRAM_CACHE", str(env["cache"]))
    base = ["eval", "--model", str(model), "--data", str(env["corpus"]), "--eval-tokens", "512", "--json",
            "--profile-tokens", "1024"]
    assert main([*base, "--memory", "ram"]) == 0
    want = json.loads(capsys.readouterr().out)["val_loss"]
    args = {"--memory": "disk", "--store": str(store), "--cache-mb": "0.05", option: value}
    if args["--memory"] == "ram":
        del args["--store"], args["--cache-mb"]
    rc = main([*base, *(x for kv in args.items() for x in kv)])
    out, err = capsys.readouterr()
    if rc == 2 and value == "direct":  # a file system without O_DIRECT: said in one line
        assert err.startswith("engram: error: ") and "direct" in err
        return
    assert rc == 0, err
    assert json.loads(out)["val_loss"] == pytest.approx(want, abs=1e-6)
