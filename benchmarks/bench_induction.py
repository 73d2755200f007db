"""How fast the backbone learns to copy from its context (the induction circuit retrieval needs), by init.

The demo models score 0 on every in-context probe, and fine-tunes on RULER-style tasks do not grow the
circuit within their budget. This isolates the backbone: fresh 2-layer models of this package's
architecture (RoPE, RMSNorm, SwiGLU) learn the copy task below from scratch, with the embedding init as
the variable, next to a plain PyTorch ``nn.TransformerEncoder`` (learned positions, N(0, 1)
embeddings) as the control. More variants move one step at a time towards the demo models: the same
2-layer model with the demo's 8192-token vocabulary (the task still uses 64 of its tokens), with its head
then cut to the task's ids or given a logit bias (from zero, or holding the unused ids down), and the
demo preset's MoE architecture trained fresh at either init. With ``--model DIR`` a trained model learns
the same task from its weights. ``--variants WORD...`` runs only the variants whose name contains a word.

Task: each row is a span of 8..30 distinct tokens drawn from a 64-token alphabet, then the span again,
right-padded to 64 positions; the loss is on the repeat (its second token on), so only copying predicts
it, and the span length varies so no fixed-offset head can (1.0 nats is well below the ln(64) = 4.16 of
guessing). Reported per run: the loss every 50 steps and the first logged step below 1.0 nats.

Run: .venv/bin/python benchmarks/bench_induction.py [--steps 300] [--seeds 0 1] [--model DIR] [--out F.json]
"""

# Legend: B batch rows, T positions, V alphabet (+1 pad), D width.

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.config import ModelConfig
from engram.model import EngramLM

from common import emit, machine_info

V, T, D, BATCH, LR = 64, 64, 256, 16, 1e-3


def batch(rng, alphabet: np.ndarray, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    x_BT = torch.full((BATCH, T), pad, dtype=torch.int64)
    y_BT = torch.full((BATCH, T), -100, dtype=torch.int64)
    for b in range(BATCH):
        k = int(rng.integers(8, 31))
        span = torch.from_numpy(rng.choice(alphabet, k, replace=False).astype(np.int64))
        x_BT[b, :2 * k] = torch.cat([span, span])
        y_BT[b, k:2 * k - 1] = span[1:]
    return x_BT, y_BT


class Reference(nn.Module):
    """The control: PyTorch's own pre-norm encoder layers under a causal mask, default inits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(V + 1, D), nn.Embedding(T, D)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(2))
        self.out = nn.Linear(D, V + 1)

    def forward(self, x_BT, y_BT):
        h_BTD = self.emb(x_BT) + self.pos(torch.arange(x_BT.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(x_BT.shape[1])
        for layer in self.layers:
            h_BTD = layer(h_BTD, src_mask=mask, is_causal=True)
        return F.cross_entropy(self.out(h_BTD).flatten(0, 1), y_BT.flatten(), ignore_index=-100)


def ours(tied: bool, emb_std: float | None, vocab: int = V + 1, head: str = "full") -> EngramLM:
    """``head``: "full" (a row per vocabulary id), "cut" (the untied head's first V + 1 rows only: the ids the
    task uses, the same draws), "bias" (the full head plus a learned logit bias, zero at the start) or "held"
    (that bias starting at -20 on the ids the task never uses, so they start held down)."""
    m = EngramLM(ModelConfig(vocab_size=vocab, d_model=D, n_layers=2, n_heads=4, mlp_hidden=3 * D,
                             max_seq_len=256, tie_embeddings=tied))
    # The same init as model.embed_init_std, drawn again after the package's N(0, 0.02) one (as for the recorded
    # figures), so the other weights are the same draws in every variant.
    if emb_std is not None:
        nn.init.normal_(m.tok_emb.weight, 0.0, emb_std)
    if head != "full":
        rows = V + 1 if head == "cut" else vocab
        lin = nn.Linear(D, rows, bias=head in ("bias", "held"))
        with torch.no_grad():
            lin.weight.copy_(m.lm_head.weight[:rows])
            if lin.bias is not None:
                lin.bias.zero_()
                if head == "held":
                    lin.bias[V + 1:] = -20.0
        m.lm_head = lin
        m.cfg = dataclasses.replace(m.cfg, vocab_size=rows)
    return m


def demo_moe(tied: bool, emb_std: float) -> EngramLM:
    """The demo preset's MoE baseline (4 layers, 32 routed experts, 8192-token vocabulary), fresh."""
    from engram.train.config import run_preset

    cfg = dataclasses.replace(run_preset("demo").model, engram=None, tie_embeddings=tied, embed_init_std=emb_std)
    return EngramLM(cfg)


VARIANTS = {
    "ours: tied, N(0, 0.02) (the package's init)": lambda: ours(True, None),
    "ours: untied, N(0, 0.02)": lambda: ours(False, None),
    "ours: untied, N(0, 0.1)": lambda: ours(False, 0.1),
    "control: nn.TransformerEncoder, N(0, 1)": Reference,
    # The same 64-token task in the demo's 8192-token vocabulary: the plateau before copying lasts longer.
    "ours: untied, N(0, 0.1), vocabulary 8192": lambda: ours(False, 0.1, vocab=8192),
    # The same model with its head cut to the task's ids copies like the small vocabulary: the head's size is
    # what lengthens the plateau. A logit bias (which could hold the unused ids down alone) does not shorten it
    # when it starts at zero, and does when it starts holding them down: the plateau is what the first steps,
    # spent pushing the unused ids down, leave behind.
    "ours: untied, N(0, 0.1), vocabulary 8192, head cut to the task's ids": lambda: ours(False, 0.1, 8192, "cut"),
    "ours: untied, N(0, 0.1), vocabulary 8192, with a logit bias": lambda: ours(False, 0.1, 8192, "bias"),
    "ours: untied, N(0, 0.1), vocabulary 8192, unused ids held down from the start": lambda: ours(False, 0.1, 8192,
                                                                                                 "held"),
    "demo MoE architecture, fresh: tied, N(0, 0.02)": lambda: demo_moe(True, 0.02),
    "demo MoE architecture, fresh: untied, N(0, 0.1)": lambda: demo_moe(False, 0.1),
}


def run(model, steps: int, seed: int, alphabet: np.ndarray, pad: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    curve, t0 = {}, time.perf_counter()
    for step in range(steps + 1):
        x_BT, y_BT = batch(rng, alphabet, pad)
        out = model(x_BT, y_BT)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        if step % 50 == 0:
            curve[step] = round(loss.item(), 3)
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    below = [s for s, v in curve.items() if v < 1.0]
    return {"loss": curve, "first_step_below_1": below[0] if below else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--model", help="also: a trained model directory learning the task from its weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", metavar="WORD",
                    help="run only the variants whose name contains one of these words (default: all)")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    for name, make in VARIANTS.items():
        if a.variants and not any(w in name for w in a.variants):
            continue
        results[name] = {}
        for seed in a.seeds:
            torch.manual_seed(seed)
            results[name][seed] = run(make(), a.steps, seed, np.arange(V), V)
            print(name, seed, results[name][seed], flush=True)
    if a.model:
        # The trained model's alphabet: 64 token ids drawn once, away from the special ids at the start.
        name = f"trained: {a.model}"
        results[name] = {}
        for seed in a.seeds:
            model = EngramLM.from_pretrained(a.model).train()
            ids = np.random.default_rng(seed).choice(np.arange(16, model.cfg.vocab_size), V + 1, replace=False)
            results[name][seed] = run(model, a.steps, seed, ids[:V], int(ids[V]))
            print(name, seed, results[name][seed], flush=True)
    emit({"benchmark": "induction", "task": f"copy a span of 8-30 distinct tokens of a {V}-token alphabet",
          "steps": a.steps, "batch": BATCH, "lr": LR, "optimizer": "AdamW, no weight decay",
          "threads": a.threads, "results": results, "machine": machine_info()}, a.out)


if __name__ == "__main__":
    main()
