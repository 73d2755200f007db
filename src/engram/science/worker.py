"""One sweep run, in its own process: train (or resume) from ``spec.json``, measure, write ``result.json``.

``python -m engram.science.worker RUN_DIR`` is what `engram.science.sweep` launches. A run directory is
done when ``result.json`` exists (written last, atomically); one with a started training run resumes from
its newest good checkpoint; a lock file keeps two sweeps from training the same run at once.

Besides the validation loss, a finished run records what explains it (the `tokens` experiment's
question: when does the memory start to pay?): how many table rows a training step touches, how many
updates each row received over the run (rows are trained only when their n-gram occurs), and the gate
statistics on validation text.

Legend: B batch, T time, H hash heads, M residual branches.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engram.atomic import write_json_atomic

SPEC, RESULT, LOCK = "spec.json", "result.json", ".sweep.lock"


def _engram_layers(model) -> list[int]:
    return [blk.layer for blk in model.blocks if blk.engram is not None]


def table_usage(model, sampler, steps: int, sample_steps: int = 64) -> dict:
    """Rows touched per step (mean over ``sample_steps`` evenly spaced steps) and updates per row over all
    ``steps`` (a row is updated at a step when its n-gram occurs in that step's batch): replayed from the
    sampler, whose batch at step i depends only on (seed, i)."""
    if model.hasher is None:
        return {}
    per_layer = {layer: np.zeros(model.blocks[layer].engram.num_rows, dtype=np.int32)
                 for layer in _engram_layers(model)}
    touched = []
    probe = set(np.linspace(0, steps - 1, min(sample_steps, steps)).round().astype(int).tolist())
    for step in range(steps):
        x_BT, _ = sampler.batch_at(step)
        rows = model.engram_rows(x_BT)
        n = 0
        for layer, rows_BTH in rows.items():
            flat = model.blocks[layer].engram.flat_rows(rows_BTH).reshape(-1).numpy()
            uniq = np.unique(flat)
            per_layer[layer][uniq] += 1
            n += len(uniq)
        if step in probe:
            touched.append(n)
    counts = np.concatenate(list(per_layer.values()))
    hit = counts[counts > 0]
    return {"rows_total": int(counts.size), "rows_touched_per_step": float(np.mean(touched)),
            "rows_ever_touched": int(hit.size), "rows_ever_touched_frac": float(hit.size / counts.size),
            "updates_per_touched_row_mean": float(hit.mean()) if hit.size else 0.0,
            "updates_per_touched_row_median": float(np.median(hit)) if hit.size else 0.0,
            "touched_rows_updated_10x_frac": float((hit >= 10).mean()) if hit.size else 0.0}


@torch.no_grad()
def gate_stats(model, batches, max_batches: int = 8) -> dict:
    """Mean gate and share of gates above 0.5 per Engram layer on validation batches (hooks re-run each
    Engram layer on its own inputs with ``return_gates``)."""
    if model.hasher is None:
        return {}
    gates: dict[int, list[torch.Tensor]] = {i: [] for i in _engram_layers(model)}
    busy = set()

    def hook(layer):
        def fn(mod, args, kwargs, out):
            if layer in busy:
                return
            busy.add(layer)
            try:
                _, aux = mod(*args, **{**kwargs, "return_gates": True})
                gates[layer].append(aux["gates"].float().reshape(-1))
            finally:
                busy.discard(layer)
        return fn

    handles = [model.blocks[i].engram.register_forward_hook(hook(i), with_kwargs=True) for i in gates]
    model.eval()
    try:
        for x_BT, _ in batches[:max_batches]:
            model(x_BT)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, gs in gates.items():
        if gs:
            g = torch.cat(gs)
            out[str(layer)] = {"mean": float(g.mean()), "frac_above_half": float((g > 0.5).float().mean()),
                               "p10": float(g.quantile(0.1)), "p90": float(g.quantile(0.9))}
    return out


# The worker's exit status says why a run did not finish, so the sweep can say it too.
EXIT_INTERRUPTED, EXIT_BUSY = 3, 4


def run(run_dir: str | Path, *, progress: bool = False) -> dict | None:
    """Train, measure and record the run in ``run_dir``; its result (None if interrupted, or if another
    process holds it)."""
    return _run(run_dir, progress)[1]


def _run(run_dir: str | Path, progress: bool) -> tuple[str, dict | None]:
    """``("done", result)``, ``("interrupted", None)`` or ``("busy", None)`` (another process trains it)."""
    from engram.train.config import RunConfig
    from engram.train.trainer import Trainer, prepare_run_data

    run_dir = Path(run_dir)
    if (run_dir / RESULT).is_file():
        return "done", json.loads((run_dir / RESULT).read_text())
    spec = json.loads((run_dir / SPEC).read_text())
    lock = open(run_dir / LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return "busy", None
    try:
        cfg = RunConfig.from_dict(spec["config"])
        torch.set_num_threads(max(1, cfg.train.threads))
        # wall_s and cpu_s (this process, every thread) of this attempt: runs share the cores, so the CPU time
        # is what a budget in CPU-hours counts.
        t0, c0 = time.time(), time.process_time()
        data = prepare_run_data(cfg)
        resume = (run_dir / "config.json").is_file()
        trainer = Trainer(None if resume else cfg, run_dir, resume=resume, data=data, progress=progress)
        start_step = trainer.step  # > 0 for a resumed attempt: its wall_s and cpu_s cover only the rest
        res = trainer.train()
        if res.status != "finished":
            return "interrupted", None
        if res.val_loss is None:  # a result is its validation loss: never write one without it
            raise RuntimeError(f"{run_dir}: training finished without a validation loss")
        usage = table_usage(trainer.model, trainer.sampler, trainer.cfg.train.steps)
        gates = gate_stats(trainer.model, trainer.val)
        result = {"format": "engram-sweep-run-1", "name": spec.get("name"), "val_loss": res.val_loss,
                  "tokens": res.tokens, "steps": res.step, "tokens_per_s": res.tokens_per_s,
                  "params": res.params, "threads": torch.get_num_threads(), "wall_s": time.time() - t0,
                  "cpu_s": time.process_time() - c0, "start_step": start_step, "table_usage": usage, "gates": gates,
                  "data": _data_facts(trainer)}
        if not spec.get("keep_model", False):
            shutil.rmtree(run_dir / "model", ignore_errors=True)
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # a finished run never resumes
        write_json_atomic(run_dir / RESULT, result)
        return "done", result
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _data_facts(trainer) -> dict:
    d = trainer.data
    # The tokenizer by its cache name, not this machine's path.
    return {"tokenizer": Path(str(d.tokenizer_spec)).name, "train_tokens": int(len(d.train)),
            "val_tokens": int(len(d.val)),
            "corpus_fingerprint": d.meta.get("corpus_fingerprint")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train one sweep run (see engram.science.sweep)")
    ap.add_argument("run_dir")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    threads = os.environ.get("ENGRAM_SWEEP_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    # The sweep stops a worker with SIGINT. A sweep started in the background hands its children SIGINT
    # ignored, and Python keeps it so: restore the handler, or a SIGINT sent before the trainer installs its
    # own (during start-up) would be lost and the run trained to its end.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        state, res = _run(args.run_dir, args.progress)
    except KeyboardInterrupt:  # before training began, or a second SIGINT: the newest checkpoint resumes
        print(f"{args.run_dir}: interrupted; its checkpoint resumes on the next sweep", file=sys.stderr)
        return EXIT_INTERRUPTED
    if state == "busy":
        print(f"{args.run_dir}: another process is training this run", file=sys.stderr)
        return EXIT_BUSY
    if res is None:
        print(f"{args.run_dir}: interrupted; its checkpoint resumes on the next sweep", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps({"run": str(args.run_dir), "val_loss": res["val_loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
