"""How skewed are Engram's row accesses? Coverage of the top rows, and cache hit rate vs cache size.

The paper motivates a host/SSD tier with a Zipfian access pattern but measures nothing; this
script measures it on real text (the Python standard library corpus, local BPE 8192, train and
validation split by file) with Engram's own compression and hashing:

  * rank-frequency of row accesses and a least-squares Zipf exponent over ranks 10..10^5;
  * coverage: the share of lookups that hit the top x% of rows, in-sample (train counts on
    train) and out-of-sample (rows ranked by train counts, lookups counted on validation);
  * hit rate vs cache size (0.1% .. 20% of the table) for LRU, LFU and static-hot (ranked by the
    train profile), replaying the validation stream through the real `CachedStore` bookkeeping,
    one request per sequence of `--seq` tokens (a prefill chunk).

Run: .venv/bin/python benchmarks/bench_access.py [--quick] [--out access.json] [--plot access.png]
"""

# Legend: B sequences per request, T tokens, H hash heads; rows are flat ids (per-head ids + head offsets).

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.store.cache import POLICIES
from engram.store.profiling import access_profile, coverage_curve, simulate_hit_rate
from engram.tokenizer import CompressedVocab

from common import emit, machine_info

FRACTIONS = [0.001, 0.01, 0.05, 0.10, 0.20, 0.50]
CACHE_FRACTIONS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.10, 0.20]


def flat_rows(hasher: NgramHasher, vocab: CompressedVocab, tokens: np.ndarray, layer: int, seq: int,
              chunk_seqs: int = 256):
    """Yield flat row ids [B, T, H] for consecutive sequences of `seq` tokens (stream order)."""
    sizes = np.asarray(hasher.head_sizes(layer), dtype=np.int64)
    offsets_H = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    n = len(tokens) // seq
    for s in range(0, n, chunk_seqs):
        ids_BT = np.asarray(tokens[s * seq:min(n, s + chunk_seqs) * seq], dtype=np.int64).reshape(-1, seq)
        comp_BT = torch.from_numpy(vocab.lookup[ids_BT])
        rows_BTH = hasher.hash(comp_BT, validate=False)[layer]
        yield rows_BTH + offsets_H


def zipf_exponent(counts: np.ndarray, lo: int = 10, hi: int = 100_000) -> float | None:
    """Slope of log(frequency) vs log(rank) over ranks lo..hi (a Zipf law has slope -s)."""
    f = np.sort(counts[counts > 0])[::-1].astype(np.float64)
    hi = min(hi, len(f))
    if hi - lo < 10:
        return None
    r = np.arange(lo, hi + 1)
    slope = np.polyfit(np.log(r), np.log(f[lo - 1:hi]), 1)[0]
    return round(float(-slope), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small table and a slice of the corpus (smoke test)")
    ap.add_argument("--rows-per-head", type=int, default=1_000_003, help="table rows per hash head (before primes)")
    ap.add_argument("--heads", type=int, default=8, help="hash heads per n-gram order")
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256, help="tokens per cache request")
    ap.add_argument("--out")
    ap.add_argument("--plot", help="write the coverage and hit-rate curves to this PNG")
    args = ap.parse_args()
    from engram.data import prepare_data

    t0 = time.perf_counter()
    data = prepare_data(progress=False)
    vocab = CompressedVocab.from_pretrained(data.tokenizer_spec)
    train, val = np.asarray(data.train), np.asarray(data.val)
    rows_per_head = 20_011 if args.quick else args.rows_per_head
    if args.quick:
        train, val = train[:200_000], val[:50_000]
    orders = args.max_ngram - 1
    cfg = EngramConfig(engram_vocab_size=[rows_per_head] * orders, max_ngram_size=args.max_ngram,
                       n_embed_per_ngram=args.heads * 32, n_head_per_ngram=args.heads, layer_ids=[1])
    hasher = NgramHasher.from_config(cfg, vocab)
    R = int(sum(hasher.head_sizes(1)))
    train_counts = access_profile(flat_rows(hasher, vocab, train, 1, args.seq), R)
    val_counts = access_profile(flat_rows(hasher, vocab, val, 1, args.seq), R)
    t_profile = time.perf_counter() - t0

    # Out-of-sample coverage: rank rows by train counts, count validation lookups on the top k.
    order = np.argsort(-train_counts, kind="stable")
    cum_val = np.concatenate([[0], np.cumsum(val_counts[order], dtype=np.float64)])
    oos = [round(float(cum_val[int(round(f * R))] / cum_val[-1]), 4) for f in FRACTIONS]
    res = {
        "benchmark": "access_distribution", "machine": machine_info(),
        "corpus": {"source": "python stdlib", "tokenizer": "local BPE", "vocab": data.vocab_size,
                   "compressed_vocab": len(vocab), "train_tokens": int(len(train)), "val_tokens": int(len(val))},
        "table": {"rows": R, "heads": len(hasher.head_sizes(1)), "orders": list(range(2, args.max_ngram + 1)),
                  "rows_per_head": rows_per_head},
        "lookups": {"train": int(train_counts.sum()), "val": int(val_counts.sum())},
        "rows_touched_frac": {"train": round(float((train_counts > 0).mean()), 4),
                              "val": round(float((val_counts > 0).mean()), 4)},
        "zipf_exponent_train": zipf_exponent(train_counts),
        "coverage_top_fraction": [f"{f:.1%}" for f in FRACTIONS],
        "coverage_in_sample_train": [round(float(x), 4) for x in coverage_curve(train_counts, FRACTIONS)],
        "coverage_val_ranked_by_train": oos,
        "val_lookups_on_rows_unseen_in_train": round(float(val_counts[train_counts == 0].sum() / val_counts.sum()), 4),
    }

    # Hit rate vs cache size on the validation stream, each policy through the real CachedStore bookkeeping.
    val_requests = list(flat_rows(hasher, vocab, val, 1, args.seq, chunk_seqs=1))
    hit = {p: [] for p in POLICIES}
    t1 = time.perf_counter()
    for frac in CACHE_FRACTIONS:
        cap = max(1, int(frac * R))
        for p in POLICIES:
            r = simulate_hit_rate(iter(val_requests), R, cap, p, profile=train_counts if p == "static" else None)
            hit[p].append({"cache_frac": frac, "capacity_rows": cap, "hit_rate": round(r["hit_rate"], 4),
                           "lookup_hit_rate": round(r["lookup_hit_rate"], 4)})
    res["hit_rate_requests"] = {"count": len(val_requests), "tokens_per_request": args.seq,
                                "rows_per_request": args.seq * len(hasher.head_sizes(1)),
                                "hit_rate": "hits / distinct rows per request (reads the backing store is spared)",
                                "lookup_hit_rate": "(lookups - misses) / lookups"}
    res["hit_rate_vs_cache"] = hit
    res["seconds"] = {"profile": round(t_profile, 1), "simulate": round(time.perf_counter() - t1, 1)}
    if args.plot:
        plot(res, train_counts, args.plot)
        res["plot"] = args.plot
    emit(res, args.out)


def plot(res: dict, counts: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    f = np.sort(counts[counts > 0])[::-1]
    ax[0].loglog(np.arange(1, len(f) + 1), f)
    ax[0].set(title=f"rank-frequency of rows (Zipf s~{res['zipf_exponent_train']})", xlabel="rank",
              ylabel="lookups (train)")
    x = [100 * v for v in [0.001, 0.01, 0.05, 0.10, 0.20, 0.50]]
    ax[1].plot(x, res["coverage_in_sample_train"], "o-", label="train, in-sample")
    ax[1].plot(x, res["coverage_val_ranked_by_train"], "s-", label="val, rows ranked on train")
    ax[1].set(xscale="log", title="share of lookups on the top x% of rows", xlabel="top x% of rows",
              ylabel="share of lookups", ylim=(0, 1))
    ax[1].legend()
    for p, pts in res["hit_rate_vs_cache"].items():
        ax[2].plot([100 * q["cache_frac"] for q in pts], [q["lookup_hit_rate"] for q in pts], "o-", label=p)
    ax[2].set(xscale="log", title="cache hit rate on validation lookups", xlabel="cache size, % of table rows",
              ylabel="lookup hit rate", ylim=(0, 1))
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
