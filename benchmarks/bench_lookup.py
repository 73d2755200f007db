"""Lookup bandwidth: the multi-head gather from a >= 2 GiB Engram table against torch's copy bandwidth.

What it measures, for fp32 and bf16 tables with rows of 128 and 512 bytes (four cases):
  * gather: `MultiHeadTable.gather_into(rows, out)` -- the allocation-free hot path (the prefetching C
    kernel of `engram.memory.native_gather` where it builds, else offset add into a reused index
    buffer + `index_select(out=)`) -- into one preallocated `out [B, T, H, d]`;
    bandwidth = bytes of rows written to `out` per second;
  * index_select: the torch fallback path (offset add + `index_select(out=)`) on the same real-text
    ids, timed in the same rounds, to show what the kernel gains (`index_select_ratio`), and the
    kernel on a single thread (`native_1thread_ratio`; `gather` uses torch.get_num_threads());
  * copy: `dst.copy_(src)` of a contiguous buffer holding as many bytes as `out` (the reference), and
    once a 1 GiB copy (machine-level figure);
  * row ids from two sources, same count: n-gram hashes of real text (the interpreter's standard
    library source, tokenized with the bundled Tekken tokenizer and compressed) and uniform random
    ids per head. Real text repeats n-grams (Zipf), so fewer distinct rows are read per step; the
    share of distinct rows is reported for both.
Also checked once per case: `gather_into` equals `forward`, and the hot path allocates nothing (torch
profiler memory events) and keeps writing into the same buffer.

Target (issue): gather / copy >= 0.5 with real-text ids; the uniform random ratio is reported only.
Timings are medians of `timeit` (>= 5 runs) pooled over interleaved rounds of copy / real / random / ...,
so drift on a shared machine hits all of them alike; best-run figures are reported beside them, and
`other_busy_cores` says how much CPU other processes took meanwhile (trust only runs where it is ~0).

Run: .venv/bin/python benchmarks/bench_lookup.py [--quick] [--out results.json]
     (default: four >= 2 GiB tables, 1-2 minutes; --quick: >= 256 MiB tables, smoke test).
     Tables are advised onto 2 MiB pages (`engram.memory.hugepages`); `hugepage_backed_gib` is this
     process's AnonHugePages growth (/proc/self/smaps_rollup) while the table was built.
     ENGRAM_NATIVE_GATHER=0 times the torch path as `gather` instead.
"""

# Legend: B batch, T time, H hash heads (= (N-1)*K), d row width; rows [B, T, H] -> out [B, T, H, d].

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.memory import MultiHeadTable, native_gather
from engram.tokenizer import CompressedVocab

from common import emit, machine_info, timeit

GiB = 2**30
CASES = [(torch.float32, 128), (torch.float32, 512), (torch.bfloat16, 128), (torch.bfloat16, 512)]  # (dtype, row B)
MAX_NGRAM, HEADS_PER_NGRAM, LAYER = 3, 8, 1  # H = (3-1)*8 = 16 heads in one Engram layer
TARGET_RATIO = 0.5
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


# ---------------------------------------------------------------------------------------------- real text
def stdlib_texts(max_chars: int) -> tuple[list[str], dict]:
    """Source files of the running interpreter's standard library, sorted by path, up to `max_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, n = [], 0
    for p in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(p.relative_to(root).parts[:-1]):
            continue
        try:
            s = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        texts.append(s)
        n += len(s)
        if n >= max_chars:
            break
    return texts, {"source": str(root), "files": len(texts), "chars": n}


def tokenize(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of all texts, concatenated; uses the Rust `tokenizers` batch encoder when available."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        seqs = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])


def real_text_batches(B: int, T: int, n_batches: int, max_chars: int) -> tuple[torch.Tensor, int, int, dict]:
    """Compressed ids of stdlib source as `[n, B, T]` (consecutive text), vocab size, compressed pad id, stats."""
    t0 = time.perf_counter()
    vocab = CompressedVocab.from_pretrained("mistral-tekken")
    t_vocab = time.perf_counter() - t0
    texts, info = stdlib_texts(max_chars)
    t0 = time.perf_counter()
    ids = tokenize(vocab.tokenizer, texts)
    t_tok = time.perf_counter() - t0
    cids = np.asarray(vocab(ids), dtype=np.int64)
    n = min(n_batches, cids.size // (B * T))
    if n < 1:
        raise RuntimeError(f"only {cids.size} tokens of stdlib text, need {B * T} per batch")
    batches_NBT = torch.from_numpy(cids[: n * B * T].copy()).view(n, B, T)
    pad_id = int(vocab.lookup[EngramConfig().pad_id])
    info.update(tokenizer="mistral-tekken", tokens=int(ids.size), compressed_vocab_size=len(vocab),
                distinct_tokens_used=int(np.unique(cids[: n * B * T]).size), batches=n,
                vocab_load_s=round(t_vocab, 2), tokenize_s=round(t_tok, 3))
    return batches_NBT, len(vocab), pad_id, info


# ---------------------------------------------------------------------------------------------- helpers
def anon_hugepages_bytes() -> int:
    """AnonHugePages of this process (/proc/self/smaps_rollup; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def index_select_gather(tab: MultiHeadTable, rows_BTH: torch.Tensor, idx: torch.Tensor, out_BTHd: torch.Tensor):
    """The torch fallback of `gather_into`: offset add into a reused index buffer + index_select(out=)."""
    torch.add(rows_BTH, tab.offsets, out=idx.view(rows_BTH.shape))
    torch.index_select(tab.weight.detach(), 0, idx, out=out_BTHd.view(-1, tab.dim))


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_snapshot() -> tuple[float, float | None, float]:
    """(wall s, busy CPU s of the whole machine from /proc/stat or None, CPU s of this process)."""
    busy = None
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait; steal counts
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), busy, time.process_time()


def other_busy_cores(start: tuple, end: tuple) -> float | None:
    """Cores kept busy by *other* processes (or the hypervisor) between two `cpu_snapshot`s.

    The gather and the copy run as 2-thread OpenMP regions that wait for their slowest thread, so
    any load from elsewhere shows up as whole scheduler ticks in the timings.
    """
    if start[1] is None or end[1] is None or end[0] <= start[0]:
        return None
    return round(max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]), 2)


def allocated_bytes(fn, calls: int = 2) -> int:
    """Bytes allocated (torch CPU allocator, per the profiler's memory events) by `calls` calls of `fn`."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(calls):
            fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0)


def unique_share(tab: MultiHeadTable, rows_BTH: torch.Tensor) -> float:
    """Distinct table rows / rows gathered (ids made global by adding the head offsets)."""
    flat = (rows_BTH + tab.offsets).view(-1)
    return torch.unique(flat).numel() / flat.numel()


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def bench_copy(nbytes: int, repeat: int) -> dict:
    """Large contiguous copy, the machine's copy bandwidth (bytes written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    t = timeit(lambda: dst.copy_(src), repeat=repeat)
    return {"bytes": nbytes, "GBps": gbps(nbytes, t["median_s"]), "GBps_best": gbps(nbytes, t["best_s"])}


# ---------------------------------------------------------------------------------------------- one case
def run_case(dtype: torch.dtype, row_bytes: int, min_table_bytes: int, batches_NBT: torch.Tensor,
             vocab_size: int, pad_id: int, rounds: int, repeat: int) -> list[dict]:
    """Gather vs copy for one table (dtype, row width); returns a real-text and a random-ids record."""
    elem = torch.empty((), dtype=dtype).element_size()
    d = row_bytes // elem
    n_batches, B, T = batches_NBT.shape
    H = (MAX_NGRAM - 1) * HEADS_PER_NGRAM
    per_head = math.ceil(min_table_bytes / row_bytes / H)  # each head gets the next prime >= this
    hasher = NgramHasher(vocab_size, per_head, MAX_NGRAM, HEADS_PER_NGRAM, [LAYER], pad_id=pad_id, seed=0)
    head_sizes = hasher.head_sizes(LAYER)
    table_bytes = sum(head_sizes) * row_bytes
    assert table_bytes >= min_table_bytes, (table_bytes, min_table_bytes)

    real = [hasher.hash(batches_NBT[i], validate=False)[LAYER] for i in range(n_batches)]
    g = torch.Generator().manual_seed(1234)
    rand = [torch.stack([torch.randint(0, s, (B, T), generator=g) for s in head_sizes], dim=-1)
            for _ in range(n_batches)]

    huge0 = anon_hugepages_bytes()
    t0 = time.perf_counter()
    tab = MultiHeadTable(head_sizes, d, dtype=dtype, sparse=False)  # allocated and filled (normal_)
    init_s = time.perf_counter() - t0
    huge_gib = max(0, anon_hugepages_bytes() - huge0) / GiB

    out_BTHd = torch.empty(B, T, H, d, dtype=dtype)
    out_bytes = out_BTHd.numel() * elem
    src = torch.empty(out_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)

    # Correctness and "no allocation on the hot path", once per case.
    for rows in (real[0], rand[0]):
        assert torch.equal(tab.gather_into(rows, out_BTHd), tab(rows)), "gather_into != forward"
    ptr = out_BTHd.data_ptr()
    it_check = itertools.cycle(real)
    hot_alloc = allocated_bytes(lambda: tab.gather_into(next(it_check), out_BTHd))
    assert hot_alloc == 0, f"gather_into allocated {hot_alloc} bytes on the hot path"

    idx = torch.empty(B * T * H, dtype=torch.int64)
    out2_BTHd = torch.empty_like(out_BTHd)
    index_select_gather(tab, real[0], idx, out2_BTHd)
    assert torch.equal(out2_BTHd, tab.gather_into(real[0], out_BTHd)), "gather_into != index_select"
    del out2_BTHd
    it_real, it_rand, it_isel = itertools.cycle(real), itertools.cycle(rand), itertools.cycle(real)
    fns = {
        "copy": lambda: dst.copy_(src),
        "real_text": lambda: tab.gather_into(next(it_real), out_BTHd),
        "uniform_random": lambda: tab.gather_into(next(it_rand), out_BTHd),
        "index_select": lambda: index_select_gather(tab, next(it_isel), idx, out_BTHd),
    }
    if native_gather.available():  # the kernel on one thread, to tell what the second thread adds
        it_1t = itertools.cycle(real)
        fns["native_1thread"] = lambda: native_gather.gather(tab.weight, next(it_1t), tab.offsets, tab.head_sizes,
                                                             out_BTHd, threads=1)
    med: dict[str, list[float]] = {k: [] for k in fns}
    best: dict[str, list[float]] = {k: [] for k in fns}
    snap0 = cpu_snapshot()
    for _ in range(rounds):  # interleaved, so load changes on a shared machine hit all three alike
        for k, fn in fns.items():
            t = timeit(fn, repeat=repeat, warmup=1)
            med[k].append(t["median_s"])
            best[k].append(t["best_s"])
    others = other_busy_cores(snap0, cpu_snapshot())
    assert out_BTHd.data_ptr() == ptr, "output buffer was reallocated"
    assert tab.gather_into(real[0], out_BTHd) is out_BTHd

    copy_s, copy_best_s = statistics.median(med["copy"]), min(best["copy"])
    records = []
    for ids_name, rows_list in (("real_text", real), ("uniform_random", rand)):
        share = statistics.fmean(unique_share(tab, r) for r in rows_list)
        g_s, g_best_s = statistics.median(med[ids_name]), min(best[ids_name])
        ratio = copy_s / g_s
        records.append({
            "dtype": str(dtype).replace("torch.", ""), "row_bytes": row_bytes, "d": d, "ids": ids_name,
            "table_gib": round(table_bytes / GiB, 3), "hugepage_backed_gib": round(huge_gib, 2),
            "head_size_range": [min(head_sizes), max(head_sizes)], "table_init_s": round(init_s, 2),
            "tokens": B * T, "rows_per_step": B * T * H, "out_mib": round(out_bytes / 2**20, 1),
            "batches": len(rows_list), "unique_row_share": round(share, 4),
            "unique_row_mib": round(share * B * T * H * row_bytes / 2**20, 1),
            "gather_GBps": gbps(out_bytes, g_s), "copy_GBps": gbps(out_bytes, copy_s), "ratio": round(ratio, 3),
            "gather_GBps_best": gbps(out_bytes, g_best_s), "copy_GBps_best": gbps(out_bytes, copy_best_s),
            "ratio_best": round(copy_best_s / g_best_s, 3),
            "ratio_per_round": [round(c / x, 3) for c, x in zip(med["copy"], med[ids_name], strict=True)],
            "index_select_ratio": (round(copy_s / statistics.median(med["index_select"]), 3)
                                   if ids_name == "real_text" else None),
            "native_1thread_ratio": (round(copy_s / statistics.median(med["native_1thread"]), 3)
                                     if ids_name == "real_text" and "native_1thread" in med else None),
            "hot_path_alloc_bytes": hot_alloc, "other_busy_cores": others,
            "target_met": bool(ratio >= TARGET_RATIO) if ids_name == "real_text" else None,
        })
    return records  # the table and buffers are freed with this frame (main then runs gc)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tables >= 256 MiB and fewer tokens, for a smoke test")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; 2 with --quick)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load_start, snap_start = load_avg(), cpu_snapshot()
    if args.quick:
        B, T, n_batches, max_chars, min_table, rounds, repeat, big_copy = 4, 512, 4, 60_000, 256 * 2**20, 2, 5, GiB // 4
    else:
        B, T, n_batches, max_chars, min_table, rounds, repeat, big_copy = 16, 2048, 8, 1_500_000, 2 * GiB, 5, 5, GiB
    if args.rounds is not None:
        if args.rounds < 1:
            ap.error("--rounds must be >= 1")
        rounds = args.rounds

    batches_NBT, vocab_size, pad_id, text_info = real_text_batches(B, T, n_batches, max_chars)
    copy_large = bench_copy(big_copy, repeat)
    results = []
    for dtype, row_bytes in CASES:
        results += run_case(dtype, row_bytes, min_table, batches_NBT, vocab_size, pad_id, rounds, repeat)
        gc.collect()  # one table at a time: peak RSS ~ table + 3x the output buffer
    for r in results:  # second reference, less sensitive to scheduler ticks than the short same-size copy
        r["ratio_vs_copy_large"] = round(r["gather_GBps"] / copy_large["GBps"], 3)

    real = [r for r in results if r["ids"] == "real_text"]
    others = other_busy_cores(snap_start, cpu_snapshot())
    contention = {"other_busy_cores": others, "cores": os.cpu_count(), "load_avg_start": load_start,
                  "load_avg_end": load_avg()}
    if others is not None and others > 0.25:
        contention["warning"] = (f"other processes kept ~{others} of {os.cpu_count()} cores busy during the run; "
                                 f"timings are inflated (often by whole scheduler ticks), rerun on an idle machine")
    emit({
        "benchmark": "lookup",
        "machine": machine_info(),
        "config": {
            "quick": args.quick, "B": B, "T": T, "tokens_per_step": B * T, "max_ngram_size": MAX_NGRAM,
            "n_head_per_ngram": HEADS_PER_NGRAM, "heads": (MAX_NGRAM - 1) * HEADS_PER_NGRAM, "layer_ids": [LAYER],
            "min_table_gib": min_table / GiB, "pad_id_compressed": pad_id, "rounds": rounds, "timeit_repeat": repeat,
            "hot_path": "MultiHeadTable.gather_into: " + (
                f"native_gather C kernel, prefetch distance {native_gather.PREFETCH_DISTANCE}, "
                f"{torch.get_num_threads()} threads" if native_gather.available() else
                f"index_select out= with a reused int64 index buffer ({native_gather.unavailable_reason()})"),
            "bandwidth": "bytes written to the output per second (gather: rows x row_bytes; copy: dst bytes)",
            "text": text_info,
        },
        "copy_large": copy_large,
        "results": results,
        "target": {"real_text_ratio_min": TARGET_RATIO, "all_met": all(r["target_met"] for r in real),
                   "min_real_text_ratio": min(r["ratio"] for r in real)},
        "contention": contention,
        "total_s": round(time.perf_counter() - t_start, 1),
    }, args.out)


if __name__ == "__main__":
    main()
