"""Sharded Engram tables on torch.distributed: exchange cost, training throughput, and a scaling model.

Parts (JSON out, machine info recorded):
  * exchange: one Engram layer's row exchange alone, ``all_to_all`` vs ``masked``, forward and
    forward+backward, over ids per rank from 256 to 128k (uniform ids: every id distinct, the worst
    case), on 2 ranks: time, bytes sent per rank, collectives; a least-squares fit of the all-to-all
    time to ``alpha * collectives + beta * bytes`` (this machine's per-message and per-byte costs);
  * train: the demo model (MoE backbone + one Engram layer, real stdlib-corpus batches, global batch
    32 x 128) trained on 1 process (tables local) and on 2 ranks (DDP backbone, tables row-sharded),
    tokens/s of each, all-to-all bytes per token, and the share of the step spent inside the exchange
    collectives (waiting for the slower peer included);
  * big: a table 4x larger than one rank's memory budget, sharded over 4 ranks (the smallest world the
    budget admits: 2 ranks are refused before any work, the message is recorded), trained a few steps:
    tokens/s, bytes per token, peak RSS of every rank against the table size;
  * scaling: the written model (see RESULTS.md) for a 100B-parameter table at 8, 64 and 512 ranks from
    the measured bytes per token and stated link figures.

Ranks run as real processes under ``torch.distributed.run`` (gloo). On a 2-core machine 2 ranks get one
core each (the 1-process baseline gets both); 4 ranks oversubscribe it, so the big part's tokens/s
is a lower bound and its bytes and RSS are what it shows.

Run: .venv/bin/python benchmarks/bench_distributed.py [--quick] [--out FILE]
"""

# Legend: W world size, N ids per rank, d row width, H hash heads, B batch, T time.

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------- workers
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gib() -> float:
    """Resident memory now (VmRSS), to tell the tables' share of the peak from the process's base."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _gather_to_rank0(obj):
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def worker_exchange(args) -> dict:
    import torch
    import torch.distributed as dist

    from engram.distributed import ExchangeStats, ShardedMemory

    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    H, d, per_head = 16, 32, 100003
    heads = (per_head,) * H
    results = []
    for N in args.ids:
        rec = {"ids_per_rank": N}
        for form in ("all_to_all", "masked"):
            torch.manual_seed(rank)
            mem = ShardedMemory({1: heads}, d, torch.float32, group=None, exchange=form)
            with torch.no_grad():
                mem.shard(1).normal_()
            rows_BTH = torch.randint(0, per_head, (N // H, 1, H))
            stats = ExchangeStats()
            mem.stats = stats

            def fwd(mem=mem, rows_BTH=rows_BTH):
                with torch.no_grad():
                    mem.rows(1, rows_BTH)

            def fwd_bwd(mem=mem, rows_BTH=rows_BTH):
                mem.rows(1, rows_BTH).sum().backward()
                mem.shard(1).grad = None

            for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                fn()
                dist.barrier()
                stats.reset()
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                times.sort()
                rec[f"{form}_{name}_s"] = times[len(times) // 2]
                rec[f"{form}_{name}_bytes"] = stats.bytes_sent // args.reps
                rec[f"{form}_{name}_collectives"] = stats.collectives // args.reps
                rec[f"{form}_{name}_comm_s"] = stats.seconds / args.reps  # inside the collectives only
        results.append(rec)
    out = _gather_to_rank0(results)
    dist.destroy_process_group()
    return {"world": W, "row_bytes": d * 4, "heads": H, "per_rank": out}


def _demo_cfg():
    from engram.train.config import run_preset

    cfg = run_preset("demo")
    return cfg


def worker_train(args) -> dict:
    """Train the demo model for args.steps steps on 1 process (no env) or W ranks (torchrun env)."""
    import torch
    import torch.distributed as dist

    from engram.data import BatchSampler, prepare_data
    from engram.distributed import ShardedMemory, check_budget
    from engram.model import EngramLM
    from engram.optim import SparseRowAdam
    from engram.optim.sparse_adam import clip_grad_norm_
    from engram.tokenizer import CompressedVocab

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    W = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    cfg = _demo_cfg()
    data = prepare_data(None, None, vocab_size=8192, progress=False)
    cfg.model.vocab_size = data.vocab_size
    cfg.model.engram.pad_id = data.pad_id
    if args.big:
        per_head = args.big_rows // 16
        cfg.model.engram.engram_vocab_size = [per_head, per_head]
    vocab = CompressedVocab.from_pretrained(data.tokenizer_spec)
    torch.manual_seed(0)
    budget_msg = None
    rss_before = _rss_gib()  # interpreter, torch, corpus: what every rank holds before any table
    if args.big:  # never build the whole table: the model without tables, shards initialised in place
        model = EngramLM(cfg.model, vocab, tables=False)
        heads = {lay: tuple(model.hasher.head_sizes(lay)) for lay in cfg.model.engram.layer_ids}
        dim = cfg.model.engram.n_embed_per_ngram // cfg.model.engram.n_head_per_ngram
        table_bytes = sum(sum(h) for h in heads.values()) * dim * 4
        budget = table_bytes // 4 + (1 << 20)
        if rank == 0:
            try:
                check_budget(heads, dim, torch.float32, 2, budget)
            except ValueError as e:
                budget_msg = str(e)
        check_budget(heads, dim, torch.float32, W, budget)
        mem = ShardedMemory(heads, dim, torch.float32)
        g = torch.Generator().manual_seed(1000 + rank)
        with torch.no_grad():
            for p in mem.shards.values():
                p.normal_(0.0, cfg.model.engram.init_std, generator=g)
        model.set_memory(mem)
    else:
        model = EngramLM(cfg.model, vocab)
        table_bytes = sum(p.numel() * p.element_size() for p in model.engram_parameters())
        mem = ShardedMemory.from_model(model) if distributed else None
    tables = list(mem.shards.values()) if mem is not None else model.engram_parameters()
    backbone = model.backbone_parameters()
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    tc = cfg.train
    opt = torch.optim.AdamW(backbone, lr=tc.lr, betas=(tc.beta1, tc.beta2))
    topt = SparseRowAdam(tables, lr=tc.lr * tc.engram_lr_mult, betas=(tc.beta1, tc.beta2))
    sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=0)
    b = tc.batch_size // W
    step_s, exch_s, exch_bytes = [], [], []
    for step in range(args.warmup + args.steps):
        x, y = sampler.next()
        x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
        if mem is not None:
            mem.stats.reset()
        t0 = time.perf_counter()
        out = net(x, y)
        loss = out.loss + cfg.model.router_aux_coef * out.aux_loss
        loss.backward()
        clip_grad_norm_(backbone + tables, tc.grad_clip)  # local norm: the cost, not the exact semantics
        opt.step()
        topt.step()
        model.zero_grad(set_to_none=True)
        for p in tables:
            p.grad = None
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            step_s.append(dt)
            if mem is not None:
                exch_s.append(mem.stats.seconds)
                exch_bytes.append(mem.stats.bytes_sent)
    tokens = tc.batch_size * tc.seq_len
    rec = {"rank": rank, "step_s": step_s, "exchange_s": exch_s, "exchange_bytes": exch_bytes,
           "peak_rss_gib": round(_peak_rss_gib(), 3), "rss_before_tables_gib": round(rss_before, 3),
           "threads": torch.get_num_threads(),
           "shard_gib": round((mem.nbytes if mem is not None else table_bytes) / 2**30, 3)}
    per_rank = _gather_to_rank0(rec)
    if distributed:
        dist.destroy_process_group()
    med = sorted(max(r["step_s"][i] for r in per_rank) for i in range(args.steps))[args.steps // 2]
    res = {"world": W, "global_tokens_per_step": tokens, "median_step_s": med,
           "tokens_per_s": tokens / med, "table_gib": round(table_bytes / 2**30, 3), "per_rank": per_rank}
    if mem is not None:
        tot_bytes = sum(sum(r["exchange_bytes"]) for r in per_rank)
        res["exchange_bytes_per_token"] = tot_bytes / (tokens * args.steps)
        shares = [sum(r["exchange_s"]) / sum(r["step_s"]) for r in per_rank]
        res["exchange_share_of_step"] = [round(s, 4) for s in shares]
    if budget_msg:
        res["two_ranks_refused"] = budget_msg
    return res


# ---------------------------------------------------------------------------------------- driver
def _launch(part: str, world: int, extra: list[str], timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        base = [sys.executable]
        if world > 0:
            base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        cmd = [*base, str(Path(__file__).resolve()), "--worker", part, "--worker-out", str(out), *extra]
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{part} on {world} rank(s) failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def fit_alpha_beta(exchange: dict) -> dict:
    """Least squares of the time inside the forward all-to-alls on (collectives, bytes), over sizes and ranks."""
    import numpy as np

    rows = [(r["all_to_all_fwd_collectives"], r["all_to_all_fwd_bytes"], r["all_to_all_fwd_comm_s"])
            for recs in exchange["per_rank"] for r in recs]
    A = np.array([[c, b] for c, b, _ in rows], dtype=float)
    t = np.array([s for *_, s in rows])
    (alpha, beta), *_ = np.linalg.lstsq(A, t, rcond=None)
    return {"alpha_s_per_collective": float(alpha), "beta_s_per_byte": float(beta),
            "bandwidth_GBps": (1 / beta / 1e9) if beta > 0 else None}


# Stated link figures for the scaling model (per GPU, one direction).
LINKS = {
    "nvlink_h100": {"GBps": 450.0, "latency_us": 3.0, "note": "NVLink 4 (H100 SXM, 900 GB/s bidirectional)"},
    "ib_400g": {"GBps": 50.0, "latency_us": 5.0, "note": "400 Gb/s InfiniBand NDR, one NIC per GPU"},
}


def scaling_model(unique_frac: float, fit: dict | None = None) -> list[dict]:
    """Expected exchange cost for a 100B-parameter table at 8, 64, 512 ranks (see RESULTS.md for the text).

    Assumptions (stated, not measured): a 27B-total / 3.8B-activated MoE backbone (the paper's Engram-27B
    class) at 40% MFU of an H100's 989 dense bf16 TFLOP/s; 2 Engram layers, H = 16 heads each (orders 2-3,
    8 heads per order), bf16 rows of d = 160 (100B parameters over 2 layers = 312.5M rows per layer);
    8192 tokens per rank per step; a fraction ``unique_frac`` of a rank's ids distinct (measured on the
    stdlib corpus at this batch size); the ids not owned by the rank cross the network ((W-1)/W of them).
    Bytes per token per layer: forward 8 B id + 2d B row per distinct remote id, backward 4d B (fp32 grad).
    Collectives per step per layer: 3 forward (counts, ids, rows) + 1 backward; each all-to-all costs its
    ranks (W - 1) message latencies in the worst case (sequential sends) or one (fully pipelined): both
    bounds are given. Intra-node (8 ranks) uses NVLink; 64 and 512 ranks cross InfiniBand, where the
    per-GPU NIC is the bottleneck. With ``fit`` (this machine's measured gloo costs) the same traffic is
    also priced at those costs, to show what the stated links buy.
    """
    d, H, layers, tokens = 160, 16, 2, 8192
    act = 3.8e9
    compute_s = 6 * act * tokens / (989e12 * 0.40)
    out = []
    measured = None
    if fit and fit.get("bandwidth_GBps"):
        measured = {"GBps": fit["bandwidth_GBps"], "latency_us": fit["alpha_s_per_collective"] * 1e6,
                    "note": "gloo over loopback on this machine (measured, 2 ranks)"}
    for W, link in [(8, LINKS["nvlink_h100"]), (64, LINKS["ib_400g"]), (512, LINKS["ib_400g"])] + \
            ([(W, measured) for W in (8, 64, 512)] if measured else []):
        remote = (W - 1) / W
        per_token = layers * H * unique_frac * remote * (8 + 2 * d + 4 * d)
        nbytes = per_token * tokens
        msgs = layers * 4
        lat_lo = msgs * link["latency_us"] * 1e-6
        lat_hi = msgs * (W - 1) * link["latency_us"] * 1e-6
        t_bytes = nbytes / (link["GBps"] * 1e9)
        out.append({"ranks": W, "link": link["note"], "bytes_per_token": round(per_token, 1),
                    "bytes_per_rank_step_MB": round(nbytes / 1e6, 2), "collectives_per_step": msgs,
                    "messages_per_rank_step": msgs * (W - 1), "compute_step_s": round(compute_s, 4),
                    "exchange_s": [round(t_bytes + lat_lo, 5), round(t_bytes + lat_hi, 5)],
                    "share_of_step_unoverlapped": [round((t_bytes + lat_lo) / compute_s, 4),
                                                   round((t_bytes + lat_hi) / compute_s, 4)]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and steps (a smoke run)")
    ap.add_argument("--out")
    ap.add_argument("--parts", nargs="+", default=["exchange", "train", "big"])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--ids", type=int, nargs="+", default=[256, 2048, 16384, 131072], help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=7, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=12, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--big", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--big-rows", type=int, default=16 * 1_000_003, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = {"exchange": worker_exchange, "train": worker_train}[args.worker](args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.worker_out).write_text(json.dumps(res))
        return

    sys.path.insert(0, str(HERE))
    from common import emit, machine_info

    q = args.quick
    result: dict = {"machine": machine_info(), "quick": q}
    ids = ["--ids", *(["256", "4096"] if q else [str(n) for n in args.ids]), "--reps", "3" if q else "7"]
    steps = ["--steps", "3" if q else str(args.steps), "--warmup", "1" if q else str(args.warmup)]
    if "exchange" in args.parts:
        ex = _launch("exchange", 2, ids, 900)
        result["exchange"] = ex
        result["fit_all_to_all"] = fit_alpha_beta(ex)
    if "train" in args.parts:
        one = _launch("train", 0, steps, 1800)
        two = _launch("train", 2, steps, 1800)
        result["train"] = {"one_process": one, "two_ranks": two,
                           "two_vs_one_tokens_per_s": round(two["tokens_per_s"] / one["tokens_per_s"], 3)}
    if "big" in args.parts:
        rows = str(16 * 200_003) if q else str(args.big_rows)
        result["big"] = _launch("train", 4, [*steps, "--big", "--big-rows", rows], 3600)
    uf = {"16x128": measure_unique_fraction(16, 128), "64x128": measure_unique_fraction(64, 128)}
    result["unique_fraction"] = uf
    fit = result.get("fit_all_to_all")
    result["scaling_model_100B"] = scaling_model(uf["64x128"], fit)
    emit(result, args.out)


def measure_unique_fraction(batch: int = 64, seq: int = 128) -> float:
    """Distinct (layer-0 row id) fraction of the demo model's hashed ids over real batches of ``batch x seq``."""
    import torch

    from engram.data import BatchSampler, prepare_data
    from engram.hashing import NgramHasher
    from engram.tokenizer import CompressedVocab

    cfg = _demo_cfg()
    data = prepare_data(None, None, vocab_size=8192, progress=False)
    cfg.model.engram.pad_id = data.pad_id
    vocab = CompressedVocab.from_pretrained(data.tokenizer_spec)
    hasher = NgramHasher.from_config(cfg.model.engram, vocab)
    sampler = BatchSampler(data.train, batch, seq, seed=0)
    fr = []
    for _ in range(4):
        x, _ = sampler.next()
        comp = torch.from_numpy(vocab.lookup)[x.long()]
        for r_BTH in hasher.hash(comp).values():
            flat = r_BTH.reshape(-1, r_BTH.shape[-1])
            H = flat.shape[1]
            u = sum(int(torch.unique(flat[:, h]).numel()) for h in range(H))
            fr.append(u / flat.numel())
    return round(sum(fr) / len(fr), 4)


if __name__ == "__main__":
    main()
