"""Hashing throughput: the torch batch path vs a plain numpy implementation, and one decode step.

Measures (issue targets in brackets):
  * batch: ids [64, 4096], 2 Engram layers x 2 orders (N=3) x 8 heads; torch path of
    `NgramHasher.hash` vs numpy written the way the reference writes it (pad-shift per order,
    XOR, `%` per head, stack) [torch >= numpy];
  * incremental: `NgramHasher.hash_step` for one new token, all Engram layers, batch 1 [<= 50 us].

Run: .venv/bin/python benchmarks/bench_hashing.py [--out results.json]
"""

# Legend: B batch, T time, N max n-gram order, K heads per order, H = (N-1)*K.

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engram.hashing import NgramHasher

from common import emit, machine_info, timeit


def numpy_reference_form(h: NgramHasher, ids_BT: np.ndarray) -> dict:
    """The algorithm as the reference writes it: shifted copies of the ids, then per head a mod."""
    B, T = ids_BT.shape
    out = {}
    for layer in h.layer_ids:
        m = h.multipliers[layer]
        shifted = [ids_BT] + [np.pad(ids_BT, ((0, 0), (k, 0)), constant_values=h.pad_id)[:, :T]
                              for k in range(1, h.max_ngram_size)]
        heads = []
        for n in range(2, h.max_ngram_size + 1):
            mix = shifted[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * m[k])
            for p in h.table_sizes[layer][n - 2]:
                heads.append(mix % p)
        out[layer] = np.stack(heads, axis=2)
    return out


def bench_batch(B: int, T: int, repeat: int) -> dict:
    V = 93285  # the compressed Tekken vocabulary
    h = NgramHasher(V, [129280 * 5] * 2, 3, 8, [1, 15], pad_id=1, seed=0)
    ids_BT = np.random.default_rng(0).integers(0, V, (B, T))
    ids_t = torch.from_numpy(ids_BT)
    ref = numpy_reference_form(h, ids_BT)
    got = h.hash(ids_t)
    assert all(np.array_equal(ref[lay], got[lay].numpy()) for lay in h.layer_ids), "torch != numpy"
    t_np = timeit(lambda: numpy_reference_form(h, ids_BT), repeat=repeat)
    t_torch = timeit(lambda: h.hash(ids_t, validate=False), repeat=repeat)
    t_torch_val = timeit(lambda: h.hash(ids_t), repeat=repeat)
    n_tok = B * T
    n_rows = n_tok * len(h.layer_ids) * h.num_heads
    res = {"shape": [B, T], "layers": 2, "orders": 2, "heads_per_order": 8}
    for name, t in [("numpy_reference_form", t_np), ("torch", t_torch), ("torch_validated", t_torch_val)]:
        s = t["median_s"]
        res[name] = {"ms": round(s * 1e3, 2), "Mtokens_per_s": round(n_tok / s / 1e6, 2),
                     "Mrow_ids_per_s": round(n_rows / s / 1e6, 1)}
    res["torch_speedup_vs_numpy"] = round(t_np["median_s"] / t_torch["median_s"], 2)
    res["target_met"] = res["torch_speedup_vs_numpy"] >= 1.0
    return res


def bench_step(iters: int) -> dict:
    V = 93285
    res = {}
    for name, kw in [("reference_default_2_layers", dict(layer_ids=[1, 15])),
                     ("4_layers", dict(layer_ids=[1, 5, 10, 15]))]:
        h = NgramHasher(V, [129280 * 5] * 2, 3, 8, pad_id=1, seed=0, **kw)
        w = h.new_window(1)
        toks = np.random.default_rng(1).integers(0, V, iters)
        for t in toks[:100]:  # warm-up
            h.hash_step(h.push(w, t))
        times = np.empty(iters)
        for i, t in enumerate(toks):
            t0 = time.perf_counter()
            h.hash_step(h.push(w, t))
            times[i] = time.perf_counter() - t0
        res[name] = {"median_us": round(float(np.median(times)) * 1e6, 2),
                     "p99_us": round(float(np.percentile(times, 99)) * 1e6, 2),
                     "target_met": bool(np.median(times) <= 50e-6)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    B, T, repeat, iters = (4, 512, 2, 200) if args.quick else (64, 4096, 7, 20000)
    emit({"benchmark": "hashing", "machine": machine_info(), "batch": bench_batch(B, T, repeat),
          "incremental_step_batch1": bench_step(iters)}, args.out)


if __name__ == "__main__":
    main()
