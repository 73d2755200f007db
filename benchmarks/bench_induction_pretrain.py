"""Does copying put into pretraining grow the induction circuit in the demo MoE? Copy rows in the corpus mix.

`bench_induction.py` found that a trained demo model does not learn to copy from its context within a
fine-tune, and that a fresh model of the demo architecture with the full 8192-id head sits on a plateau
before copying. This asks the remaining question: is copying learned when it is part of pretraining from
the first step? A fresh demo-preset MoE (no Engram: the memory cannot copy) trains on the demo corpus with
a fraction of its batch rows turned into copy rows, and is measured as it goes.

A copy row is a span of 8..47 tokens, the same span again, then ordinary corpus text; every position is
supervised (the copy rows are corpus-like text, not a separate task). The span is a random stretch of the
corpus, or with ``--alphabet`` on every other step a span of distinct ids drawn from the corpus's 64 most
frequent ones (the small-alphabet task that fresh models learn fastest in `bench_induction.py`).

Every 25 steps, on held-out rows of the validation split: ``copy``, the loss on the repeated span's
tokens (its second token on); ``first``, the loss on the same tokens at their first occurrence, where no
copy is possible: the gap ``first - copy`` is what copying from the context earns (a circuit that copies
drives ``copy`` towards 0); ``copy_acc``, top-1 accuracy inside the repeat; ``lm``, the loss on plain
corpus windows; ``acopy`` (with ``--alphabet``), the loss inside the repeat of small-alphabet rows (ln 64 =
4.16 is guessing among the alphabet).

Run: .venv/bin/python benchmarks/bench_induction_pretrain.py [--steps 400] [--copy 0.5] [--alphabet]
     [--tied] [--std 0.1] [--head-bias log_prior] [--out F.json]
"""

# Legend: B batch rows, T positions, V vocabulary.

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from engram.data import prepare_data
from engram.model import EngramLM
from engram.train.config import run_preset
from engram.train.loop import lr_at

from common import emit, machine_info

T, WARMUP, ALPHABET = 128, 30, 64


class Rows:
    """Batches of corpus windows, the first ``ncopy`` rows of each turned into copy rows."""

    def __init__(self, top_ids: np.ndarray) -> None:
        self.top = top_ids

    def __call__(self, rng, toks: np.ndarray, n: int, ncopy: int, alphabet: bool = False):
        x_BT, y_BT = np.empty((n, T), np.int64), np.empty((n, T), np.int64)
        repeat_BT = np.zeros((n, T), bool)  # targets inside the repeat: the span's tokens from its second on
        for b in range(n):
            s = rng.integers(0, len(toks) - T - 1)
            w = toks[s:s + T + 1].astype(np.int64)
            if b < ncopy:
                k = int(rng.integers(8, 48))
                s2 = rng.integers(0, len(toks) - k)
                span = toks[s2:s2 + k].astype(np.int64)
                if alphabet:
                    span = rng.choice(self.top, k, replace=False).astype(np.int64)
                w = np.concatenate([span, span, w[:T + 1 - 2 * k]])
                repeat_BT[b, k:2 * k - 1] = True
            x_BT[b], y_BT[b] = w[:-1], w[1:]
        return torch.from_numpy(x_BT), torch.from_numpy(y_BT), torch.from_numpy(repeat_BT)


def first_occurrence(repeat_BT: torch.Tensor) -> torch.Tensor:
    """The same targets one span earlier (the span's first occurrence, where nothing can be copied)."""
    first_BT = torch.zeros_like(repeat_BT)
    for b in range(repeat_BT.shape[0]):
        idx = repeat_BT[b].nonzero().flatten()
        first_BT[b, idx - (len(idx) + 1)] = True
    return first_BT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--copy", type=float, default=0.5, help="fraction of each batch's rows that are copy rows")
    ap.add_argument("--alphabet", action="store_true",
                    help="every other step, copy spans of distinct ids from the corpus's 64 most frequent")
    ap.add_argument("--tied", action="store_true", help="tie the head to the embedding (the demo preset's)")
    ap.add_argument("--std", type=float, default=0.1, help="token embedding init std (demo preset: 0.02)")
    ap.add_argument("--head-bias", default="log_prior", choices=["none", "zero", "log_prior"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = prepare_data(progress=False)
    train, val = np.asarray(data.train), np.asarray(data.val)
    cfg = dataclasses.replace(run_preset("demo").model, engram=None, tie_embeddings=a.tied,
                              embed_init_std=a.std, head_bias=a.head_bias)
    torch.manual_seed(a.seed)
    model = EngramLM(cfg)
    counts_V = np.bincount(train.reshape(-1), minlength=cfg.vocab_size)[:cfg.vocab_size]
    if a.head_bias == "log_prior":
        model.set_head_prior(counts_V)
    model.train()
    rows = Rows(np.argsort(-counts_V)[:ALPHABET])

    erng = np.random.default_rng(10_000 + a.seed)
    ex_BT, ey_BT, erep_BT = rows(erng, val, 48, 48)
    ax_BT, ay_BT, arep_BT = rows(erng, val, 48, 48, alphabet=True)
    lx_BT, ly_BT, _ = rows(erng, val, 32, 0)
    efirst_BT = first_occurrence(erep_BT)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            logits = model(ex_BT).logits
            ce_BT = F.cross_entropy(logits.flatten(0, 1), ey_BT.flatten(), reduction="none").view_as(ey_BT)
            r = {"copy": ce_BT[erep_BT].mean().item(), "first": ce_BT[efirst_BT].mean().item(),
                 "copy_acc": (logits.argmax(-1) == ey_BT)[erep_BT].float().mean().item(),
                 "lm": F.cross_entropy(model(lx_BT).logits.flatten(0, 1), ly_BT.flatten()).item()}
            ace_BT = F.cross_entropy(model(ax_BT).logits.flatten(0, 1), ay_BT.flatten(),
                                     reduction="none").view_as(ay_BT)
            r["acopy"] = ace_BT[arep_BT].mean().item()
        model.train()
        return {k: round(v, 3) for k, v in r.items()}

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))

    # The trainer's schedule under the demo preset's warmup and floor (linear warmup, cosine to 10%).
    schedule = dataclasses.replace(run_preset("demo").train, steps=a.steps, lr=a.lr, warmup_steps=WARMUP)

    rng = np.random.default_rng(a.seed)
    curve, t0 = {}, time.perf_counter()
    for step in range(a.steps + 1):
        if step % 25 == 0 or step == a.steps:
            curve[step] = evaluate()
            print(step, curve[step], round(time.perf_counter() - t0), flush=True)
        if step == a.steps:
            break
        x_BT, y_BT, _ = rows(rng, train, a.batch, int(round(a.copy * a.batch)), alphabet=a.alphabet and step % 2 == 0)
        loss = model(x_BT, y_BT).loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    last = curve[a.steps]
    emit({"benchmark": "induction-pretrain", "args": vars(a), "curve": curve,
          "copy_gain_at_end": round(last["first"] - last["copy"], 3),
          "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info()}, a.out)


if __name__ == "__main__":
    main()
