"""What serving rows from the static cache over a disk store costs the caller, native path vs numpy path.

Same model, table, text, profile and co-access store as `bench_offload.py` (d=64 fp32 rows, 16.8M rows: a
4 GiB table; backbone `--d-model` x `--layers`; static-hot cache of 10% ranked on train-split tokens).
Two caches over one direct-read disk store, one with the native split (`CachedStore.native`, see
`engram.store.native_cache`), one with it off (the numpy path), both bit-identical (checked).

* decode: held-out text, 4 sequences, one given token per step with the KV cache, through the plain
  all-in-RAM model and through `OffloadedLM` over each cache (all three share one backbone), order
  rotating per step. Per offloaded step: `fetch` (ids -> flat ids -> gather_start: hits copied, misses'
  reads submitted) and `collect` (the handle's result, called by the Engram layer after layer 0: the
  reads' remaining wait plus the copy of the missed rows), each timed in place, i.e. right after a
  forward pass has flushed the CPU's caches, which is where a decode step pays them; and the step's
  time ratio to the plain model (median of pairs, total).
* prefill: the rows of 2,048-token batches gathered through each cache alone (no model), alternating;
  the calling thread's CPU time per batch (`time.thread_time`: what a prefetch worker takes from the
  model's cores), medians.

Run: .venv/bin/python benchmarks/bench_fetch_path.py --dir /path/with/6GiB/free [--quick]
"""

# Legend: B batch, T time.

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engram.memory import MemoryProvider

from bench_offload import batches_of, config
from common import emit, machine_info, median_ci, total_ratio_ci


class _Timed(MemoryProvider):
    """A memory provider that times its inner provider: ``prepare`` (the fetch, before the pass) and
    ``rows`` (the collect, where the Engram layer asks)."""

    def __init__(self, memory) -> None:
        self.memory, self.fetch_s, self.collect_s = memory, 0.0, 0.0

    def prepare(self, rows) -> None:
        t0 = time.perf_counter()
        self.memory.prepare(rows)
        self.fetch_s += time.perf_counter() - t0

    def rows(self, layer: int, rows_BTH: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.memory.rows(layer, rows_BTH)
        self.collect_s += time.perf_counter() - t0
        return out


def _ms(v) -> float:
    return round(1e3 * statistics.median(v), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="fetch-bench", help="where to write the model and its store")
    ap.add_argument("--quick", action="store_true", help="a 64 MiB table, few steps (smoke test)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=200, help="decode steps (one token per sequence each)")
    ap.add_argument("--batches", type=int, default=24, help="prefill batches of 8 x 256 tokens")
    ap.add_argument("--out")
    args = ap.parse_args()
    from engram.data import prepare_data
    from engram.model import EngramLM
    from engram.serve.export import co_access_layouts, export_tables, open_store_dir
    from engram.serve.offload import OffloadedLM, access_profiles
    from engram.store import native_cache, native_io
    from engram.store.cache import CachedStore
    from engram.tokenizer import CompressedVocab

    res: dict = {"benchmark": "fetch_path", "machine": machine_info()}
    if not (native_cache.available() and native_io.available()):
        res["skipped"] = (f"cannot run: native cache kernels: {native_cache.unavailable_reason() or 'ok'}; "
                          f"direct reads: {native_io.unavailable_reason() or 'ok'}")
        emit(res, args.out)
        return
    rows_per_head = 16_384 if args.quick else 1_048_576
    steps, n_batches = (16, 3) if args.quick else (args.steps, args.batches)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(progress=False)
    cfg = config(rows_per_head, data.vocab_size, args.d_model, args.layers)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedVocab.from_pretrained(data.tokenizer_spec)).eval()
    table_bytes = sum(p.numel() * p.element_size() for p in model.engram_parameters())
    free = shutil.disk_usage(work).free
    if free < table_bytes + 2**30:
        need = (table_bytes + 2**30) / 2**30
        res["skipped"] = f"cannot run: {work} has {free / 2**30:.1f} GiB free, needs {need:.1f} GiB"
        emit(res, args.out)
        return
    B, T = 8, 256
    n_prof = max(1, min(4_000_000, len(data.train) - 10_000) // (B * (T + 1)))
    prof_batches = batches_of(data.train[10_000:], B, T, n_prof)
    profile = access_profiles(model, (x for x, _ in prof_batches))
    layouts = co_access_layouts(model, (x for x, _ in prof_batches))
    store_dir = export_tables(model, work / "store_layout", layouts=layouts)
    del layouts, prof_batches
    (layer,) = profile
    budget = int(0.10 * table_bytes)
    disk = open_store_dir(store_dir, model, io="direct")[layer]
    try:
        caches = {"native": CachedStore(disk, budget, "static", profile=profile[layer]),
                  "numpy": CachedStore(disk, budget, "static", profile=profile[layer])}
        caches["numpy"].native = False
        lms = {k: OffloadedLM(model, {layer: c}, own_stores=False) for k, c in caches.items()}
        eng = lms["native"]._engrams[layer]

        # decode, in place
        S = steps
        text = torch.from_numpy(np.asarray(data.val[:4 * (64 + S)], dtype=np.int64).reshape(4, 64 + S))
        states = {k: model.new_decode_state(4, max_len=64 + S) for k in ("plain", *lms)}
        times: dict = {k: [] for k in states}
        fetch: dict = {k: [] for k in lms}
        collect: dict = {k: [] for k in lms}
        equal = True
        with torch.no_grad():
            ref = model(text[:, :64], cache=states["plain"]).logits
            for k, lm in lms.items():
                equal &= torch.equal(lm(text[:, :64], cache=states[k]).logits, ref)
            order = ["plain", *lms]
            for i in range(64, 64 + S):
                tok = text[:, i:i + 1]
                rot = order[i % 3:] + order[:i % 3]
                outs = {}
                for k in rot:
                    t0 = time.perf_counter()
                    if k == "plain":
                        outs[k] = model(tok, cache=states[k]).logits
                        times[k].append(time.perf_counter() - t0)
                        continue
                    timed = _Timed(lms[k].memory)  # the Engram layer collects its rows when it runs
                    outs[k] = model(tok, cache=states[k], memory=timed).logits
                    times[k].append(time.perf_counter() - t0)
                    fetch[k].append(timed.fetch_s)
                    collect[k].append(timed.collect_s)
                equal &= all(torch.equal(outs[k], outs["plain"]) for k in lms)
        res["decode"] = {"steps": S, "sequences": 4, "plain_step_ms": _ms(times["plain"])}
        for k in lms:
            res["decode"][k] = {
                "fetch_ms": _ms(fetch[k]), "collect_ms": _ms(collect[k]), "step_ms": _ms(times[k]),
                "vs_plain": median_ci([a / b for a, b in zip(times["plain"], times[k], strict=True)]),
                "vs_plain_total": total_ratio_ci(list(zip(times["plain"], times[k], strict=True)))}

        # prefill fetch CPU, no model
        batches = batches_of(data.val[4 * (64 + S):], B, T, n_batches)
        cpu: dict = {k: [] for k in caches}
        for i, (x, _) in enumerate(batches):
            flat = eng.flat_rows(model.engram_rows(x)[layer]).reshape(-1)
            got = {}
            for k in (("native", "numpy") if i % 2 == 0 else ("numpy", "native")):
                t0 = time.thread_time()
                got[k] = caches[k].gather_start(flat).result()
                cpu[k].append(time.thread_time() - t0)
            equal &= torch.equal(got["native"].view(torch.int32), got["numpy"].view(torch.int32))
        res["prefill"] = {"batch": [B, T], "batches": n_batches,
                          **{f"{k}_cpu_ms_per_batch": _ms(v) for k, v in cpu.items()},
                          "native_vs_numpy_cpu": round(statistics.median(a / b for a, b in zip(
                              cpu["native"], cpu["numpy"], strict=True)), 3)}
        res["all_equal"] = bool(equal)
        res["stats"] = {k: c.stats() for k, c in caches.items()}
        for lm in lms.values():
            lm.close()  # the prefetch threads; the caches are closed here, the store below
        for c in caches.values():
            c.close()
    finally:
        disk.close()
        shutil.rmtree(work / "store_layout", ignore_errors=True)
    res["table"] = {"rows": disk.num_rows, "row_bytes": disk.row_bytes, "gib": round(table_bytes / 2**30, 2)}
    res["backbone"] = {"d_model": cfg.d_model, "n_layers": cfg.n_layers}
    emit(res, args.out)


if __name__ == "__main__":
    main()
