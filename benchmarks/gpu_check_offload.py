"""The offload check of `gpu_check`: tables served from host memory or disk vs all tables on the device.

One model (d=256, 4 layers, one Engram layer of ``--table-gb`` GB of fp32 rows, random weights:
throughput does not depend on training) runs three ways on the same backbone on the device:
  * ``device``: the plain EngramLM, its table on the device (the reference);
  * ``host``: the table in host memory (pinned where CUDA) behind `OffloadedLM`'s prefetcher;
  * ``disk_cache10``: the table in an exported store on disk, a 10% LRU hot-row cache in front.
Prefill: batches of token ids through each, back to back in alternating order, every output
compared bit for bit with the reference's; ratio = reference time / offloaded time over all batches.
Decode: greedy `generate` of each, tokens compared, ratio of whole-run times. One warm-up batch and
generation first (CUDA start-up; the cache starts as serving would after them).
Skipped, with the reason, where host memory, disk or device memory cannot hold the table.

Legend: B batch, T time.
"""

from __future__ import annotations

import shutil
import time

HEADS = 16  # 2 orders x 8 heads
HEAD_DIM = 64  # n_embed_per_ngram 512 / 8 heads, fp32: 256 bytes a row


def _config(table_bytes: float, tiny: bool):
    from engram.config import EngramConfig, ModelConfig

    rows_per_head = max(64, int(table_bytes / (HEADS * HEAD_DIM * 4)))
    eng = EngramConfig(engram_vocab_size=[rows_per_head] * 2, n_embed_per_ngram=512, n_head_per_ngram=8,
                       layer_ids=[1], pad_id=0, conv_init="default", init_std=0.1)
    return ModelConfig(vocab_size=8192, d_model=64 if tiny else 256, n_layers=2 if tiny else 4, n_heads=4,
                       mlp_hidden=128 if tiny else 768, max_seq_len=512, engram=eng)


def _check_room(ctx, table_bytes: int, rec: dict) -> None:
    import torch

    from gpu_check import Skip, host_memory

    free_disk = shutil.disk_usage(ctx.workdir).free
    # Host: the model's table while it is built, a pinned copy (CUDA), the cache, the store's page cache.
    need_host = int(table_bytes * (2.3 if ctx.device.type == "cuda" else 1.3))
    avail = host_memory()["available"]
    rec.update(free_disk_bytes=free_disk, host_available_bytes=avail)
    if free_disk < 1.1 * table_bytes:
        raise Skip(f"the store needs {table_bytes / 1e9:.1f} GB of disk, {free_disk / 1e9:.1f} GB free in "
                   f"{ctx.workdir}")
    if avail is not None and avail < need_host:
        raise Skip(f"needs ~{need_host / 1e9:.1f} GB of host memory, {avail / 1e9:.1f} GB available")
    if ctx.device.type == "cuda":
        free_dev, _ = torch.cuda.mem_get_info(ctx.device)
        rec["device_free_bytes"] = free_dev
        if free_dev < table_bytes + 4e9:
            raise Skip(f"needs ~{(table_bytes + 4e9) / 1e9:.1f} GB of device memory, {free_dev / 1e9:.1f} GB free")


def _timed(fn, device):
    from gpu_check import synchronize

    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def _compare(ref, off, batches, prompt_BT, n_new: int, device, rounds: int) -> dict:
    """Prefill and decode of ``off`` against ``ref``: equal outputs (AssertionError if not), time ratios."""
    import torch

    from engram.model.generation import generate

    with torch.no_grad():
        ref(batches[0]), off(batches[0])  # warm-up
        generate(ref, prompt_BT, 2, temperature=0), off.generate(prompt_BT, 2, temperature=0)
        t_ref = t_off = 0.0
        for r in range(rounds):
            for i, x_BT in enumerate(batches):
                pair = ((ref, "ref"), (off, "off")) if (i + r) % 2 == 0 else ((off, "off"), (ref, "ref"))
                got = {}
                for m, tag in pair:
                    got[tag], dt = _timed(lambda m=m, x_BT=x_BT: m(x_BT).logits, device)
                    t_ref, t_off = (t_ref + dt, t_off) if tag == "ref" else (t_ref, t_off + dt)
                if not torch.equal(got["ref"], got["off"]):
                    diff = float((got["ref"] - got["off"]).abs().max())
                    raise AssertionError(f"prefill batch {i}: logits differ from the device model's (max {diff:.3g})")
        g_ref = g_off = 0.0
        for r in range(rounds):
            order = ("ref", "off") if r % 2 == 0 else ("off", "ref")
            toks = {}
            for tag in order:
                fn = ((lambda: generate(ref, prompt_BT, n_new, temperature=0)) if tag == "ref" else
                      (lambda: off.generate(prompt_BT, n_new, temperature=0)))
                toks[tag], dt = _timed(fn, device)
                g_ref, g_off = (g_ref + dt, g_off) if tag == "ref" else (g_ref, g_off + dt)
            if not torch.equal(toks["ref"], toks["off"]):
                raise AssertionError("greedy decode tokens differ from the device model's")
    n_tok = sum(x.numel() for x in batches) * rounds
    n_dec = prompt_BT.shape[0] * n_new * rounds
    return {"outputs_equal": True, "prefill_tokens_per_s": n_tok / t_off, "prefill_vs_device": t_ref / t_off,
            "decode_tokens_per_s": n_dec / g_off, "decode_vs_device": g_ref / g_off,
            "device_prefill_tokens_per_s": n_tok / t_ref, "device_decode_tokens_per_s": n_dec / g_ref}


def check_offload(ctx, rec: dict) -> None:
    import torch

    from engram.model import EngramLM
    from engram.serve import OffloadedLM, export_tables
    from engram.serve.export import open_store_dir
    from engram.store.base import RamStore
    from engram.store.cache import CachedStore
    from engram.tokenizer import CompressedVocab

    cfg = _config(ctx.table_gb * 1e9, ctx.tiny)
    vocab = CompressedVocab(torch.arange(cfg.vocab_size).numpy())
    rows = cfg.engram.engram_vocab_size[0] * HEADS  # before prime rounding, for the room check
    _check_room(ctx, rows * HEAD_DIM * 4, rec)
    root = ctx.scratch("offload")
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = EngramLM(cfg, vocab).eval()
        engrams = {blk.layer: blk.engram for blk in model.blocks if blk.engram is not None}
        table_bytes = sum(e.num_rows * e.head_dim * 4 for e in engrams.values())
        rec.update(table_bytes=table_bytes, d_model=cfg.d_model, n_layers=cfg.n_layers,
                   build_s=time.perf_counter() - t0)
        t0 = time.perf_counter()
        store_dir = export_tables(model, root / "store")
        rec["export_s"] = time.perf_counter() - t0
        host = {lay: RamStore(e.table.weight.detach(), pin=True) for lay, e in engrams.items()}
        rec["host_pinned"] = all(s.pinned for s in host.values())
        model.to(ctx.device)
        g = torch.Generator().manual_seed(1)
        B, T, n_batches = (2, 64, 2) if ctx.tiny else (8, 512, 8)
        batches = [torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(ctx.device) for _ in range(n_batches)]
        prompt_BT = torch.randint(0, cfg.vocab_size, (4, 32), generator=g).to(ctx.device)
        n_new, rounds = (8, 1) if ctx.tiny else (64, 2)
        rec.update(prefill_batch=[B, T], prefill_batches=n_batches, decode_batch=4, new_tokens=n_new, rounds=rounds)
        with OffloadedLM(model, host) as off:
            rec["host"] = _compare(model, off, batches, prompt_BT, n_new, ctx.device, rounds)
        disk = open_store_dir(store_dir, model)
        try:
            budget = table_bytes // 10
            cached = {lay: CachedStore(s, budget * s.num_rows // sum(d.num_rows for d in disk.values()), policy="lru")
                      for lay, s in disk.items()}
            with OffloadedLM(model, cached) as off:
                off.drop_page_cache()
                rec["disk_cache10"] = _compare(model, off, batches, prompt_BT, n_new, ctx.device, rounds)
                rec["disk_cache10"]["tiers"] = off.tier_stats()
                rec["disk_cache10"]["io"] = [getattr(s, "io", None) for s in disk.values()]
        finally:
            for s in disk.values():
                s.close()
        worst = min(rec[k][f"{p}_vs_device"] for k in ("host", "disk_cache10") for p in ("prefill", "decode"))
        rec.update(worst_ratio=worst, target=0.97, meets_target=worst >= 0.97)
    finally:
        shutil.rmtree(root, ignore_errors=True)
