"""What checking every row read against its CRC32C costs offloaded inference: paired, in one process.

Model: the offload benchmark's (`bench_offload.config`: one Engram layer at layer 1, orders 2-3, 8
heads each, d=64 fp32 = 256-byte rows), backbone d=512 x 12 layers by default, random weights. The
table is kept small with `--rows-per-head` (the check's cost is per row *read*, not per row stored).
The same store directory is opened twice, `DiskStore(verify_reads=True)` (what serving does) and
`verify_reads=False` (unchecked, kept only for this measurement), each behind its own static-hot
cache of `--cache-frac` of the table ranked on train-split tokens, direct reads (`--io`), prefetch on.
Both serve through one backbone (the all-in-RAM model's), so a pair differs only in the check.

Timing is paired: every prefill batch (8 x 256 held-out tokens, one `OffloadedLM.forward`) and every
decode step (4 held-out sequences, one given token each with the KV cache) runs on both back to back,
order alternating, over `--rounds` passes. `prefill_on_vs_off` / `decode_on_vs_off`: the median of
per-pair time ratios (checked / unchecked; 1.01 = 1% slower) with a bootstrap 95% interval, and the
ratio of total times over the same pairs. Both must give the all-in-RAM model's losses and logits
bit for bit. Also reported: the rows the disk tier checked per batch, the CRC32C kernel's throughput,
a full `engram verify` scan, and what the weights-identity check costs when a store is opened.

Run: python benchmarks/bench_verify.py --dir DIR [--quick] [--out FILE.json]
"""

# Legend: B batch, T time, R table rows.

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engram.model import EngramLM
from engram.tokenizer import CompressedVocab

from bench_offload import batches_of, config
from common import _resample_idx, emit, machine_info


def ratio_ci(pairs, seed: int = 0, resamples: int = 4000) -> dict:
    """Median of per-pair ratios a/b and total(a)/total(b), each with a bootstrap 95% interval (4 decimals)."""
    t = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    r = t[:, 0] / t[:, 1]
    idx = _resample_idx(len(r), seed, resamples, None)
    med, tot = np.median(r[idx], axis=1), t[idx, 0].sum(axis=1) / t[idx, 1].sum(axis=1)
    q = lambda b: [round(float(np.quantile(b, 0.025)), 4), round(float(np.quantile(b, 0.975)), 4)]  # noqa: E731
    return {"median": round(float(np.median(r)), 4), "median_ci95": q(med),
            "total": round(float(t[:, 0].sum() / t[:, 1].sum()), 4), "total_ci95": q(tot), "pairs": len(r)}


def open_offloaded(model, store_dir: Path, verify_reads: bool, io: str, cache_bytes: int, profile: dict):
    from engram.serve import OffloadedLM, read_manifest
    from engram.store.cache import CachedStore
    from engram.store.disk import DiskStore

    m = read_manifest(store_dir)
    stores, backing = {}, []
    for lay, spec in m["layers"].items():
        disk = DiskStore(store_dir / spec["file"], io=io, verify_reads=verify_reads)
        backing.append(disk)
        stores[int(lay)] = CachedStore(disk, cache_bytes, "static", profile=profile[int(lay)])
    lm = OffloadedLM(model, stores)
    lm._also_close = backing
    lm.reset_stats()
    return lm


def paired(lms: dict, batches, text, flip: int) -> dict:
    """One pass: every batch and decode step on both (order alternating); seconds per pair as (on, off)."""
    pre, dec, cpu, losses = [], [], [], {k: [] for k in lms}
    for i, (x, y) in enumerate(batches):
        t, c = {}, {}
        for k in (("on", "off") if (i + flip) % 2 == 0 else ("off", "on")):
            c0, t0 = lms[k].prefetcher.cpu_seconds, time.perf_counter()
            losses[k].append(float(lms[k](x, y).loss))
            t[k], c[k] = time.perf_counter() - t0, lms[k].prefetcher.cpu_seconds - c0
        pre.append((t["on"], t["off"]))
        cpu.append((c["on"], c["off"]))
    P = 64
    states = {k: lm.model.new_decode_state(text.shape[0], max_len=text.shape[1]) for k, lm in lms.items()}
    logits = {k: [lm(text[:, :P], cache=states[k]).logits] for k, lm in lms.items()}
    for i in range(P, text.shape[1]):
        t = {}
        for k in (("on", "off") if (i + flip) % 2 == 0 else ("off", "on")):
            t0 = time.perf_counter()
            logits[k].append(lms[k](text[:, i:i + 1], cache=states[k]).logits)
            t[k] = time.perf_counter() - t0
        dec.append((t["on"], t["off"]))
    return {"prefill": pre, "decode": dec, "fetch_cpu": cpu, "losses": losses, "logits": logits}


def fetch_pairs(lms: dict, batches, flip: int) -> list[tuple[float, float]]:
    """Each batch's rows gathered from the stores in the calling thread, checked and unchecked back to back
    (order alternating): seconds per pair as (on, off). Without the forward around it, the difference is
    the check's own cost, not lost in the noise of a second-long batch."""
    model = lms["on"].model
    out = []
    for i, (x, _) in enumerate(batches):
        rows = {lay: lms["on"].memory.flat_rows(lay, r).reshape(-1) for lay, r in model.engram_rows(x).items()}
        t = {}
        for k in (("on", "off") if (i + flip) % 2 == 0 else ("off", "on")):
            t0 = time.perf_counter()
            for lay, r in rows.items():
                lms[k].stores[lay].gather(r)
            t[k] = time.perf_counter() - t0
        out.append((t["on"], t["off"]))
    return out


def diff_ci(pairs, seed: int = 0, resamples: int = 4000) -> dict:
    """Median of per-pair differences a - b in ms, with a bootstrap 95% interval."""
    d = 1e3 * np.diff(np.asarray(pairs, dtype=np.float64).reshape(-1, 2)[:, ::-1], axis=1).ravel()
    boot = np.median(d[_resample_idx(len(d), seed, resamples, None)], axis=1)
    return {"median_ms": round(float(np.median(d)), 3),
            "ci95_ms": [round(float(np.quantile(boot, 0.025)), 3), round(float(np.quantile(boot, 0.975)), 3)],
            "pairs": len(d)}


def kernel_throughput() -> dict:
    from engram.store import checksum

    rows = np.random.default_rng(0).integers(-2**31, 2**31 - 1, (1 << 18, 64), dtype=np.int32)  # 64 MiB
    sums = checksum.row_crcs(rows)
    best = min(_t(lambda: checksum.mismatches(rows, sums)) for _ in range(5))
    few = rows[:4096].copy()  # a decode-sized batch of rows: call overhead included
    best_few = min(_t(lambda: checksum.mismatches(few, sums[:4096])) for _ in range(50))
    return {"native": checksum.available(), "gb_per_s_256b_rows": round(rows.nbytes / best / 1e9, 2),
            "ns_per_row_4096_rows": round(best_few / 4096 * 1e9, 1)}


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="verify-bench", help="where to write the model and its store")
    ap.add_argument("--quick", action="store_true", help="a tiny backbone and table, few batches (smoke test)")
    ap.add_argument("--rows-per-head", type=int, default=65_536)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-frac", type=float, default=0.10)
    ap.add_argument("--profile-tokens", type=int, default=1_000_000)
    ap.add_argument("--io", choices=("auto", "direct", "mmap"), default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.rows_per_head, args.d_model, args.layers, args.batches, args.new_tokens, args.rounds = \
            4096, 128, 2, 2, 4, 1
    from engram.data import prepare_data
    from engram.serve import export_tables
    from engram.serve.identity import check_identity, model_table_digests, weights_table_digests
    from engram.serve.offload import access_profiles
    from engram.serve.verify import verify_store_dir

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"benchmark": "store_verification_cost", "machine": machine_info(),
                 "args": {k: v for k, v in vars(args).items() if k not in ("dir", "out")}}
    data = prepare_data(progress=False)
    cfg = config(args.rows_per_head, data.vocab_size, args.d_model, args.layers)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedVocab.from_pretrained(data.tokenizer_spec)).eval()
    table_bytes = sum(p.numel() * p.element_size() for p in model.engram_parameters())
    model_dir, store_dir = work / "model", work / "store"
    model.save_pretrained(model_dir)
    export_tables(model, store_dir)
    res["table"] = {"rows": sum(p.shape[0] for p in model.engram_parameters()), "row_bytes": 256,
                    "mib": round(table_bytes / 2**20, 1)}
    res["kernel"] = kernel_throughput()
    t0 = time.perf_counter()
    report = verify_store_dir(store_dir, progress=False)
    res["full_scan"] = {"ok": report.ok, "seconds": round(time.perf_counter() - t0, 3),
                        "mb_per_s": round(table_bytes / (time.perf_counter() - t0) / 1e6, 1)}
    # What opening a store costs for the identity check: the model's tables hashed in RAM or streamed
    # from its weights file (the page cache may hold the file: this is the warm case).
    from engram.serve import read_manifest

    manifest = read_manifest(store_dir)
    res["identity_check_s"] = {
        "tables_in_memory": round(_t(lambda: model_table_digests(model)), 3),
        "tables_from_weights_file": round(_t(lambda: weights_table_digests(model_dir / "model.safetensors", [1])), 3),
        "whole_check_in_memory": round(_t(lambda: check_identity(manifest, model, "store")), 3)}

    B, T = 8, 256
    batches = batches_of(data.val, B, T, args.batches)
    start, L = args.batches * B * (T + 1), 64 + args.new_tokens
    text = torch.from_numpy(np.asarray(data.val[start:start + 4 * L], dtype=np.int64).reshape(4, L))
    n_prof = max(1, min(args.profile_tokens, len(data.train) - 10_000) // (B * (T + 1)))
    profile = access_profiles(model, (x for x, _ in batches_of(data.train[10_000:], B, T, n_prof)))
    cache_bytes = max(4096, int(args.cache_frac * table_bytes))
    with torch.no_grad():
        ref = [float(model(x, y).loss) for x, y in batches]
        lms = {"on": open_offloaded(model, store_dir, True, args.io, cache_bytes, profile),
               "off": open_offloaded(model, store_dir, False, args.io, cache_bytes, profile)}
        try:
            paired(lms, batches[:1], text[:, :66], 0)  # warm-up: thread pools, allocator, kernels
            for lm in lms.values():
                lm.reset_stats()
            passes = [paired(lms, batches, text, r) for r in range(args.rounds)]
            tiers = {k: lm.tier_stats() for k, lm in lms.items()}
            fetches = [p for r in range(args.rounds) for p in fetch_pairs(lms, batches, r)]
            res["io"] = next(iter(lms["on"]._also_close)).io
        finally:
            for lm in lms.values():
                lm.close()
        with torch.no_grad():
            s = model.new_decode_state(text.shape[0], max_len=text.shape[1])
            ref_logits = [model(text[:, :64], cache=s).logits]
            ref_logits += [model(text[:, i:i + 1], cache=s).logits for i in range(64, text.shape[1])]
    exact = all(p["losses"][k] == ref and all(torch.equal(a, b) for a, b in zip(p["logits"][k], ref_logits,
                                                                                   strict=True))
                for p in passes for k in ("on", "off"))
    res["summary"] = {
        "prefill_on_vs_off": ratio_ci([t for p in passes for t in p["prefill"]]),
        "decode_on_vs_off": ratio_ci([t for p in passes for t in p["decode"]]),
        "prefill_batch_s_median": round(statistics.median(t[1] for p in passes for t in p["prefill"]), 3),
        # the prefetch workers' thread CPU per prefill batch (the fetches, checks included), and the
        # paired difference: what the check adds to a batch's fetch
        "prefill_fetch_cpu_ms_on_off": [round(1e3 * statistics.median(c[j] for p in passes
                                                                      for c in p["fetch_cpu"]), 2) for j in (0, 1)],
        "prefill_fetch_cpu_ms_diff_median": round(1e3 * statistics.median(c[0] - c[1] for p in passes
                                                                          for c in p["fetch_cpu"]), 2),
        "decode_step_ms_median": round(1e3 * statistics.median(t[1] for p in passes for t in p["decode"]), 2),
        # every distinct row the disk tier read was checked (cache hits are rows checked once, when loaded);
        # prefill batches and decode steps together, per pass over them
        "disk_rows_checked_per_pass": round(tiers["on"]["disk"]["unique"] / args.rounds),
        "cache_hit_rate": round(tiers["on"]["cache"]["hits"] / max(1, tiers["on"]["cache"]["unique"]), 3),
        "all_equal_ram": exact,
    }
    batch_s = res["summary"]["prefill_batch_s_median"]
    fc = diff_ci(fetches)
    res["summary"]["prefill_fetch_on_minus_off"] = {
        **fc, "fetch_ms_off_median": round(1e3 * statistics.median(f[1] for f in fetches), 2),
        "share_of_batch": round(fc["median_ms"] / 1e3 / batch_s, 5),
        "share_of_batch_ci95": [round(v / 1e3 / batch_s, 5) for v in fc["ci95_ms"]]}
    # the check's own CPU by the kernel's measured speed, against the time of what was served
    served_s = sum(t[1] for p in passes for t in p["prefill"] + p["decode"]) / args.rounds
    res["summary"]["check_cpu_share_estimate"] = round(
        res["summary"]["disk_rows_checked_per_pass"] * res["kernel"]["ns_per_row_4096_rows"] * 1e-9 / served_s, 6)
    res["tiers"] = tiers
    res["pairs_s"] = {"prefill": [t for p in passes for t in p["prefill"]],
                      "decode": [t for p in passes for t in p["decode"]], "fetch": fetches}
    emit(res, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
