"""Throughput with the Engram table on disk (cold page cache, small hot-row cache) vs all in RAM.

Model: d=256, 6 layers, one Engram layer at layer 1 (orders 2-3, 8 heads each, d=64 fp32 rows
of 256 bytes, ~1M rows per head: a 4 GiB table), random weights (throughput does not depend on
training). Text: held-out stdlib files, local BPE.

Configurations, each measured on the same token batches:
  * ram_model: the plain EngramLM, table inside the model (the all-in-RAM reference);
  * ram_store: the same table served by a RamStore through the prefetcher;
  * disk + cache (LRU, LFU, static-hot; budget = 10% of the table): the table memory-mapped
    from a store file. Before each disk run the file's page cache is dropped
    (`posix_fadvise(POSIX_FADV_DONTNEED)` after unmapping our own pages; the mapping is
    `madvise(MADV_RANDOM)` so a row read faults in one 4 KiB page, not a 128 KiB read-ahead).
    A gather first queues the reads of all its distinct pages (`POSIX_FADV_WILLNEED`, see
    engram.memory.readahead); `--readahead both` adds the same runs with plain page faults.
    Each disk run reports the store's page-cache bytes right after the drop and the bytes the
    process read from the device (`/proc/self/io`), to show the cache really was cold.
    The static-hot cache is ranked by an access profile of the *train* split.

Prefill: `OffloadedLM.evaluate` over batches of 8 x 256 tokens (rows of batch i+1 are read while
batch i computes). Decode: greedy generation of 64 tokens for 4 prompts of 64 tokens. All runs
check that their outputs equal the all-in-RAM model's bit for bit.

Run: .venv/bin/python benchmarks/bench_offload.py --dir /path/with/10GiB/free [--quick]
"""

# Legend: B batch, T time; R table rows, d row width.

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM
from engram.tokenizer import CompressedVocab

from common import emit, machine_info


def config(rows_per_head: int, vocab_size: int) -> ModelConfig:
    eng = EngramConfig(engram_vocab_size=[rows_per_head, rows_per_head], max_ngram_size=3, n_embed_per_ngram=512,
                       n_head_per_ngram=8, layer_ids=[1])
    return ModelConfig(vocab_size=vocab_size, d_model=256, n_layers=6, n_heads=4, mlp_hidden=768, max_seq_len=512,
                       engram=eng)


def batches_of(tokens: np.ndarray, B: int, T: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(n):
        s = i * B * (T + 1)
        chunk = torch.from_numpy(np.asarray(tokens[s:s + B * (T + 1)], dtype=np.int64).reshape(B, T + 1))
        out.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
    return out


def time_run(lm, batches, prompts, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    loss = lm.evaluate(batches)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = lm.generate(prompts, new_tokens, temperature=0)
    t_decode = time.perf_counter() - t0
    ntok = sum(x.numel() for x, _ in batches)
    return {"loss": loss, "gen": gen, "prefill_tok_s": round(ntok / t_prefill, 1),
            "decode_tok_s": round(prompts.shape[0] * new_tokens / t_decode, 1),
            "prefill_s": round(t_prefill, 2), "decode_s": round(t_decode, 2)}


def proc_read_bytes() -> int | None:
    """Bytes this process has made the block layer read (``/proc/self/io`` read_bytes; None elsewhere)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return None


def page_cache_bytes(lm) -> int:
    """Page-cache-resident bytes of the disk stores behind ``lm`` (``DiskStore.page_cache_bytes``)."""
    stores = [*lm.stores.values(), *(getattr(s, "backing", None) for s in lm.stores.values())]
    return sum(s.page_cache_bytes() or 0 for s in stores if hasattr(s, "page_cache_bytes"))


class _Plain:
    """The plain model behind the same evaluate/generate interface (the all-in-RAM reference)."""

    def __init__(self, model: EngramLM) -> None:
        self.model = model

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        tot, n = 0.0, 0
        for x, y in batches:
            tot += float(self.model(x, y).loss) * y.numel()
            n += y.numel()
        return tot / n

    def generate(self, prompts, new_tokens, temperature=0):
        from engram.model.generation import generate

        return generate(self.model, prompts, new_tokens, temperature=temperature)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="offload-bench", help="where to write the model and its store")
    ap.add_argument("--quick", action="store_true", help="a 64 MiB table and few batches (smoke test)")
    ap.add_argument("--rows-per-head", type=int, default=1_048_576)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cache-frac", type=float, default=0.10)
    ap.add_argument("--readahead", choices=("on", "off", "both"), default="on",
                    help="disk runs with batched read-ahead (DiskStore readahead), plain page faults, or both "
                         "(the latter as extra runs named *_faults)")
    ap.add_argument("--out")
    args = ap.parse_args()
    from engram.data import prepare_data
    from engram.serve.export import export_tables
    from engram.serve.offload import access_profiles, open_memory

    rows_per_head = 16_384 if args.quick else args.rows_per_head
    n_batches = 3 if args.quick else args.batches
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"benchmark": "offload_throughput", "machine": machine_info()}
    data = prepare_data(progress=False)
    cfg = config(rows_per_head, data.vocab_size)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedVocab.from_pretrained(data.tokenizer_spec)).eval()
    table_bytes = sum(p.numel() * p.element_size() for p in model.engram_parameters())
    need = 2 * table_bytes + 2**30
    free = shutil.disk_usage(work).free
    if free < need:
        res["skipped"] = f"cannot run: {work} has {free / 2**30:.1f} GiB free, needs {need / 2**30:.1f} GiB"
        emit(res, args.out)
        return
    model_dir, store_dir = work / "model", work / "store"
    model.save_pretrained(model_dir)
    export_tables(model, store_dir)
    res["table"] = {"rows": sum(p.shape[0] for p in model.engram_parameters()), "row_bytes": 256,
                    "gib": round(table_bytes / 2**30, 2)}
    cache_bytes = int(args.cache_frac * table_bytes)
    res["cache_bytes"] = cache_bytes

    B, T = 8, 256
    batches = batches_of(data.val, B, T, n_batches)
    prompts = torch.from_numpy(np.asarray(data.train[:4 * 64], dtype=np.int64).reshape(4, 64))
    # Static-hot profile from the train split (never the evaluated text).
    prof_ids = [x for x, _ in batches_of(data.train[10_000:], B, T, 40)]
    profile = access_profiles(model, prof_ids)

    runs = {}
    time_run(_Plain(model), batches[:1], prompts, 4)  # warm-up: thread pools, allocator, kernels
    ref = time_run(_Plain(model), batches, prompts, args.new_tokens)
    runs["ram_model"] = ref
    with torch.no_grad():
        disk = [("disk_nocache", "disk", 0, "lru"), ("disk_lru", "disk", cache_bytes, "lru"),
                ("disk_lfu", "disk", cache_bytes, "lfu"), ("disk_static", "disk", cache_bytes, "static")]
        configs = [("ram_store", "ram", 0, "lru", True)]
        for name, memory, cb, policy in disk:
            if args.readahead in ("on", "both"):
                configs.append((name, memory, cb, policy, True))
            if args.readahead in ("off", "both"):
                configs.append((f"{name}_faults", memory, cb, policy, False))
        for name, memory, cb, policy, readahead in configs:
            lm = open_memory(model_dir, memory, store_dir=store_dir if memory == "disk" else None, cache_bytes=cb,
                             policy=policy, profile=profile if policy == "static" else None)
            for s in [*lm.stores.values(), *(getattr(s, "backing", None) for s in lm.stores.values())]:
                if hasattr(s, "readahead"):
                    s.readahead = readahead
            with lm:
                cold = lm.drop_page_cache() if memory == "disk" else None
                cached = page_cache_bytes(lm) if memory == "disk" else None
                io0 = proc_read_bytes()
                r = time_run(lm, batches, prompts, args.new_tokens)
                io1 = proc_read_bytes()
                r["tiers"] = lm.tier_stats()
                r["page_cache_dropped_files"] = cold
                # Evidence that the cold run really read from the device: the store's pages resident
                # after the drop, and the bytes this process read from block devices during the run.
                r["page_cache_mib_after_drop"] = None if cached is None else round(cached / 2**20, 1)
                r["device_read_mib"] = None if io0 is None else round((io1 - io0) / 2**20, 1)
            runs[name] = r
    ref_loss, ref_gen = ref["loss"], ref["gen"]
    for r in runs.values():
        r["loss_equal_ram"] = r.pop("loss") == ref_loss
        r["tokens_equal_ram"] = bool(torch.equal(r.pop("gen"), ref_gen))
        r["prefill_vs_ram"] = round(r["prefill_tok_s"] / ref["prefill_tok_s"], 3)
        r["decode_vs_ram"] = round(r["decode_tok_s"] / ref["decode_tok_s"], 3)
    res["prefill"] = {"batch": [B, T], "batches": n_batches}
    res["decode"] = {"prompts": list(prompts.shape), "new_tokens": args.new_tokens}
    res["runs"] = runs
    emit(res, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
