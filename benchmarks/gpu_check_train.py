"""The training checks of `gpu_check`: an MoE baseline and its iso-parameter Engram variant, trained on the device.

Each model trains through `engram.train.trainer.Trainer` itself (the path `engram train --device`
takes), on synthetic Zipf-distributed token ids: a lent machine has no corpus and perhaps no
tokenizer packages, and a step's cost does not depend on what the ids mean (Zipf, not uniform, so the
memory tables see the skewed row reuse of text). The vocabulary map is saved as a ``.safetensors``
file, which `CompressedVocab.from_pretrained` loads without any tokenizer library.

Figures per model: ``tokens_per_s`` (the trainer's, over all steps) and ``steady_tokens_per_s``
(steps after the first logging step, whose sum of step times ends at a logging step: a device
synchronisation, so queued work is counted); the Engram/MoE ratio uses the steady figures.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

EXPERTS_MOVED = 8  # `engram compare`'s default: 8 of the demo's 32 routed experts move into memory


def synthetic_data(root: Path, vocab_size: int, n_train: int, n_val: int, seed: int = 0):
    """A `DataBundle` of Zipf(1.1)-distributed ids over a ``vocab_size`` vocabulary (identity compression)."""
    import numpy as np

    from engram.data.tokens import DataBundle, token_dtype
    from engram.tokenizer import CompressedVocab

    rng = np.random.default_rng(seed)
    rank_to_id = rng.permutation(vocab_size)  # frequent ids spread over the vocabulary, as in BPE

    def stream(n: int) -> np.ndarray:
        return rank_to_id[(rng.zipf(1.1, n) - 1) % vocab_size].astype(token_dtype(vocab_size))

    spec = CompressedVocab(np.arange(vocab_size)).save(root / "vocab.safetensors")
    return DataBundle(tokenizer_spec=str(spec), tokenizer=None, train=stream(n_train), val=stream(n_val), eos_id=0,
                      pad_id=0, meta={"vocab_size": vocab_size, "corpus": f"synthetic-zipf-1.1-seed{seed}"})


def _train_one(cfg, run_dir: Path, data, device) -> dict:
    from engram.train.run import read_metrics
    from engram.train.trainer import Trainer

    t0 = time.perf_counter()
    res = Trainer(cfg, run_dir, data=data, progress=False, device=device).train()
    wall = time.perf_counter() - t0
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    tail = [r for r in steps if r["step"] > cfg.train.log_every]
    tail_s = sum(r["step_s"] for r in tail)
    steady = len(tail) * cfg.train.tokens_per_step / tail_s if tail_s > 0 else None
    p = res.params
    return {"status": res.status, "steps": res.step, "dtype": cfg.train.dtype, "tokens_per_s": res.tokens_per_s,
            "steady_tokens_per_s": steady, "val_loss": res.val_loss, "final_loss": steps[-1]["loss"],
            "total_params": p["total"], "active_params": p["activated_per_token"], "memory_params": p["memory"],
            "wall_s": wall}


def run_pair(base, name: str, ctx, rec: dict, *, experts_moved: int) -> None:
    """Train the MoE baseline and its Engram variant of ``base`` on ``ctx.device``; figures into ``rec``."""
    import torch

    from engram.train.compare import variants

    tc = base.train
    tc.dtype = "auto" if ctx.device.type == "cuda" else "float32"  # bf16 where the device has it
    tc.eval_every = tc.ckpt_every = tc.steps
    tc.eval_tokens = min(tc.eval_tokens, 4 * tc.tokens_per_step)
    tc.log_every = 10 if tc.steps >= 20 else 1  # a steady span after the first logging step
    root = ctx.scratch(name)
    per_step = tc.tokens_per_step
    data = synthetic_data(root, base.model.vocab_size, max(200_000, 4 * per_step * tc.steps), 8 * per_step)
    rec.update(steps=tc.steps, batch=[tc.batch_size, tc.seq_len], d_model=base.model.d_model,
               n_layers=base.model.n_layers, experts_moved=experts_moved, data=data.meta["corpus"])
    for variant, cfg in variants(base, experts_moved).items():
        rec[variant] = _train_one(copy.deepcopy(cfg), root / variant, data, ctx.device)
        if ctx.device.type == "cuda":
            rec[variant]["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
    moe, eng = rec["moe"]["steady_tokens_per_s"], rec["engram"]["steady_tokens_per_s"]
    rec["engram_over_moe"] = eng / moe if moe and eng else None
    rec["target"] = 0.95
    rec["meets_target"] = rec["engram_over_moe"] is not None and rec["engram_over_moe"] >= rec["target"]


def shrink_demo(base) -> int:
    """The demo preset ``base`` shrunk in place to seconds on a CPU (d=64, 4 steps of 4 x 32 tokens);
    returns the experts its Engram variant moves into memory."""
    m = base.model
    m.d_model, m.n_layers, m.n_heads, m.mlp_hidden, m.max_seq_len = 64, 2, 2, 128, 64
    m.n_routed_experts, m.expert_hidden = 8, 64
    m.engram.engram_vocab_size, m.engram.n_embed_per_ngram, m.engram.n_head_per_ngram = [2003, 2003], 32, 4
    base.train.steps, base.train.batch_size, base.train.seq_len = 4, 4, 32
    return 2


def check_train_demo(ctx, rec: dict) -> None:
    """The demo preset's pair, 60 steps (``--tiny``: the demo shrunk to d=64, 4 steps)."""
    from engram.train.config import run_preset

    base = run_preset("demo")
    experts_moved = EXPERTS_MOVED
    if ctx.tiny:
        experts_moved = shrink_demo(base)
    else:
        base.train.steps = 60
    run_pair(base, "train_demo", ctx, rec, experts_moved=experts_moved)


def check_train_d768(ctx, rec: dict) -> None:
    """The demo's pair scaled to d=768 x 8 layers, 60 steps (``--tiny``: 3 steps of the debug preset's
    model, with 4 routed experts so that it has an MoE baseline)."""
    from engram.train.config import run_preset

    if ctx.tiny:
        base = run_preset("debug")
        m = base.model
        m.n_routed_experts, m.n_shared_experts, m.moe_top_k, m.expert_hidden, m.first_dense_layers = 4, 1, 2, 64, 1
        base.train.steps = 3
        experts_moved = 1
    else:
        base = run_preset("demo")
        m = base.model
        m.d_model, m.n_layers, m.n_heads, m.mlp_hidden, m.expert_hidden = 768, 8, 12, 2304, 768
        base.train.steps = 60
        experts_moved = EXPERTS_MOVED
    run_pair(base, "train_d768", ctx, rec, experts_moved=experts_moved)
