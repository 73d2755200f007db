"""Training-step cost of Engram memory: table size, Engram overhead, and the largest memory.

Measures (issue targets in brackets), all on the real stdlib corpus with the trainer's own step
(autocast dtype `--dtype`, default auto, AdamW backbone, sparse-row Adam on the tables, gradient clipping):
  * rows_ratio: step time with a memory of 64M rows / with 1M rows, same row width (d=16)
    [<= 1.10; a dense optimizer would touch every row every step];
  * overhead: tokens/s of the backbone + Engram / tokens/s of the same backbone alone [>= 0.95],
    timed as `--pairs` strictly alternating single steps (this shared machine's step time drifts by
    +-15% within minutes; adjacent steps see the same drift): the median of the per-pair ratios with a
    bootstrap 95% interval, and the ratio of the two medians; plus a bottom-up check, each Engram
    part of the step timed alone (hashing, gather + backward, gradient coalescing, sparse-row Adam,
    the post-lookup math fwd+bwd, compiled and eager) and summed relative to the plain step;
  * largest: the 64M-row memory is 1.07 billion parameters (4 GiB fp32 + 8 GiB Adam state)
    next to a backbone of ~12M parameters [>= 1B at unchanged step time]; peak RSS is reported.

Run: .venv/bin/python benchmarks/bench_train_speed.py [--quick] [--out results.json]
"""

# Legend: B batch, T time; rows = table rows per Engram layer (all heads), d = row width.

from __future__ import annotations

import argparse
import copy
import gc
import resource
import tempfile
import time

import numpy as np

from engram.config import EngramConfig, ModelConfig
from engram.train.config import RunConfig, TrainConfig

from common import emit, machine_info, median_ci


def backbone(engram: EngramConfig | None) -> ModelConfig:
    return ModelConfig(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, mlp_hidden=768, max_seq_len=256,
                       engram=engram)


def memory(rows_total: int, d: int = 16, heads: int = 8) -> EngramConfig:
    """One Engram layer (layer 1), orders 2..3, `heads` heads per order, ~rows_total rows in all."""
    per_head = rows_total // (2 * heads)
    return EngramConfig(engram_vocab_size=[per_head, per_head], n_embed_per_ngram=d * heads, n_head_per_ngram=heads,
                        layer_ids=[1])


class Run:
    """One trainer, stepped on demand, so configs can be timed in alternation."""

    def __init__(self, model_cfg: ModelConfig, data, dtype: str = "auto") -> None:
        from engram.train.trainer import Trainer

        cfg = RunConfig(model=copy.deepcopy(model_cfg),
                        train=TrainConfig(steps=10**6, batch_size=16, seq_len=256, warmup_steps=5,
                                          eval_every=10**9, ckpt_every=10**9, eval_tokens=4096, dtype=dtype))
        t0 = time.perf_counter()
        self._dir = tempfile.TemporaryDirectory()
        self.tr = Trainer(cfg, self._dir.name, data=data, progress=False)
        self.build_s = time.perf_counter() - t0
        self.times: list[float] = []

    def steps(self, n: int, record: bool = True) -> None:
        tr = self.tr
        for _ in range(n):
            x, y = tr.sampler.next()
            t = time.perf_counter()
            tr._train_step(x, y)
            dt = time.perf_counter() - t
            tr.step += 1
            if record:
                self.times.append(dt)

    def result(self) -> dict:
        mem_params = sum(p.numel() for p in self.tr.model.engram_parameters())
        total = sum(p.numel() for p in self.tr.model.parameters())
        med = float(np.median(self.times))
        return {"memory_params": mem_params, "backbone_params": total - mem_params, "steps_timed": len(self.times),
                "median_step_s": round(med, 4), "tokens_per_s": round(16 * 256 / med, 1),
                "build_s": round(self.build_s, 1)}

    def close(self) -> None:
        del self.tr
        gc.collect()
        self._dir.cleanup()


def paired_ratio(a_s: list[float], b_s: list[float], seed: int = 0) -> dict:
    """tokens/s of B / tokens/s of A from step times measured in alternation: per-pair ratios
    ``a_i / b_i``, their median with a bootstrap 95% interval, and the ratio of the medians."""
    ci = median_ci(np.asarray(a_s) / np.asarray(b_s), seed)
    return {"median_of_pair_ratios": ci["median"], "ci95": ci["ci95"],
            "ratio_of_medians": round(float(np.median(a_s) / np.median(b_s)), 3), "pairs": ci["pairs"]}


def engram_parts(cfg: ModelConfig, data, dtype: str, repeat: int = 9) -> dict:
    """Milliseconds per training step of each Engram part, timed alone on a real batch."""
    import torch

    from engram.optim.sparse_adam import coalesce_

    run = Run(cfg, data, dtype)
    try:
        tr = run.tr
        run.steps(2, record=False)
        eng = next(blk.engram for blk in tr.model.blocks if blk.engram is not None)
        x, _ = tr.sampler.next()
        rows = tr.model.engram_rows(x)
        rows_BTH = rows[next(iter(rows))]
        W = eng.table.weight

        def gather_bwd():
            W.grad = None
            e = eng.table(rows_BTH)
            e.backward(torch.ones_like(e))

        gather_bwd()
        raw = W.grad

        def coalesce():
            W.grad = raw
            coalesce_(W)

        coalesce()
        coalesced = W.grad
        W.grad = None

        def table_opt():
            W.grad = coalesced
            tr.table_opt.step()

        B, T = x.shape
        h = torch.randn(B, T, cfg.hc_mult, cfg.d_model, requires_grad=True)
        emb = eng.table(rows_BTH).detach()

        def mix(compiled: bool):
            eng.compiled_mix = compiled
            with tr._autocast():
                inc = eng(h, emb=emb)
            inc.float().sum().backward()

        parts = {"hash_ms": lambda: tr.model.engram_rows(x), "gather_fwd_bwd_ms": gather_bwd,
                 "coalesce_ms": coalesce, "sparse_adam_ms": table_opt,
                 "mix_fwd_bwd_compiled_ms": lambda: mix(True), "mix_fwd_bwd_eager_ms": lambda: mix(False)}
        times: dict[str, list[float]] = {k: [] for k in parts}
        for rep in range(repeat + 1):  # round-robin over the parts, so drift hits all alike; rep 0 warms up
            for k, fn in parts.items():
                t0 = time.perf_counter()
                fn()
                if rep:
                    times[k].append(time.perf_counter() - t0)
        out = {k: round(float(np.median(v)) * 1e3, 2) for k, v in times.items()}
        out["unique_rows"] = int(coalesced._values().shape[0])
        return out
    finally:
        run.close()


def alternate(cfgs: dict[str, ModelConfig], data, rounds: int, per_round: int, warmup: int,
              dtype: str = "auto") -> dict[str, dict]:
    """Time the configs in alternation (round-robin, `per_round` steps each) so that drift in
    machine load hits all of them alike; medians over all timed steps."""
    runs = {name: Run(c, data, dtype) for name, c in cfgs.items()}
    try:
        for r in runs.values():
            r.steps(warmup, record=False)
        for _ in range(rounds):
            for r in runs.values():
                r.steps(per_round)
        out = {name: {**r.result(), "times": list(r.times)} for name, r in runs.items()}
    finally:
        for r in runs.values():
            r.close()
    for v in out.values():
        v["peak_rss_gib_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M vs 4M rows, few steps (smoke test)")
    ap.add_argument("--rounds", type=int, default=6,
                    help="alternating rounds of the 1M-vs-64M-row pair (3 timed steps per config each)")
    ap.add_argument("--pairs", type=int, default=40, help="alternating single-step pairs for the overhead ratio")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="autocast dtype")
    ap.add_argument("--out")
    args = ap.parse_args()
    from engram.data import prepare_data
    from engram.train.trainer import resolve_dtype

    data = prepare_data(progress=False)
    rounds, per_round, warmup = (2, 1, 1) if args.quick else (args.rounds, 3, 2)
    big = 4 * 2**20 if args.quick else 64 * 2**20
    res = {"benchmark": "train_speed", "machine": machine_info(), "batch": [16, 256],
           "dtype": resolve_dtype(args.dtype), "compile_engram": TrainConfig().compile_engram,
           "timing": f"alternating rounds: {rounds} x {per_round} steps per config after {warmup} warm-up steps"}
    # Engram overhead: the same backbone with and without a 1M-row memory, single steps in alternation.
    pair = alternate({"no_engram": backbone(None), "rows_1M": backbone(memory(2**20))}, data,
                     2 if args.quick else args.pairs, 1, warmup, res["dtype"])
    plain, small = pair["no_engram"], pair["rows_1M"]
    overhead = paired_ratio(plain.pop("times"), small.pop("times"))
    # Table size: 1M vs 64M rows (same width), timed in alternation.
    pair = alternate({"rows_1M": backbone(memory(2**20)), "rows_big": backbone(memory(big))}, data, rounds,
                     per_round, warmup, res["dtype"])
    small2, large = pair["rows_1M"], pair["rows_big"]
    small2.pop("times"), large.pop("times")
    res["no_engram"], res["rows_1M"], res["rows_1M_second_pair"] = plain, small, small2
    res[f"rows_{big >> 20}M"] = large
    res["overhead"] = overhead
    res["overhead_ratio"] = overhead["median_of_pair_ratios"]
    res["overhead_target_met"] = res["overhead_ratio"] >= 0.95
    parts = engram_parts(backbone(memory(2**20)), data, res["dtype"], repeat=3 if args.quick else 9)
    step_ms = plain["median_step_s"] * 1e3
    added = sum(parts[k] for k in ("hash_ms", "gather_fwd_bwd_ms", "coalesce_ms", "sparse_adam_ms",
                                   "mix_fwd_bwd_compiled_ms"))
    parts["sum_ms"] = round(added, 1)
    parts["bottom_up_ratio"] = round(step_ms / (step_ms + added), 3)
    res["engram_parts"] = parts
    res["rows_ratio"] = round(large["median_step_s"] / small2["median_step_s"], 3)
    res["rows_ratio_target_met"] = res["rows_ratio"] <= 1.10
    res["largest_memory_params"] = large["memory_params"]
    res["largest_target_met"] = large["memory_params"] >= 1e9 and res["rows_ratio_target_met"]
    emit(res, args.out)


if __name__ == "__main__":
    main()
