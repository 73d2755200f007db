"""A memory larger than RAM: an 8.6-billion-parameter Engram table on disk serves generation.

Builds a small LM (d=128, 2 layers) whose single Engram layer has a 32 GiB fp32 table
(16 heads x ~8.4M rows x d=64: 8.6e9 parameters; this machine has 24 GiB RAM), writes the
table to a store file with the crash-safe streaming writer, then generates from it through a
256 MiB LRU cache with the disk tier memory-mapped.

The rows are a cheap deterministic function of the row id (integer mixing, exact in fp32), so
correctness is checked without a second copy of the table: every generated token and every
logit must equal those of the same model reading the rows from that function directly
(`FunctionStore`), and a sample of rows read back from disk must equal the function.
Resident memory (anonymous and file-backed) is reported after generation.

The benchmark checks free disk space first and says plainly when it cannot run.

Run: .venv/bin/python benchmarks/bench_scale.py --dir /path/with/40GiB/free [--gib 32] [--keep]
"""

# Legend: B batch, T time, H hash heads, d row width, R table rows, N requested rows.

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM
from engram.serve.offload import OffloadedLM
from engram.store import DiskStore, RowStore, write_store
from engram.store.cache import CachedStore

from common import emit, machine_info

HEADS, D_ROW = 16, 64


def rows_of(ids_N: torch.Tensor) -> torch.Tensor:
    """Row values for flat ids: int64 mixing -> 16-bit integers -> fp32 in [-0.5, 0.5) (exact)."""
    j_d = torch.arange(D_ROW, dtype=torch.int64)
    h = ids_N.to(torch.int64).unsqueeze(1) * 0x9E3779B1 + j_d * 0x85EBCA6B
    h = (h ^ (h >> 15)) * 0x2C1B3C6D
    h = h ^ (h >> 13)
    return ((h & 0xFFFF).to(torch.float32) - 32768.0) / 65536.0


class FunctionStore(RowStore):
    """Rows computed from their ids (the reference the disk store must match)."""

    tier = "function"

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self._R = int(num_rows)

    num_rows = property(lambda self: self._R)
    dim = D_ROW
    dtype = torch.float32

    def gather(self, rows_N, out_Nd=None):
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        out_Nd.copy_(rows_of(rows_N))
        n = rows_N.numel()
        self._record(n, n, n, 0, 0)
        return out_Nd


def rss() -> dict:
    """Current resident memory split as the kernel reports it (GiB), and the peak."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = round(int(v.split()[0]) / 2**20, 3)
    out["peak_VmHWM"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def model_config(rows_per_head: int, vocab_size: int) -> ModelConfig:
    eng = EngramConfig(engram_vocab_size=[rows_per_head, rows_per_head], max_ngram_size=3,
                       n_embed_per_ngram=D_ROW * HEADS // 2, n_head_per_ngram=HEADS // 2, layer_ids=[1])
    return ModelConfig(vocab_size=vocab_size, d_model=128, n_layers=2, n_heads=4, mlp_hidden=384, max_seq_len=512,
                       engram=eng)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="scale-store", help="where to write the store (needs GIB + 2 GiB free)")
    ap.add_argument("--gib", type=float, default=32.0, help="table size on disk")
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the store file (default: delete it at the end)")
    ap.add_argument("--out")
    args = ap.parse_args()

    res: dict = {"benchmark": "scale", "machine": machine_info()}
    out_dir = Path(args.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_bytes = int(args.gib * 2**30)
    free = shutil.disk_usage(out_dir).free
    need = table_bytes + 2 * 2**30
    res["disk_free_gib"] = round(free / 2**30, 1)
    path = out_dir / "layer_1.engram"
    if free < need and not path.exists():
        res["skipped"] = (f"cannot run: {out_dir} has {free / 2**30:.1f} GiB free, the {args.gib:g} GiB table "
                          f"needs {need / 2**30:.1f} GiB")
        emit(res, args.out)
        print(res["skipped"], file=sys.stderr)
        return

    from engram.data import prepare_data
    from engram.tokenizer import CompressedVocab

    data = prepare_data(progress=False)
    vocab = CompressedVocab.from_pretrained(data.tokenizer_spec)
    rows_per_head = table_bytes // (4 * D_ROW * HEADS)
    cfg = model_config(rows_per_head, data.vocab_size)
    torch.manual_seed(0)
    model = EngramLM(cfg, vocab, tables=False).eval()  # the backbone only: the table lives on disk
    eng = next(b.engram for b in model.blocks if b.engram is not None)
    R = eng.num_rows
    res["table"] = {"rows": R, "dim": D_ROW, "dtype": "float32", "params": R * D_ROW,
                    "gib": round(R * D_ROW * 4 / 2**30, 2), "machine_ram_gib": res["machine"]["memory_gib"]}
    res["backbone_params"] = sum(p.numel() for p in model.parameters())

    expect = {"num_rows": R, "dim": D_ROW, "dtype": "float32"}
    reuse = False
    if path.exists():
        try:
            DiskStore.open(path, expect=expect).close()
            reuse = True
        except ValueError:
            path.unlink()
    if not reuse:
        t0 = time.perf_counter()
        piece = 1 << 20  # 256 MiB of rows per piece, generated on the fly: never the whole table in RAM
        pieces = (rows_of(torch.arange(a, min(a + piece, R))) for a in range(0, R, piece))
        write_store(path, pieces, num_rows=R, dim=D_ROW, dtype=torch.float32)
        dt = time.perf_counter() - t0
        res["write"] = {"seconds": round(dt, 1), "GBps": round(R * D_ROW * 4 / dt / 1e9, 3), "rss_after": rss()}
    else:
        res["write"] = "reused an existing valid store file"

    disk = DiskStore.open(path, expect=expect)
    try:
        g = torch.Generator().manual_seed(1)
        probe = torch.randint(0, R, (4096,), generator=g)
        res["rows_match_function"] = bool(torch.equal(disk.gather(probe), rows_of(probe)))
        disk.drop_page_cache()
        disk.reset_stats()
        cache = CachedStore(disk, args.cache_mib * 2**20, "lru")
        prompts = torch.from_numpy(np.asarray(data.val[:4 * 64], dtype=np.int64).reshape(4, 64))
        rss_before = rss()
        t0 = time.perf_counter()
        with OffloadedLM(model, {1: cache}, own_stores=False) as lm:
            out_disk = lm.generate(prompts, args.new_tokens, temperature=0)
            logits_disk = lm.forward(out_disk).logits
            tiers = lm.tier_stats()
        dt = time.perf_counter() - t0
        rss_after = rss()
        with OffloadedLM(model, {1: FunctionStore(R)}) as ref:
            out_ref = ref.generate(prompts, args.new_tokens, temperature=0)
            logits_ref = ref.forward(out_ref).logits
        res["generation"] = {
            "prompts": list(prompts.shape), "new_tokens": args.new_tokens, "seconds": round(dt, 2),
            "tokens_equal_reference": bool(torch.equal(out_disk, out_ref)),
            "logits_equal_reference": bool(torch.equal(logits_disk, logits_ref)),
            "tiers": tiers, "cache_mib": args.cache_mib,
            "rss_before_gib": rss_before, "rss_after_gib": rss_after,
        }
        res["page_cache_gib_after"] = round((disk.page_cache_bytes() or 0) / 2**30, 3)
        res["disk_io"] = disk.io  # "direct" (O_DIRECT via io_uring) or "mmap"
        res["passed"] = bool(res["rows_match_function"] and res["generation"]["tokens_equal_reference"]
                             and res["generation"]["logits_equal_reference"]
                             and rss_after["VmRSS"] < 4.0)
    finally:
        disk.close()
        if not args.keep:
            os.unlink(path)
    emit(res, args.out)


if __name__ == "__main__":
    main()
