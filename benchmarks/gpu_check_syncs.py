"""The `syncs` check of `gpu_check`: which host syncs a CUDA training step still makes, and what deferring
the reads saves.

With `defer_reads` a step reads nothing back for logging; the syncs left are data-dependent (the number
of distinct rows a memory table's gradient touches, the tokens per MoE expert; docs/GUIDE.md lists
them). This check takes a few steps of the demo preset's Engram variant (memory tables + MoE) under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronizing CUDA call, and records
each distinct site: the innermost frame of the project (``engram/...py:line (function)``), the frame
that made the call (``via``, often torch's own Python), and the count per step. Then it times a step
with and without `defer_reads` (the same trainer, alternating blocks of steps).

On a CPU there is no sync debug mode: the check runs the step path once per mode (so a dry run
exercises it), records the times, and is ``skipped`` with the reason.
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

SYNC_WORDS = "synchronizing CUDA operation"  # the text of torch's sync debug warning


def _short(frame: traceback.FrameSummary, root: Path | None) -> str:
    path = Path(frame.filename)
    if root is not None and path.is_relative_to(root):
        name = path.relative_to(root).as_posix()
    else:
        name = "/".join(path.parts[-3:])  # e.g. torch/functional.py: enough to find it, no machine paths
    return f"{name}:{frame.lineno} ({frame.name})"


class SyncRecorder:
    """Counts the sync warnings raised inside the ``with`` block by site; other warnings pass through.

    ``sites``: ``{site: count}``; ``via``: ``{site: {innermost frame: count}}``. On a CUDA ``device``
    the block runs under sync debug mode "warn" (restored after); elsewhere only warnings raised by
    other means are seen (the tests raise them by hand).
    """

    def __init__(self, device=None) -> None:
        import engram

        self.device = device
        self.root = Path(engram.__file__).resolve().parent.parent  # the directory holding engram/
        self.sites: Counter = Counter()
        self.via: dict[str, Counter] = {}

    def __enter__(self) -> SyncRecorder:
        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every occurrence, not once per location
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        self._cuda = self.device is not None and self.device.type == "cuda"
        if self._cuda:
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self._cuda:
            torch.cuda.set_sync_debug_mode(self._mode)
        self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WORDS not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        # The stack at the warning, less this frame and the warnings module's.
        stack = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"]
        ours = [f for f in stack if Path(f.filename).resolve().is_relative_to(self.root / "engram")]
        inner = stack[-1] if stack else None
        site_frame = ours[-1] if ours else inner
        site = _short(site_frame, self.root) if site_frame else f"{filename}:{lineno}"
        self.sites[site] += 1
        if inner is not None and inner is not site_frame:
            self.via.setdefault(site, Counter())[_short(inner, self.root)] += 1

    def per_step(self, steps: int) -> list[dict]:
        """The sites, most frequent first: ``{site, per_step, via}``."""
        return [{"site": s, "per_step": n / steps, "via": dict(self.via.get(s, {}))}
                for s, n in self.sites.most_common()]


def _step(tr) -> None:
    """One training step as the trainer's loop takes it: next batch, to the device, the step."""
    x, y = tr.sampler.next()
    tr._train_step(tr._to_device(x), tr._to_device(y))
    tr.step += 1


def _block(tr, n: int, defer: bool, device) -> float:
    """Seconds per step over ``n`` steps; a deferred block ends with the one read a logging step makes."""
    from gpu_check import synchronize

    tr.defer_reads = defer
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        _step(tr)
    if defer and tr._finite is not None:
        if not bool(tr._finite):
            raise AssertionError("a deferred step's loss or gradient norm is not finite")
        tr._finite = None
    synchronize(device)
    return (time.perf_counter() - t0) / n


def check_syncs(ctx, rec: dict) -> None:
    """Sync sites per step with `defer_reads`, and a step's time with vs without it."""
    from engram.train.compare import variants
    from engram.train.config import run_preset
    from engram.train.trainer import Trainer
    from gpu_check import Skip
    from gpu_check_train import EXPERTS_MOVED, shrink_demo, synthetic_data

    base = run_preset("demo")
    experts_moved = shrink_demo(base) if ctx.tiny else EXPERTS_MOVED
    cfg = copy.deepcopy(variants(base, experts_moved)["engram"])
    tc = cfg.train
    tc.dtype = "auto" if ctx.device.type == "cuda" else "float32"
    tc.steps, tc.compile_engram = 1000, False  # driven step by step here; the schedule only sets the lr
    tc.eval_tokens = min(tc.eval_tokens, 2 * tc.tokens_per_step)  # never evaluated: the smallest valid set
    root = ctx.scratch("syncs")
    data = synthetic_data(root, cfg.model.vocab_size, max(200_000, 64 * tc.tokens_per_step), 4 * tc.tokens_per_step)
    tr = Trainer(cfg, root / "run", data=data, progress=False, device=ctx.device)
    cuda = ctx.device.type == "cuda"
    warm, counted, timed, rounds = (3, 5, 10, 2) if cuda and not ctx.tiny else (1, 1, 1, 1)
    rec.update(model="demo engram variant" + (" (tiny)" if ctx.tiny else ""), dtype=tc.dtype,
               batch=[tc.batch_size, tc.seq_len], table_optimizer=type(tr.table_opt).__name__)
    _block(tr, warm, True, ctx.device)  # first steps: optimizer state, autotuning, allocator growth
    with SyncRecorder(ctx.device) as syncs:
        _block(tr, counted, True, ctx.device)
    rec["sites"] = syncs.per_step(counted)
    rec["syncs_per_step"] = sum(syncs.sites.values()) / counted
    rec["counted_steps"] = counted
    deferred, immediate = [], []
    for _ in range(rounds):  # alternating blocks, so drift (clocks, allocator) falls on both alike
        deferred.append(_block(tr, timed, True, ctx.device))
        immediate.append(_block(tr, timed, False, ctx.device))
    rec["step_s_deferred"], rec["step_s_immediate"] = min(deferred), min(immediate)
    rec["immediate_over_deferred"] = rec["step_s_immediate"] / rec["step_s_deferred"]
    tr.metrics.close()
    if not cuda:
        rec["sites"] = rec["syncs_per_step"] = None
        raise Skip(f"torch.cuda.set_sync_debug_mode needs a CUDA device, this run's is {ctx.device}: the step path "
                   f"ran ({warm + counted + 2 * rounds * timed} steps), no syncs counted")
