"""Does OpenMP's passive wait policy slow the all-in-RAM model? (It is what lets prefetch threads use idle cores.)

Why this exists: with the tables on disk, a cold row costs CPU on the same two cores that run the
model. libgomp's threads spin after every parallel region by default (OMP_WAIT_POLICY unset), so a
prefetch thread that wakes up preempts a thread that is either computing or spinning, and the other
compute thread waits for it at the next barrier, one candidate reason why bench_offload's loss can be
2-3x the fetch's own CPU (on a VM most of that excess is the host's work per read instead, see
bench_disk_reads' `interference`). With ``OMP_WAIT_POLICY=PASSIVE`` idle OpenMP threads sleep, so the
fetch threads run on cores that would otherwise spin. The offloaded/RAM ratio only means something
if the RAM model itself is not slowed by the setting: this script measures that.

Each round runs one child process per policy (order alternating between rounds; the policy must be
set before the OpenMP runtime starts, hence processes). A child builds the benchmark model of
bench_offload (random weights, a 256 MiB table in RAM), warms up, then times ``--batches`` prefill
batches of 8 x 256 held-out tokens and ``--steps`` decode steps (4 sequences, KV cache). Ratios are
paired by batch / step index within a round: reference time / other time (> 1: the other is faster),
median with a bootstrap 95% interval. ``--policies`` picks the settings (the first is the reference).

Run: .venv/bin/python benchmarks/bench_omp_wait.py [--policies default passive spin10k] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import emit, machine_info, median_ci

# name -> environment of the child (libgomp: OMP_WAIT_POLICY=PASSIVE sleeps at once; GOMP_SPINCOUNT=n spins
# n iterations before sleeping; the default spins 300,000 when there are no more threads than cores)
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"},
            "spin100k": {"GOMP_SPINCOUNT": "100000"}}


def child(args) -> None:
    import numpy as np
    import torch

    from engram.data import prepare_data
    from engram.model import EngramLM
    from engram.tokenizer import CompressedVocab

    from bench_offload import batches_of, config

    data = prepare_data(progress=False)
    torch.manual_seed(0)
    model = EngramLM(config(65_536, data.vocab_size, args.d_model, args.layers),
                     CompressedVocab.from_pretrained(data.tokenizer_spec)).eval()
    batches = batches_of(data.val, 8, 256, args.batches + 1)
    text = torch.from_numpy(np.asarray(data.val[-4 * (64 + args.steps):], dtype=np.int64).reshape(4, -1))
    prefill, decode = [], []
    with torch.no_grad():
        model(*batches[0])  # warm-up
        for x, y in batches[1:]:
            t0 = time.perf_counter()
            model(x, y)
            prefill.append(time.perf_counter() - t0)
        state = model.new_decode_state(4, max_len=text.shape[1])
        model(text[:, :64], cache=state)
        for i in range(64, text.shape[1]):
            t0 = time.perf_counter()
            model(text[:, i:i + 1], cache=state)
            decode.append(time.perf_counter() - t0)
    print(json.dumps({"prefill_s": prefill, "decode_s": decode}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=["default", "passive"],
                    help="wait settings to compare; the first is the reference")
    ap.add_argument("--child", choices=sorted(POLICIES), help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    res: dict = {"benchmark": "omp_wait_policy", "machine": machine_info(),
                 "model": {"d_model": args.d_model, "n_layers": args.layers}, "batch": [8, 256],
                 "batches": args.batches, "decode_steps": args.steps, "rounds": args.rounds}
    pols = list(dict.fromkeys(args.policies))
    res["env"] = {p: POLICIES[p] for p in pols}
    times: dict = {p: [] for p in pols}
    for rnd in range(args.rounds):
        for pol in (pols if rnd % 2 == 0 else pols[::-1]):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            env.update(POLICIES[pol])
            cmd = [sys.executable, __file__, "--child", pol, "--d-model", str(args.d_model), "--layers",
                   str(args.layers), "--batches", str(args.batches), "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=3600)
            times[pol].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = pols[0]
    for phase in ("prefill_s", "decode_s"):
        for pol in pols:
            flat = sorted(t for r in times[pol] for t in r[phase])
            res[f"{phase[:-2]}_median_s_{pol}"] = round(flat[len(flat) // 2], 5)
            if pol != ref:
                pairs = [a / b for d, p in zip(times[ref], times[pol], strict=True)
                         for a, b in zip(d[phase], p[phase], strict=True)]
                res[f"{phase[:-2]}_{ref}_over_{pol}"] = median_ci(pairs)
    emit(res, args.out)


if __name__ == "__main__":
    main()
