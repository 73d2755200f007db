"""Peak resident memory per rank when an Engram table is served row-sharded, vs the whole table in one process.

Model: d_model 64, 2 layers, one Engram layer (orders 2-3, 4 heads each, d=64 fp32 rows of 256 bytes),
its table sized by ``--table-gib`` (default 1 GiB), random rows written straight to a store directory (the
model directory holds the backbone only), so no process of the benchmark ever builds the table in RAM.

Runs, each in fresh processes (one thread each), evaluating the same random token batches:
  * single: ``open_memory(model_dir, "ram", store_dir)``, the whole table in RAM (the baseline);
  * sharded on W ranks (``--worlds``, default 2 and 4; gloo over loopback) with a per-rank budget of
    1/W of the table plus 1% (``load_sharded(..., budget_bytes=...)``): each rank reads only its rows.
Each process reports its RSS before loading (the interpreter, torch, the backbone) and its peak RSS
(``getrusage`` maxrss, gathered to rank 0), and the loss, which must equal the single process's bit for
bit. The JSON also records the refusal a world too small for the budget gets (``check_budget``).

    PYTHONPATH=src python benchmarks/bench_sharded_serving.py --out benchmarks/results/sharded_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BATCHES, B, T = 4, 4, 64


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _batches(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
            for _ in range(BATCHES)]


def build(root: Path, table_gib: float) -> dict:
    """A backbone-only model directory and a store of a random ``table_gib`` table, written in pieces."""
    import numpy as np
    import torch

    from engram.config import EngramConfig, ModelConfig
    from engram.model import EngramLM
    from engram.serve.export import layer_file, layer_meta, write_manifest
    from engram.store.base import write_store
    from engram.tokenizer.compression import CompressedVocab

    d, heads = 64, 8  # 2 orders x 4 heads, rows of d fp32
    per_head = int(table_gib * 2**30 / (heads * d * 4))
    eng = EngramConfig(engram_vocab_size=[per_head, per_head], n_embed_per_ngram=d * 4, n_head_per_ngram=4,
                       layer_ids=[1], pad_id=0)
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, max_seq_len=T, engram=eng)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedVocab(np.arange(512) % 400), tables=False)
    model.save_pretrained(root / "model")
    e = model.blocks[1].engram
    export_id = uuid.uuid4().hex
    g = torch.Generator().manual_seed(1)
    step = (64 << 20) // (d * 4)
    pieces = (torch.randn(min(step, e.num_rows - a), d, generator=g) for a in range(0, e.num_rows, step))
    (root / "store").mkdir()
    write_store(root / "store" / layer_file(1), pieces, num_rows=e.num_rows, dim=d, dtype=torch.float32,
                meta=layer_meta(model, 1, export_id))
    write_manifest(root / "store", model, export_id)
    return {"rows": e.num_rows, "dim": d, "table_bytes": e.num_rows * d * 4, "head_sizes": list(e.head_sizes)}


def role_single(root: Path, out: Path) -> None:
    import torch

    from engram.serve import open_memory

    torch.set_num_threads(1)
    rss0 = _rss_now()
    t0 = time.perf_counter()
    with open_memory(root / "model", "ram", root / "store", prefetch=False) as lm:
        load_s, rss1 = time.perf_counter() - t0, _rss_now()
        loss = lm.evaluate(_batches(lm.cfg.vocab_size))
    out.write_text(json.dumps({"rss_before_load": rss0, "rss_after_load": rss1, "rss_after_eval": _rss_now(),
                               "peak_rss": _peak(), "load_s": load_s, "loss": loss}))


def role_rank(root: Path, out: Path, budget: int) -> None:
    import torch
    import torch.distributed as dist

    from engram.distributed.serve import init_from_env, load_sharded, shutdown

    torch.set_num_threads(1)
    rank, world = init_from_env()
    rss0 = _rss_now()
    t0 = time.perf_counter()
    lm = load_sharded(root / "model", root / "store", budget_bytes=budget)
    load_s, rss1 = time.perf_counter() - t0, _rss_now()
    loss = lm.evaluate(_batches(lm.cfg.vocab_size))
    mine = {"rank": rank, "rss_before_load": rss0, "rss_after_load": rss1, "rss_after_eval": _rss_now(),
            "peak_rss": _peak(), "load_s": load_s, "loss": loss,
            "shard_bytes": lm.memory.nbytes, "exchange": lm.memory.stats.as_dict()}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        out.write_text(json.dumps(every))
    shutdown()


def _launch(world: int, argv: list[str], timeout: float = 900) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(argv, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    try:
        for p in procs:
            if p.wait(timeout=timeout) != 0:
                raise SystemExit(f"a rank of {world} failed with exit status {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-gib", type=float, default=1.0)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dir", help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--role", choices=["single", "rank"], help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "single":
        return role_single(Path(args.dir), Path(args.result))
    if args.role == "rank":
        return role_rank(Path(args.dir), Path(args.result), args.budget)

    import torch

    from engram.config import ConfigError
    from engram.distributed import check_budget

    from common import emit, machine_info

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-sharded-"))
    me = [sys.executable, str(Path(__file__).resolve()), "--dir", str(root)]
    try:
        t0 = time.perf_counter()
        table = build(root, args.table_gib)
        res = {"benchmark": "sharded_serving", "machine": machine_info(), "table": table,
               "build_s": time.perf_counter() - t0, "batches": [BATCHES, B, T]}
        subprocess.run([*me, "--role", "single", "--result", str(root / "single.json")], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        res["single"] = json.loads((root / "single.json").read_text())
        res["sharded"] = {}
        for world in args.worlds:
            budget = int(table["table_bytes"] / world * 1.01)
            _launch(world, [*me, "--role", "rank", "--budget", str(budget), "--result", str(root / f"w{world}.json")])
            ranks = json.loads((root / f"w{world}.json").read_text())
            res["sharded"][str(world)] = {
                "budget_bytes": budget, "table_over_budget": table["table_bytes"] / budget, "ranks": ranks,
                "max_peak_rss": max(r["peak_rss"] for r in ranks),
                "max_peak_rss_over_table": max(r["peak_rss"] for r in ranks) / table["table_bytes"],
                "max_load_delta_over_table": max(r["peak_rss"] - r["rss_before_load"] for r in ranks)
                / table["table_bytes"],
                "loss_equal_single": all(r["loss"] == res["single"]["loss"] for r in ranks)}
        w = max(args.worlds)
        budget = int(table["table_bytes"] / w * 1.01)
        try:
            check_budget({1: table["head_sizes"]}, table["dim"], torch.float32, 2, budget)
            res["refusal"] = None
        except ConfigError as e:
            res["refusal"] = {"world": 2, "budget_bytes": budget, "message": str(e)}
        emit(res, args.out)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
