"""Throughput with the Engram table on disk (cold page cache, small hot-row cache) vs all in RAM.

Model: d=256, 6 layers, one Engram layer at layer 1 (orders 2-3, 8 heads each, d=64 fp32 rows
of 256 bytes, ~1M rows per head: a 4 GiB table), random weights (throughput does not depend on
training). Text: held-out stdlib files, local BPE.

Configurations, each measured on the same token batches:
  * ram_model: the plain EngramLM, table inside the model (the all-in-RAM reference);
  * ram_store: the same table served by a RamStore through the prefetcher;
  * disk + cache (none, LRU, LFU, static-hot; budget = 10% of the table): the table in a store
    file. `--io direct` (default): rows read with O_DIRECT through io_uring (DiskStore
    io="direct": no page cache at all, 512-byte aligned reads); `--io mmap`: the memory mapping
    (`madvise(MADV_RANDOM)`, a gather first queues its distinct pages with
    `POSIX_FADV_WILLNEED`); `--io both` runs both (mmap runs named *_mmap).
    Before each disk run the file's page cache is dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`
    after unmapping our own pages). `--io-scheduler none` sets the store device's block-layer
    scheduler for the timed rounds (root; restored after; the JSON records it either way): a
    scheduler costs CPU per request and does nothing for random 512-byte reads. Each disk run
    reports the store's page-cache bytes right after the drop and after the run, the bytes the
    process read from the device (`/proc/self/io`) and, for direct reads, the number of reads, to
    show the cache was cold.
    The static-hot cache is ranked by an access profile of `--profile-tokens` train-split tokens
    (never the evaluated text); it is loaded when the store opens, before the timed run.
  * with `--layout`, each disk configuration also on a store written in co-access order (runs named
    *_layout): the rows of each n-gram seen in the same profile tokens side by side, most frequent
    first (engram.store.layout), so a cold n-gram's head rows share one read.

Every offloaded configuration serves through the all-in-RAM model's own backbone (`open_memory(model=...)`;
its tables are not used), so a pair compares where the rows come from and nothing else. Two copies of
one model are not equally fast here: measured, a deep copy of the plain model took 0.906 of its decode
speed in one process and 0.99-1.01 in six others (which pages their weights landed on), and a
configuration that loaded its own backbone carried that as a per-round offset no pairing removes.
`--separate-backbone` loads one per configuration, to reproduce that offset when studying it.

Timing is paired, because this kind of shared machine drifts by +-15% within a minute. Prefill:
batches of 8 x 256 held-out tokens, each run through the all-in-RAM model and through the
offloaded one back to back (order alternating), `OffloadedLM.forward` per batch: the batch's rows
are fetched when its forward starts and overlap only with the layers before the Engram layer.
The prefill ratio is the median over all (batch, round) pairs of RAM time / offloaded time, with
a bootstrap 95% interval; `prefill_vs_ram_total` is the throughput ratio itself, total RAM time
over total offloaded time of the same pairs (slow outliers count in full; bootstrap over pairs).
`prefill_fetch_cpu_ms_per_batch`: the prefetch workers' thread CPU
per prefill batch (`Prefetcher.cpu_seconds`), what the fetches take from the model's cores;
`prefill_steal_ms_per_batch` / `ram_prefill_steal_ms_per_batch`: the vCPU time the hypervisor took
(`/proc/stat` steal in clock ticks, mean per batch) during the offloaded / the RAM model's turns: on a
VM whose disk emulation shares host cores with the vCPUs, part of a read's cost shows only there.
`ram_steal_ms_after_offloaded_turn` / `..._after_ram_turn`: the RAM model's turns split by what ran
just before them (does host work for the reads outlast the turn that issued them?);
`ram_prefill_s_median`: the RAM model's batch time during this configuration's runs.
`--settle 30` (default): idle 30 s after opening each configuration, before its pairs. Without it,
on a VM with free page reporting, the host reclaiming the 4 GiB a RAM store just freed stole 30-70
ms per batch from both models for the next configuration's first minute (measured).
Decode: 4 held-out sequences (text after the prefill batches'), a
64-token prompt each, then `--new-tokens` steps of one given token per sequence with the KV cache
(teacher forcing: the model's weights are random, so its own greedy output is not text and would
touch rows no real decode touches; measured: 31% cache hits instead of ~65%). Each step runs on
both models back to back (order alternating); ratio = median over (step, round) pairs with a
bootstrap interval. Greedy generation from 4 train-split prompts is also run RAM / offloaded / RAM
(`generate_vs_ram`, whole runs) to check its tokens. Each round (`--rounds`) opens every
configuration afresh, cold. All runs check that their per-batch losses, decode-step logits and
generated tokens equal the all-in-RAM model's bit for bit.

Run: .venv/bin/python benchmarks/bench_offload.py --dir /path/with/10GiB/free [--quick]
"""

# Legend: B batch, T time; R table rows, d row width.

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM
from engram.store import blockdev
from engram.tokenizer import CompressedVocab

from common import emit, machine_info, median_ci, steal_seconds, total_ratio_ci


def config(rows_per_head: int, vocab_size: int, d_model: int = 256, n_layers: int = 6) -> ModelConfig:
    eng = EngramConfig(engram_vocab_size=[rows_per_head, rows_per_head], max_ngram_size=3, n_embed_per_ngram=512,
                       n_head_per_ngram=8, layer_ids=[1])
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=d_model // 64,
                       mlp_hidden=3 * d_model, max_seq_len=512, engram=eng)


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


def _mean_ms(seconds) -> float | None:
    v = list(seconds)
    return round(1e3 * statistics.mean(v), 1) if v else None


def paired_run(plain, lm, batches, prompts, new_tokens: int, ref_losses: list[float], ref_gen: torch.Tensor,
               text: torch.Tensor, flip: int = 0) -> dict:
    """Time ``lm`` against the all-in-RAM model step by step, in alternation.

    Prefill: for every batch, one forward of each (order alternating from batch to batch), so both
    see the same moment of this shared machine's drifting speed; ``lm.forward`` fetches the batch's
    rows at its start and overlaps them with the layers before the Engram layer (no look-ahead to
    the next batch, which would hide reads behind the RAM model's turn).

    Decode: ``text`` ([B, P + S] held-out tokens) is decoded with the KV cache, its first P tokens
    as one prefill chunk, then one given token per sequence per step (teacher forcing: the rows
    touched are those of real text; a random-weight model's own greedy output is not text). Each
    step runs on both models, order alternating. Greedy generation from ``prompts`` is also run
    RAM / ``lm`` / RAM as a whole-run check that the tokens are equal (and timed, for reference).
    """
    t_ram, t_lm, losses = [], [], []
    # Host steal during each turn (in batch order, kept in the JSON's runs), and for the RAM turns
    # whether the turn just before was the offloaded model's (host work for its reads that outlasts
    # the turn would land there).
    per_turn: dict[str, list] = {"ram": [], "offloaded": []}
    after: dict[str, list] = {"lm": [], "ram": []}
    prev = None
    cpu0 = lm.prefetcher.cpu_seconds if lm.prefetcher is not None else 0.0
    for i, (x, y) in enumerate(batches):
        for who in ((plain.model, lm) if (i + flip) % 2 == 0 else (lm, plain.model)):
            s0 = steal_seconds()
            t0 = time.perf_counter()
            loss = float(who(x, y).loss)
            dt = time.perf_counter() - t0
            s1 = steal_seconds()
            if s0 is not None and s1 is not None:
                per_turn["offloaded" if who is lm else "ram"].append(round(s1 - s0, 3))
                if who is not lm and prev is not None:
                    after["lm" if prev is lm else "ram"].append(s1 - s0)
            prev = who
            if who is lm:
                t_lm.append(dt)
                losses.append(loss)
            else:
                t_ram.append(dt)
    fetch_cpu = (lm.prefetcher.cpu_seconds if lm.prefetcher is not None else 0.0) - cpu0
    B, P = text.shape[0], prompts.shape[1]
    s_ram = plain.model.new_decode_state(B, max_len=text.shape[1])
    s_lm = lm.model.new_decode_state(B, max_len=text.shape[1])
    d_ram, d_lm, steps_equal = [], [], True
    with torch.no_grad():
        steps_equal = torch.equal(plain.model(text[:, :P], cache=s_ram).logits, lm(text[:, :P], cache=s_lm).logits)
        for i in range(P, text.shape[1]):
            tok = text[:, i:i + 1]
            for who in ((plain.model, lm) if (i + flip) % 2 == 0 else (lm, plain.model)):
                t0 = time.perf_counter()
                logits = who(tok, cache=s_lm if who is lm else s_ram).logits
                dt = time.perf_counter() - t0
                (d_lm if who is lm else d_ram).append(dt)
                if who is lm:
                    out_lm = logits
                else:
                    out_ram = logits
            steps_equal &= torch.equal(out_lm, out_ram)
    t_gen = []
    for who in (plain, lm, plain):
        t0 = time.perf_counter()
        gen = who.generate(prompts, new_tokens, temperature=0)
        t_gen.append(time.perf_counter() - t0)
        if who is lm:
            tokens_equal = bool(torch.equal(gen, ref_gen))
    ntok = sum(x.numel() for x, _ in batches)
    return {"prefill_pair_ratios": [a / b for a, b in zip(t_ram, t_lm, strict=True)],
            "prefill_pairs_s": list(zip(t_ram, t_lm, strict=True)),
            "decode_pairs_s": list(zip(d_ram, d_lm, strict=True)),
            "prefill_tok_s": round(ntok / sum(t_lm), 1), "ram_prefill_s": t_ram,
            # CPU of the prefetch workers per prefill batch (what the fetches take from the model's cores)
            "prefill_fetch_cpu_ms_per_batch": round(1e3 * fetch_cpu / len(batches), 1),
            # vCPU time the host took during the offloaded / the RAM model's prefill turns
            "prefill_steal_ms_per_batch": round(1e3 * sum(per_turn["offloaded"]) / len(batches), 1),
            "ram_prefill_steal_ms_per_batch": round(1e3 * sum(per_turn["ram"]) / len(batches), 1),
            "prefill_steal_s_per_turn": per_turn,
            "ram_after_offloaded_steal_s": after["lm"], "ram_after_ram_steal_s": after["ram"],
            "decode_pair_ratios": [a / b for a, b in zip(d_ram, d_lm, strict=True)],
            "decode_tok_s": round(B * len(d_lm) / sum(d_lm), 1), "ram_decode_step_s": d_ram,
            "generate_vs_ram": round((t_gen[0] + t_gen[2]) / 2 / t_gen[1], 3),
            "loss_equal_ram": losses == ref_losses, "decode_equal_ram": bool(steps_equal),
            "tokens_equal_ram": tokens_equal}


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


def _disk_stores(lm) -> list:
    stores = [*lm.stores.values(), *(getattr(s, "backing", None) for s in lm.stores.values())]
    return [s for s in stores if hasattr(s, "direct_counts")]


def _one_run(plain, memory, cb, policy, io, sdir, sync_rows, args, model_dir, profile, batches, prompts, text,
             ref_losses, ref_gen, rnd) -> dict:
    """One configuration opened afresh (page cache dropped for disk), timed against the RAM model."""
    from engram.serve.offload import open_memory

    lm = open_memory(model_dir, memory, store_dir=sdir, cache_bytes=cb, sync_rows=sync_rows,
                     policy=policy, profile=profile if policy == "static" else None, io=io or "auto",
                     model=None if args.separate_backbone else plain.model)
    with lm:
        cold = lm.drop_page_cache() if memory == "disk" else None
        cached = page_cache_bytes(lm) if memory == "disk" else None
        if args.settle > 0:
            # Memory the previous configuration freed (a 4 GiB RAM store) goes back to the host (virtio
            # free page reporting); the host's work on it shows as steal from busy vCPUs for ~20 s after
            # (measured). Idle vCPUs let it finish before the timed pairs, for every configuration alike.
            time.sleep(args.settle)
        lm.reset_stats()
        reads0 = sum(s.direct_counts()["reads"] for s in _disk_stores(lm))  # minus the static preload
        io0 = proc_read_bytes()
        r = paired_run(plain, lm, batches, prompts, args.new_tokens, ref_losses, ref_gen, text, flip=rnd % 2)
        io1 = proc_read_bytes()
        r["io"] = io
        r["tiers"] = lm.tier_stats()
        r["device_reads"] = (sum(s.direct_counts()["reads"] for s in _disk_stores(lm)) - reads0
                             if io == "direct" else None)
        r["page_cache_dropped_files"] = cold
        # Evidence that the cold run really read from the device: the store's pages resident
        # after the drop, and the bytes this process read from block devices during the run.
        r["page_cache_mib_after_drop"] = None if cached is None else round(cached / 2**20, 1)
        r["page_cache_mib_after_run"] = None if cached is None else round(page_cache_bytes(lm) / 2**20, 1)
        r["device_read_mib"] = None if io0 is None else round((io1 - io0) / 2**20, 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="offload-bench", help="where to write the model and its store")
    ap.add_argument("--quick", action="store_true", help="a 64 MiB table and few batches (smoke test)")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds to idle after opening each configuration, before its timed pairs (lets a VM's "
                         "host finish reclaiming memory the previous configuration freed; default 30, 0 with --quick)")
    ap.add_argument("--rows-per-head", type=int, default=1_048_576)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of all configurations; ratios are medians over rounds")
    ap.add_argument("--cache-frac", type=float, default=0.10)
    ap.add_argument("--profile-tokens", type=int, default=4_000_000,
                    help="train-split tokens the static-hot profile is counted on")
    ap.add_argument("--io", choices=("direct", "mmap", "both"), default="direct",
                    help="disk reads: O_DIRECT through io_uring (DiskStore io='direct'), the memory mapping with "
                         "batched read-ahead (io='mmap'), or both (mmap runs named *_mmap)")
    ap.add_argument("--d-model", type=int, default=256, help="backbone width (compute per token)")
    ap.add_argument("--layers", type=int, default=6, help="backbone depth (compute per token)")
    ap.add_argument("--only", nargs="+", help="run only these configurations (e.g. disk_static)")
    ap.add_argument("--separate-backbone", action="store_true",
                    help="give each offloaded configuration its own copy of the backbone (loaded from the model "
                         "directory) instead of serving through the all-in-RAM model's own (open_memory(model=...))")
    ap.add_argument("--caller-fetch", action="store_true",
                    help="also run every disk configuration with all fetches started in the calling thread "
                         "(OffloadedLM sync_rows=inf: direct reads submitted there, collected by the Engram layer; "
                         "runs named *_caller)")
    ap.add_argument("--layout", action="store_true",
                    help="also run every disk configuration on a second store whose rows are in co-access order "
                         "(profiled on the same train tokens as the static cache; runs named *_layout)")
    ap.add_argument("--io-scheduler", nargs="+", metavar="NAME",
                    help="the store device's I/O scheduler for the disk runs (e.g. none, as NVMe devices default "
                         "to; needs root; the previous one is restored after each run); with several names every "
                         "disk configuration runs under each (runs named *@NAME); default: leave it")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.settle is None:
        args.settle = 0.0 if args.quick else 30.0
    from engram.data import prepare_data
    from engram.serve.export import co_access_layouts, export_tables
    from engram.serve.offload import access_profiles

    rows_per_head = 16_384 if args.quick else args.rows_per_head
    n_batches = 3 if args.quick else args.batches
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"benchmark": "offload_throughput", "machine": machine_info()}
    data = prepare_data(progress=False)
    cfg = config(rows_per_head, data.vocab_size, args.d_model, args.layers)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedVocab.from_pretrained(data.tokenizer_spec)).eval()
    table_bytes = sum(p.numel() * p.element_size() for p in model.engram_parameters())
    need = (3 if args.layout else 2) * table_bytes + 2**30
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
    # Decode text: 4 held-out sequences of 64 + new_tokens tokens, after the prefill batches' text.
    start, L = n_batches * B * (T + 1), 64 + args.new_tokens
    if start + 4 * L > len(data.val):
        ap.error(f"the held-out split has {len(data.val)} tokens, too few for {n_batches} batches and "
                 f"--new-tokens {args.new_tokens}")
    text = torch.from_numpy(np.asarray(data.val[start:start + 4 * L], dtype=np.int64).reshape(4, L))
    # Static-hot profile from the train split (never the evaluated text).
    n_prof = max(1, min(args.profile_tokens, len(data.train) - 10_000) // (B * (T + 1)))
    profile = access_profiles(model, (x for x, _ in batches_of(data.train[10_000:], B, T, n_prof)))
    res["profile_tokens"] = n_prof * B * T
    if args.layout:  # same train tokens as the static profile: rows of one n-gram side by side in the file
        t0 = time.perf_counter()
        layouts = co_access_layouts(model, (x for x, _ in batches_of(data.train[10_000:], B, T, n_prof)))
        t1 = time.perf_counter()
        export_tables(model, work / "store_layout", layouts=layouts)
        res["layout"] = {"placed_rows": {str(k): v.num_placed for k, v in layouts.items()},
                         "ram_mib": round(sum(v.nbytes for v in layouts.values()) / 2**20, 1),
                         "build_s": round(t1 - t0, 1), "write_s": round(time.perf_counter() - t1, 1)}
        del layouts

    disk = [("disk_nocache", 0, "lru"), ("disk_lru", cache_bytes, "lru"), ("disk_lfu", cache_bytes, "lfu"),
            ("disk_static", cache_bytes, "static")]
    configs = [("ram_store", "ram", 0, "lru", None, None, 1024)]
    for name, cb, policy in disk:
        for io in (("direct", "mmap") if args.io == "both" else (args.io,)):
            run = name if io == "direct" or args.io == "mmap" else f"{name}_mmap"
            for suffix, sdir in (("", store_dir), ("_layout", work / "store_layout"))[:1 + args.layout]:
                configs.append((run + suffix, "disk", cb, policy, io, sdir, 1024))
                if args.caller_fetch:
                    configs.append((run + suffix + "_caller", "disk", cb, policy, io, sdir, 1 << 62))
    if args.io_scheduler and len(args.io_scheduler) > 1:
        configs = [configs[0], *((c[0] + "@" + sched, *c[1:]) for c in configs[1:] for sched in args.io_scheduler)]
    if args.only:  # a name without "@NAME" selects it under every scheduler given
        names = {c[0] for c in configs} | {c[0].partition("@")[0] for c in configs}
        unknown = set(args.only) - names
        if unknown:
            ap.error(f"--only: unknown configuration(s) {sorted(unknown)}; choose from {sorted(names)}")
        configs = [c for c in configs if c[0] in args.only or c[0].partition("@")[0] in args.only]
    res["backbone"] = {"d_model": cfg.d_model, "n_layers": cfg.n_layers,
                       "params": sum(p.numel() for p in model.backbone_parameters())}
    plain = _Plain(model)
    time_run(plain, batches[:1], prompts, 4)  # warm-up: thread pools, allocator, kernels
    with torch.no_grad():
        ref_losses = [float(model(x, y).loss) for x, y in batches]
        ref_gen = plain.generate(prompts, args.new_tokens)
    rounds: list[dict] = []
    res["io_scheduler"] = blockdev.io_scheduler(store_dir)
    with torch.no_grad():
        for rnd in range(max(1, args.rounds)):
            runs = {}
            for name, memory, cb, policy, io, sdir, sync_rows in configs:
                sched = name.partition("@")[2] or (args.io_scheduler[0] if args.io_scheduler else None)
                with blockdev.scheduler_set(store_dir, sched if memory == "disk" else None) as sched_info:
                    r = _one_run(plain, memory, cb, policy, io, sdir, sync_rows, args, model_dir, profile,
                                 batches, prompts, text, ref_losses, ref_gen, rnd)
                r["io_scheduler"] = sched_info["during"] if sched_info and memory == "disk" else None
                runs[name] = r
            rounds.append(runs)
    summary = {}
    ram_prefill = [t for rd in rounds for r in rd.values() for t in r["ram_prefill_s"]]
    ram_decode = [t for rd in rounds for r in rd.values() for t in r.pop("ram_decode_step_s")]
    ntok = sum(x.numel() for x, _ in batches)
    dec_tok = text.shape[0]
    summary["ram_model"] = {"prefill_tok_s": round(ntok / n_batches / statistics.median(ram_prefill), 1),
                            "decode_tok_s": round(dec_tok / statistics.median(ram_decode), 1)}
    for name in rounds[0]:
        per = [rd[name] for rd in rounds]
        pairs = [p for r in per for p in r.pop("prefill_pair_ratios")]
        dpairs = [p for r in per for p in r.pop("decode_pair_ratios")]
        # the (RAM, offloaded) seconds of every pair stay in the runs: benchmarks/pool_offload.py pools runs
        times = [p for r in per for p in r["prefill_pairs_s"]]
        dtimes = [p for r in per for p in r["decode_pairs_s"]]
        summary[name] = {
            "prefill_vs_ram": median_ci(pairs),
            # throughput over all pairs (total RAM time / total offloaded time): slow outliers count in full
            "prefill_vs_ram_total": total_ratio_ci(times),
            "decode_vs_ram_total": total_ratio_ci(dtimes),
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in per),
            "prefill_fetch_cpu_ms_per_batch": statistics.median(r["prefill_fetch_cpu_ms_per_batch"] for r in per),
            "prefill_steal_ms_per_batch": round(statistics.mean(r["prefill_steal_ms_per_batch"] for r in per), 1),
            "ram_prefill_steal_ms_per_batch": round(statistics.mean(r["ram_prefill_steal_ms_per_batch"] for r in per),
                                                    1),
            # the RAM model's own turns during this configuration's runs (not paired across configurations)
            "ram_prefill_s_median": round(statistics.median(t for r in per for t in r["ram_prefill_s"]), 3),
            "ram_steal_ms_after_offloaded_turn": _mean_ms(t for r in per for t in r.pop("ram_after_offloaded_steal_s")),
            "ram_steal_ms_after_ram_turn": _mean_ms(t for r in per for t in r.pop("ram_after_ram_steal_s")),
            "decode_vs_ram": median_ci(dpairs),
            "generate_vs_ram": statistics.median(r["generate_vs_ram"] for r in per),
            "generate_vs_ram_rounds": [r["generate_vs_ram"] for r in per],
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in per),
            "all_equal_ram": all(r["loss_equal_ram"] and r["decode_equal_ram"] and r["tokens_equal_ram"] for r in per),
        }
        for r in per:
            del r["ram_prefill_s"]
        for k in ("io", "io_scheduler", "tiers", "device_reads", "device_read_mib", "page_cache_mib_after_drop",
                  "page_cache_mib_after_run"):
            if k in per[0]:
                summary[name][k] = per[0][k]
    res["prefill"] = {"batch": [B, T], "batches": n_batches}
    res["decode"] = {"text": list(text.shape), "prompt": 64, "steps": args.new_tokens,
                     "generate_prompts": list(prompts.shape), "new_tokens": args.new_tokens}
    res["rounds"] = len(rounds)
    res["settle_s"] = args.settle
    res["backbone_shared"] = not args.separate_backbone
    res["summary"] = summary
    res["runs"] = rounds
    emit(res, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
