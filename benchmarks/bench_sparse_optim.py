"""Which optimizer for the Engram tables keeps dense-Adam quality at a flat step time?

Study (default): a small stand-in LM trained on the Python standard library source, identical in
every run (seed, initial weights, batches, step count, backbone AdamW with warmup + cosine) except
the memory table's optimizer:

  dense_adamw          AdamW over the whole table (dense grads, ``sparse=False``): the gold standard
  torch_sparse_adam    ``torch.optim.SparseAdam`` (lazy, global bias correction)
  lazy_row             SparseRowAdam(catch_up="none", bias_correction="row")
  lazy_row_x5          the same at a 5x higher table lr (is lazy Adam just under-stepping?)
  deferred_row         SparseRowAdam(catch_up="deferred")
  ahead_row            SparseRowAdam(catch_up="ahead") -- the default
  ahead_global         SparseRowAdam(catch_up="ahead", bias_correction="global")
  ahead_rowwise        SparseRowAdam(catch_up="ahead", rowwise=True)

Reported per run: validation loss on held-out files, its gap to dense_adamw in nats, ms/step and
the time spent in the table optimizer and in the backbone optimizer.

``--step-time``: optimizer step time on a 1M-row vs a 64M-row table (d=8 fp32 to fit 64M rows
with fp32 m and v in RAM) for the same touched rows (16k tokens x 16 heads), plus torch's
SparseAdam and dense Adam for contrast.

Run:
  .venv/bin/python benchmarks/bench_sparse_optim.py --out optim_study.json       # ~15-20 min
  .venv/bin/python benchmarks/bench_sparse_optim.py --step-time                   # ~1-2 min, 7 GB
  .venv/bin/python benchmarks/bench_sparse_optim.py --quick                       # < 1 min smoke run
"""

# Legend: B batch, T time, D model width, H hash heads, V vocabulary, R table rows, U unique rows.

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.hashing import NgramHasher
from engram.model import Engram
from engram.optim.sparse_adam import SparseRowAdam, clip_grad_norm_
from engram.tokenizer import CompressedVocab

from common import emit, machine_info, timeit

# name -> (table optimizer kind, options, table lr multiplier relative to the 5x of the paper)
VARIANTS: dict[str, tuple[str, dict, float]] = {
    "dense_adamw": ("dense", {}, 1.0),
    "torch_sparse_adam": ("torch_sparse", {}, 1.0),
    "lazy_row": ("sra", {"catch_up": "none", "bias_correction": "row"}, 1.0),
    "lazy_row_x5": ("sra", {"catch_up": "none", "bias_correction": "row"}, 5.0),
    "deferred_row": ("sra", {"catch_up": "deferred", "bias_correction": "row"}, 1.0),
    "ahead_row": ("sra", {"catch_up": "ahead", "bias_correction": "row"}, 1.0),
    "ahead_global": ("sra", {"catch_up": "ahead", "bias_correction": "global"}, 1.0),
    "ahead_rowwise": ("sra", {"catch_up": "ahead", "bias_correction": "row", "rowwise": True}, 1.0),
    # Not in the default list (run with --variants): lr sensitivity and a lazy global-bc control.
    "dense_adamw_x0.2": ("dense", {}, 0.2),
    "ahead_row_x0.2": ("sra", {"catch_up": "ahead", "bias_correction": "row"}, 0.2),
    "lazy_global": ("sra", {"catch_up": "none", "bias_correction": "global"}, 1.0),
    "lazy_row_x2": ("sra", {"catch_up": "none", "bias_correction": "row"}, 2.0),
}
DEFAULT_VARIANTS = ["dense_adamw", "torch_sparse_adam", "lazy_row", "lazy_row_x5", "deferred_row", "ahead_row",
                    "ahead_global", "ahead_rowwise"]


# ---------------------------------------------------------------------------------------------- data
def load_corpus(vocab: CompressedVocab, train_chars: int, val_chars: int) -> dict:
    """Token streams from the standard library source: files i%8==0 train, i%8==4 validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    pools = {"train": files[0::8], "val": files[4::8]}
    budget = {"train": train_chars, "val": val_chars}
    out = {}
    tok = vocab.tokenizer
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    for split, pool in pools.items():
        texts, n = [], 0
        for p in pool:
            try:
                t = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if t.strip():
                texts.append(t)
                n += len(t)
            if n >= budget[split]:
                break
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        stream = np.concatenate([np.asarray([*e, sep], dtype=np.int64) for e in enc])
        out[split] = stream
        out[f"{split}_files"] = len(texts)
    return out


# --------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm causal self-attention + SwiGLU MLP."""

    def __init__(self, d: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(self.norm1(x_BTD)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x_BTD = x_BTD + self.proj(a)
        u, g = self.up(self.norm2(x_BTD)).chunk(2, dim=-1)
        return x_BTD + self.down(F.silu(g) * u)


class StandInLM(nn.Module):
    """Token + position embedding, block 0, the Engram increment, the other blocks, tied head."""

    def __init__(self, V: int, T: int, head_sizes: list[int], *, d: int = 256, n_blocks: int = 2,
                 n_heads: int = 4, sparse: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, d)
        self.pos = nn.Embedding(T, d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, n_heads, 4 * d * 2 // 3) for _ in range(n_blocks))
        self.engram = Engram(d, head_sizes, max_ngram_size=3, n_head_per_ngram=8, n_embed_per_ngram=256,
                             hc_mult=1, sparse=sparse)
        self.norm = nn.RMSNorm(d)

    def forward(self, x_BT: torch.Tensor, rows_BTH: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        T = x_BT.shape[1]
        h = self.tok(x_BT) + self.pos.weight[:T]
        h = self.blocks[0](h)
        h = h + self.engram(h, rows_BTH)
        for blk in self.blocks[1:]:
            h = blk(h)
        logits = self.norm(h) @ self.tok.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y_BT.reshape(-1))


def lr_at(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine to ``min_ratio`` (a multiplier of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


# ---------------------------------------------------------------------------------------------- study
def prepare(args) -> dict:
    vocab = CompressedVocab.from_pretrained("mistral-sp")
    corpus = load_corpus(vocab, args.train_chars, args.val_chars)
    train, val = corpus["train"], corpus["val"]
    # The head covers only token ids that occur in this corpus (13k of 32,768): same model for
    # this data, 2.5x cheaper logits. Hashing uses the original ids (compressed), as in Engram.
    used = np.unique(np.concatenate([train, val]))
    remap = np.zeros(vocab.original_size, dtype=np.int64)
    remap[used] = np.arange(len(used))
    hasher = NgramHasher(len(vocab), [args.rows_per_head] * 2, 3, 8, [0], pad_id=int(vocab.lookup[0]), seed=0)
    B, T = args.batch, args.seq
    g = np.random.default_rng(args.seed)
    n_train = args.steps
    starts = g.integers(0, len(train) - T - 1, size=(n_train, B))
    n_val = min(args.val_batches * B, (len(val) - 1) // T)
    val_starts = np.arange(n_val) * T

    def make(stream, st):
        idx = st[:, None] + np.arange(T + 1)
        tok = torch.from_numpy(stream[idx])
        comp = torch.from_numpy(np.asarray(vocab(tok[:, :-1].numpy()), dtype=np.int64))
        rows = hasher.hash(comp)[0]
        return torch.from_numpy(remap[tok[:, :-1].numpy()]), rows, torch.from_numpy(remap[tok[:, 1:].numpy()])

    batches = [make(train, s) for s in starts]
    val_b = [make(val, val_starts[i:i + B]) for i in range(0, n_val, B)]
    head_sizes = hasher.head_sizes(0)
    # How often rows are touched: the tail that lazy Adam under-steps.
    counts = torch.zeros(sum(head_sizes), dtype=torch.int64)
    offsets = torch.tensor([0, *np.cumsum(head_sizes)[:-1].tolist()])
    for _, rows, _ in batches:
        counts += torch.bincount((rows + offsets).reshape(-1), minlength=counts.numel())
    touched = counts[counts > 0].double()
    lookups = float(counts.sum())
    val_rows = torch.cat([(r + offsets).reshape(-1) for _, r, _ in val_b])
    val_counts = counts[val_rows]
    touch_stats = {
        "table_rows": counts.numel(), "rows_touched": int(touched.numel()),
        "rows_touched_frac": round(touched.numel() / counts.numel(), 4),
        "touches_per_touched_row_median": float(touched.median()),
        "rows_touched_once_frac": round(float((touched == 1).double().mean()), 4),
        "lookups_on_rows_touched_le_8_times_frac": round(float(touched[touched <= 8].sum()) / lookups, 4),
        "val_lookups_on_rows_seen_in_train_frac": round(float((val_counts > 0).double().mean()), 4),
        "val_lookups_on_rows_seen_1_to_8_times_frac": round(float(((val_counts > 0) & (val_counts <= 8))
                                                                   .double().mean()), 4),
    }
    return {"batches": batches, "val": val_b, "V": len(used), "head_sizes": head_sizes,
            "corpus": {"train_tokens": int(len(train)), "val_tokens_used": int(n_val * T),
                       "train_files": corpus["train_files"], "val_files": corpus["val_files"],
                       "vocab_used": int(len(used)), "compressed_vocab": len(vocab)},
            "touch_stats": touch_stats}


def time_variants(names: list[str], data: dict, args) -> dict:
    """ms/step per variant from short runs, two rounds in alternating order (other load hits all alike)."""
    raw: dict = {v: {} for v in names}
    for rnd in range(2):
        for v in (names if rnd == 0 else names[::-1]):
            r = run_variant(v, data, args, n_steps=args.timing, do_eval=False)
            for k, ts in r["raw_times"].items():
                raw[v].setdefault(k, []).extend(ts)
            print(f"round {rnd} {v:22s} {1000 * float(np.median(r['raw_times']['step'])):.0f} ms/step", flush=True)
    out = {}
    for v, parts in raw.items():
        out[v] = {f"{k}_ms": round(1000 * float(np.median(ts)), 1) for k, ts in parts.items()}
        out[v]["table_opt_share"] = round(out[v]["table_opt_ms"] / out[v]["step_ms"], 3)
    return out


def make_table_opt(kind: str, opts: dict, table: nn.Parameter, lr: float, betas):
    if kind == "dense":
        return torch.optim.AdamW([table], lr=lr, betas=betas, weight_decay=0.0, fused=True)
    if kind == "torch_sparse":
        return torch.optim.SparseAdam([table], lr=lr, betas=betas)
    return SparseRowAdam([table], lr=lr, betas=betas, weight_decay=0.0, **opts)


@torch.no_grad()
def evaluate(model, val_b, autocast) -> float:
    model.eval()
    tot, n = 0.0, 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for x, rows, y in val_b:
            tot += float(model(x, rows, y)) * y.numel()
            n += y.numel()
    model.train()
    return tot / n


def run_variant(name: str, data: dict, args, n_steps: int | None = None, do_eval: bool = True) -> dict:
    """Train one variant from the shared seed on the shared batches; `n_steps` cuts the run short (timing)."""
    kind, opts, mult = VARIANTS[name]
    torch.manual_seed(args.seed)
    model = StandInLM(data["V"], args.seq, data["head_sizes"], n_blocks=args.blocks, sparse=kind != "dense")
    table = model.engram.table.weight
    betas = (0.9, args.beta2)
    decay, no_decay = [], []
    for p in model.parameters():
        if p is not table:
            (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=betas, fused=True)
    table_lr = args.lr * args.table_lr_mult * mult
    topt = make_table_opt(kind, opts, table, table_lr, betas)
    params = list(model.parameters())
    t_fb, t_opt, t_topt, t_step, losses, curve = [], [], [], [], [], []
    eval_at = {int(args.steps * f) for f in (0.25, 0.5, 0.75)}
    for step, (x, rows, y) in enumerate(data["batches"][:n_steps]):
        f = lr_at(step, args.steps, args.warmup)
        for g in opt.param_groups:
            g["lr"] = args.lr * f
        for g in topt.param_groups:
            g["lr"] = table_lr * f
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            loss = model(x, rows, y)
        loss.backward()
        clip_grad_norm_(params, 1.0)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        topt.step()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        t_fb.append(t1 - t0)
        t_opt.append(t2 - t1)
        t_topt.append(t3 - t2)
        t_step.append(t4 - t0)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if do_eval and step + 1 in eval_at:
            curve.append({"step": step + 1, "val_loss": round(evaluate(model, data["val"], args.autocast), 4)})
    val = evaluate(model, data["val"], args.autocast) if do_eval else float("nan")
    curve.append({"step": len(losses), "val_loss": round(val, 4)})
    skip = min(5, len(t_step) // 4)  # warm-up steps (allocation of optimizer state, caches)

    def ms(ts):
        return round(1000 * float(np.median(ts[skip:])), 1)

    raw = {"step": t_step[skip:], "fwd_bwd_clip": t_fb[skip:], "backbone_opt": t_opt[skip:],
           "table_opt": t_topt[skip:]}
    return {"raw_times": raw, "name": name, "table_optimizer": kind, "options": opts, "table_lr": table_lr,
            "val_loss": round(val, 4), "train_loss_last10": round(float(np.mean(losses[-10:])), 4),
            "ms_per_step": ms(t_step), "fwd_bwd_clip_ms": ms(t_fb), "backbone_opt_ms": ms(t_opt),
            "table_opt_ms": ms(t_topt), "table_opt_share": round(ms(t_topt) / ms(t_step), 3), "curve": curve}


# --------------------------------------------------------------------------------------- impulse response
def impulse_response(betas: tuple[float, float], first_touch: int = 1000, after: int = 300) -> dict:
    """How far (in units of lr) one gradient of +1 moves a row first touched at step `first_touch`.

    Other rows are touched every step (so the global step advances); the row is never touched
    again. "now" is the move on the touching step, "settled" after `after` more steps.
    """
    lr = 1e-3
    makers = {
        "dense Adam": lambda p: torch.optim.Adam([p], lr=lr, betas=betas),
        "torch SparseAdam": lambda p: torch.optim.SparseAdam([p], lr=lr, betas=betas),
        "lazy, global bc": lambda p: SparseRowAdam([p], lr=lr, betas=betas, catch_up="none", bias_correction="global"),
        "lazy, row bc": lambda p: SparseRowAdam([p], lr=lr, betas=betas, catch_up="none"),
        "deferred, row bc": lambda p: SparseRowAdam([p], lr=lr, betas=betas, catch_up="deferred"),
        "ahead, global bc": lambda p: SparseRowAdam([p], lr=lr, betas=betas, bias_correction="global"),
        "ahead, row bc (default)": lambda p: SparseRowAdam([p], lr=lr, betas=betas),
    }
    out = {}
    for name, make in makers.items():
        p = nn.Parameter(torch.zeros(2, 1))
        opt = make(p)
        dense = name == "dense Adam"
        for step in range(1, first_touch + after + 1):
            rows = [0, 1] if step == first_touch else [0]
            g = torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(len(rows), 1), (2, 1))
            p.grad = g.to_dense() if dense else g
            opt.step()
            if step == first_touch:
                now = -float(p.detach()[1, 0]) / lr
        out[name] = {"now": round(now, 3), "settled": round(-float(p.detach()[1, 0]) / lr, 3)}
    b1, b2 = betas
    r = b1 / math.sqrt(b2)
    out["formula dense: (1-b1)/sqrt(1-b2)/(1-b1/sqrt(b2))"] = round((1 - b1) / math.sqrt(1 - b2) / (1 - r), 3)
    return out


# ------------------------------------------------------------------------------------------ step time
def bench_step_time(rows_small: int, rows_big: int, d: int, tokens: int, heads: int, repeat: int) -> dict:
    """Time of one table-optimizer step (coalesce + update) at two table sizes, same touched rows.

    Each size gets the same four sparse gradients up to a relabelling of rows (the same number of
    lookups, duplicates and unique rows; the unique rows spread at random over the whole table).
    Timings alternate between the two sizes so that load from other processes hits both alike.
    """
    n = tokens * heads
    g = torch.Generator().manual_seed(0)
    # Zipf-like row popularity (hashed n-grams): lookups land on ~45% distinct rows.
    pool = n
    probs = 1.0 / torch.arange(1, pool + 1, dtype=torch.float64) ** 0.8
    slots = [torch.multinomial(probs, n, replacement=True, generator=g) for _ in range(4)]
    vals = torch.randn(n, d, generator=g)
    grads = {}
    for R in (rows_small, rows_big):
        grads[R] = []
        for i in range(4):
            ids = torch.randperm(R, generator=g)[:pool]
            grads[R].append(torch.sparse_coo_tensor(ids[slots[i]].unsqueeze(0), vals, (R, d)))
    out = {"tokens": tokens, "heads": heads, "lookups": n, "dim": d, "dtype": "float32",
           "unique_rows_per_step": int(grads[rows_small][0].coalesce()._nnz()), "ms_per_step": {}}
    cfgs = {
        "sparse_row_adam (default: ahead, row)": lambda p: SparseRowAdam([p], lr=1e-3, betas=(0.9, 0.95)),
        "sparse_row_adam rowwise": lambda p: SparseRowAdam([p], lr=1e-3, betas=(0.9, 0.95), rowwise=True),
        "sparse_row_adam lazy (catch_up=none)": lambda p: SparseRowAdam([p], lr=1e-3, betas=(0.9, 0.95),
                                                                         catch_up="none"),
        "torch.optim.SparseAdam": lambda p: torch.optim.SparseAdam([p], lr=1e-3, betas=(0.9, 0.95)),
        "dense AdamW (fused)": None,
    }
    weights = {R: nn.Parameter(torch.randn(R, d, generator=g)) for R in (rows_small, rows_big)}
    for cname, make in cfgs.items():
        sizes = (rows_small,) if make is None else (rows_small, rows_big)
        opts, fns, times = {}, {}, {R: [] for R in sizes}
        for R in sizes:
            w = weights[R]
            if make is None:
                opts[R] = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
                dense = [gr.coalesce().to_dense() for gr in grads[R]]
            else:
                opts[R] = make(w)
                dense = grads[R]

            def four_steps(w=w, o=opts[R], gs=dense):
                for gr in gs:
                    w.grad = gr
                    o.step()

            fns[R] = four_steps
            for _ in range(3):  # allocate the state and fault its pages in
                four_steps()
        for _ in range(repeat):
            for R in sizes:
                times[R].append(timeit(fns[R], repeat=1, warmup=0)["median_s"] / 4)
        out["ms_per_step"][cname] = {str(R): round(1000 * float(np.median(times[R])), 2) for R in sizes}
        if len(sizes) == 2:
            out["ms_per_step"][cname]["ratio_big_over_small"] = round(
                float(np.median(times[rows_big]) / np.median(times[rows_small])), 3)
        for R in sizes:
            opts[R].state.clear()
        del opts, fns
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="< 1 min smoke run (tiny model and table)")
    ap.add_argument("--step-time", action="store_true", help="only the 1M- vs 64M-row optimizer micro-benchmark")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rows-per-head", type=int, default=131072, help="16 heads x d=32: 131072 -> 67M params")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--table-lr-mult", type=float, default=5.0, help="the paper's 5x for the tables")
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--train-chars", type=int, default=4_000_000)
    ap.add_argument("--val-chars", type=int, default=400_000)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--no-autocast", dest="autocast", action="store_false", help="fp32 instead of bf16 autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--big-rows", type=int, default=64 * 2**20)
    ap.add_argument("--impulse", action="store_true", help="only the one-touch impulse response (seconds)")
    ap.add_argument("--timing", type=int, default=0, metavar="N",
                    help="only time the variants: N steps each, two rounds in alternating order, no evaluation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_time:
        big = args.big_rows if not args.quick else 4 * 2**20
        res = bench_step_time(2**20, big, d=8, tokens=16384, heads=16, repeat=3 if args.quick else 15)
        emit({"benchmark": "sparse_optim_step_time", "machine": machine_info(), **res}, args.out)
        return
    if args.quick:
        args.steps, args.batch, args.seq, args.rows_per_head = 12, 4, 64, 4099
        args.train_chars, args.val_chars, args.val_batches, args.warmup = 60_000, 20_000, 2, 3
        if args.variants == ",".join(DEFAULT_VARIANTS):
            args.variants = "dense_adamw,torch_sparse_adam,ahead_row"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    impulse = {f"betas=(0.9, {b2})": impulse_response((0.9, b2)) for b2 in (0.95, 0.999)}
    if args.impulse:
        emit({"benchmark": "sparse_optim_impulse_response", "machine": machine_info(), "impulse_response": impulse},
             args.out)
        return
    t0 = time.perf_counter()
    data = prepare(args)
    prep_s = time.perf_counter() - t0
    if args.timing:
        emit({"benchmark": "sparse_optim_step_times", "machine": machine_info(),
              "config": {"steps_per_round": args.timing, "rounds": 2, "threads": torch.get_num_threads(),
                         "batch": args.batch, "seq": args.seq, "table_params": sum(data["head_sizes"]) * 32},
              "variants": time_variants(names, data, args)}, args.out)
        return
    results = []
    for v in names:
        r = run_variant(v, data, args)
        r.pop("raw_times")
        results.append(r)
        print(f"{v:22s} val {r['val_loss']:.4f}  {r['ms_per_step']:.0f} ms/step  table opt {r['table_opt_ms']:.1f} ms",
              flush=True)
    ref = next((r["val_loss"] for r in results if r["name"] == "dense_adamw"), None)
    for r in results:
        r["gap_vs_dense"] = None if ref is None else round(r["val_loss"] - ref, 4)
    cfg = {k: getattr(args, k) for k in ("steps", "batch", "seq", "blocks", "rows_per_head", "lr", "table_lr_mult",
                                         "beta2", "warmup", "autocast", "seed")}
    cfg["table_params"] = sum(data["head_sizes"]) * 32
    cfg["tokens_trained"] = args.steps * args.batch * args.seq
    emit({"benchmark": "sparse_optim_study", "machine": machine_info(), "config": cfg, "corpus": data["corpus"],
          "touch_stats": data["touch_stats"], "impulse_response_lr_units": impulse, "prepare_s": round(prep_s, 1),
          "total_s": round(time.perf_counter() - t0, 1), "variants": results}, args.out)


if __name__ == "__main__":
    main()
