"""Kill -9 campaign: seeded hard kills during training, checkpointing and export; every resume exact.

For each trial a seeded random delay is drawn over the length of an uninterrupted run, and the
command is killed with SIGKILL at that moment (whatever it is doing: a training step, a checkpoint
or model save, writing metrics, exporting a store). Then:

* training (`engram train --preset debug`, `train.dtype=auto`, a checkpoint every 4 steps): the run
  is continued with `--resume`; its per-step training losses must equal the uninterrupted run's
  exactly (bit-identical floats). A kill before the run was recorded leaves nothing to resume: the
  trial then checks that `--resume` refuses with exit 2 and that a fresh start matches.
* export (`engram export-memory` over an existing store directory): the directory must afterwards
  hold either the old store or the new one, complete (`engram verify` exit 0 and opening it works),
  and exporting again must give a store that verifies.

Prints JSON (machine info, per-trial outcome, counts). Outcome kinds: "exact" (resume equal),
"refused_then_fresh_exact" (killed before anything was saved), "store_intact"; anything else is a
failure and the script exits 1.

Run: python benchmarks/bench_kill9.py [--trials 20] [--seed 0] [--out kill9.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine_info

TRAIN_SETS = ["train.steps=16", "train.ckpt_every=4", "train.eval_every=8", "train.log_every=1",
              "train.dtype=auto", "train.threads=1"]


def _engram(*args: str) -> list[str]:
    return [sys.executable, "-m", "engram", *args]


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    cmd = _engram("train", "--preset", "debug", "--run-dir", str(run_dir), "--no-progress")
    for s in TRAIN_SETS:
        cmd += ["--set", s]
    return cmd + list(extra)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    path = run_dir / "metrics.jsonl"
    for ln in path.read_text().splitlines() if path.is_file() else []:
        if ln.strip():
            r = json.loads(ln)
            if r.get("kind") == "train":
                out[r["step"]] = r["loss"]
    return out


def _run(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _kill_after(cmd: list[str], env: dict, delay: float) -> int:
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
    return p.wait(timeout=120)


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = _run(cmd, env)
    if r.returncode:
        raise SystemExit(f"reference command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return time.perf_counter() - t


def train_trial(base: Path, env: dict, delay: float, want: dict) -> dict:
    run = base / "run"
    rc = _kill_after(_train_cmd(run), env, delay)
    if rc == 0:
        got = _losses(run)
        return {"outcome": "exact" if got == want else "WRONG", "note": "finished before the kill"}
    r = _run(_train_cmd(run, "--resume"), env)
    if r.returncode == 0:
        return {"outcome": "exact" if _losses(run) == want else "WRONG", "resume_stderr": r.stderr.strip()[-300:]}
    if r.returncode == 2 and "engram: error" in r.stderr and "Traceback" not in r.stderr:
        # nothing was recorded before the kill: a fresh start must then be the uninterrupted run
        shutil.rmtree(run, ignore_errors=True)  # the kill may come before the directory exists
        f = _run(_train_cmd(run), env)
        ok = f.returncode == 0 and _losses(run) == want
        return {"outcome": "refused_then_fresh_exact" if ok else "WRONG", "resume_stderr": r.stderr.strip()}
    return {"outcome": "WRONG", "resume_rc": r.returncode, "resume_stderr": r.stderr.strip()[-500:]}


def export_trial(base: Path, env: dict, model: Path, delay: float) -> dict:
    store = base / "store"
    first = _run(_engram("export-memory", "--model", str(model), "--out", str(store)), env)
    if first.returncode:
        return {"outcome": "WRONG", "note": "first export failed", "stderr": first.stderr[-300:]}
    _kill_after(_engram("export-memory", "--model", str(model), "--out", str(store)), env, delay)
    v = _run(_engram("verify", str(store), "--no-progress"), env)
    e = _run(_engram("eval", "--model", str(model), "--memory", "disk", "--store", str(store),
                     "--eval-tokens", "2048", "--json"), env)
    again = _run(_engram("export-memory", "--model", str(model), "--out", str(store)), env)
    v2 = _run(_engram("verify", str(store), "--no-progress"), env)
    ok = v.returncode == 0 and e.returncode == 0 and again.returncode == 0 and v2.returncode == 0
    return {"outcome": "store_intact" if ok else "WRONG", "verify_rc": v.returncode, "eval_rc": e.returncode,
            "reexport_rc": again.returncode, "stderr": (v.stderr + e.stderr + again.stderr)[-500:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="kill points in all (about 3/4 training, 1/4 export)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="scratch directory (default: a temporary one)")
    ap.add_argument("--out")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="engram-kill9-"))
    env = dict(os.environ, PYTHONHASHSEED="0", ENGRAM_CACHE=str(scratch / "cache"))
    ref = scratch / "reference"
    # a first run fills the data cache (corpus, BPE), so the timed runs and the kills see training only
    _timed(_train_cmd(scratch / "warmup"), env)
    t_train = _timed(_train_cmd(ref), env)
    want = _losses(ref)
    t_export = _timed(_engram("export-memory", "--model", str(ref / "model"), "--out", str(scratch / "ref-store")), env)

    trials = []
    for i in range(args.trials):
        kind = "export" if i % 4 == 3 else "train"
        delay = float(rng.uniform(0.05, 1.0) * (t_train if kind == "train" else t_export))
        base = scratch / f"trial-{i:02d}"
        base.mkdir(parents=True, exist_ok=True)
        res = train_trial(base, env, delay, want) if kind == "train" else export_trial(base, env, ref / "model", delay)
        trials.append({"trial": i, "kind": kind, "kill_after_s": round(delay, 3), **res})
        print(json.dumps(trials[-1]), file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)

    counts: dict[str, int] = {}
    for t in trials:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    out = {"benchmark": "kill9", "machine": machine_info(), "seed": args.seed, "train_sets": TRAIN_SETS,
           "reference_train_s": round(t_train, 2), "reference_export_s": round(t_export, 2),
           "reference_steps": len(want), "counts": counts, "failures": counts.get("WRONG", 0), "trials": trials}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
