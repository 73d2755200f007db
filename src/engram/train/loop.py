"""The step and evaluation loop of `engram.train.trainer.Trainer`: the learning-rate schedule, one
optimizer step, evaluation, and the run's result (throughput, MFU).

Legend: B batch, T time (sequence length).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engram.atomic import write_json_atomic
from engram.train.mfu import device_peak, mfu
from engram.train.run import plot_losses, read_metrics


def lr_at(step: int, cfg) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class TrainResult:
    status: str  # "finished" | "interrupted"
    step: int
    tokens: int
    val_loss: float | None
    tokens_per_s: float
    run_dir: Path
    params: dict
    mfu: float | None  # model FLOPs utilisation over the training steps (None: no known peak)
    mfu_basis: str = ""  # the peak rate MFU is measured against, or why there is no MFU


class TrainLoop:
    """Mixed into `engram.train.trainer.Trainer`: the loop that takes steps, evaluates, checkpoints on
    schedule and returns a `TrainResult`.

    Expects of the trainer: ``cfg``, ``device``, ``model``, ``opt``, ``table_opt``, ``sampler``, ``val``,
    ``metrics``, the counters ``step``/``tokens``/``elapsed``, ``_stop``, ``is_main``, and the methods
    ``save``, ``save_model``, ``_diverged``, ``_count_params``, ``_should_stop`` and those of
    `engram.train.deferred.DeferredReads`.
    """

    def _autocast(self):
        enabled = self.cfg.train.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, n = 0.0, 0
        with self._autocast():
            for x, y in self.val:
                out = self.model(x, y)
                total += float(out.loss) * y.numel()
                n += y.numel()
        self.model.train()
        return total / max(1, n)

    def _train_step(self, x_BT, y_BT) -> tuple:
        """One optimizer step: ``(loss, grad_norm)``, floats, or with `defer_reads` 0-d device tensors that
        are not read here (their finiteness AND-ed into ``self._finite``, read on logging steps)."""
        from engram.optim.sparse_adam import clip_grad_norm_

        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        for opt in (self.opt, self.table_opt):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_mult", 1.0)
        # Row ids depend only on token ids: computed before the forward (a prefetcher's hook).
        rows = self.model.engram_rows(x_BT) if self.model.hasher is not None else None
        with self._autocast():
            out = self.model(x_BT, y_BT, engram_rows=rows)
            loss = out.loss + self.cfg.model.router_aux_coef * out.aux_loss
        if self.defer_reads:
            return self._deferred_step(loss, out.loss)
        # Checked before any update, so the model (and every checkpoint) stays as it was.
        total = float(loss.detach())
        if not math.isfinite(total):
            raise self._diverged("training loss", total)
        loss.backward()
        gnorm = float(clip_grad_norm_(list(self.model.parameters()), tc.grad_clip)) if tc.grad_clip > 0 else 0.0
        if not math.isfinite(gnorm):
            self.model.zero_grad(set_to_none=True)
            raise self._diverged("gradient norm", gnorm)
        self.opt.step()
        if self.table_opt is not None:
            self.table_opt.step()
        self.model.zero_grad(set_to_none=True)
        return out.loss.item(), gnorm

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device; to CUDA through pinned memory, as a blocking copy from pageable
        memory would wait for the device (a host sync every step)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _on_sigint(self, signum, frame):
        if self._stop:  # second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self._stop = True

    def train(self) -> TrainResult:
        tc = self.cfg.train
        from tqdm import tqdm

        params = self._count_params()
        # PaLM-style estimate: 6 FLOPs per activated parameter + attention over the context.
        mc = self.cfg.model
        flops_per_token = 6 * params["activated_per_token"] + 12 * mc.n_layers * mc.d_model * tc.seq_len
        peak = device_peak(self.device, tc.dtype)
        if peak.flops is None:
            self.notice(f"MFU not reported: {peak.basis}")
        prev = signal.signal(signal.SIGINT, self._on_sigint)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and self.is_main), unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        status, val_loss, last_good = "finished", None, None
        try:
            while self.step < tc.steps:
                x, y = self.sampler.next()
                x, y = self._to_device(x), self._to_device(y)
                t0 = time.perf_counter()
                loss, gnorm = self._train_step(x, y)
                self.step += 1
                self.tokens += x.numel()
                rec = {"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss,
                       "lr": lr_at(self.step - 1, tc), "grad_norm": gnorm}
                self._pending.append(rec)
                log_now = self.step % tc.log_every == 0 or self.step == tc.steps
                at_eval = self.step % tc.eval_every == 0 or self.step == tc.steps
                at_ckpt = self.step % tc.ckpt_every == 0 or self.step == tc.steps
                read = not isinstance(loss, torch.Tensor) or log_now or at_eval or at_ckpt
                if read:
                    self._read_pending()  # deferred steps: the wait for the device is timed into this one
                dt = time.perf_counter() - t0
                rec["step_s"] = dt
                if read:
                    self._write_pending()
                self.elapsed += dt
                tok_s = self.tokens / max(self.elapsed, 1e-9)
                bar.update(1)
                if log_now:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if at_eval:
                    val_loss = self.evaluate()
                    if not math.isfinite(val_loss):
                        raise self._diverged("validation loss", val_loss, step=self.step)
                    self.metrics.log(kind="eval", step=self.step, tokens=self.tokens, val_loss=val_loss,
                                     tokens_per_s=tok_s, mfu=mfu(flops_per_token, tok_s, peak))
                    if self.is_main:
                        bar.write(f"step {self.step}: val loss {val_loss:.4f} | {tok_s:,.0f} tok/s")
                # A stop asked for after the last step's work (say, during its evaluation) finds the run done.
                stop = self._should_stop() and self.step < tc.steps
                if at_ckpt or stop:
                    self._read_pending()
                    self._write_pending()
                    last_good = self.save()
                if stop:
                    status = "interrupted"
                    if self.is_main:
                        bar.write(f"interrupted: saved {last_good}; resume with --resume")
                    break
        finally:
            bar.close()
            signal.signal(signal.SIGINT, prev)
            self.metrics.close()
        tok_s = self.tokens / max(self.elapsed, 1e-9)
        if status == "finished" and val_loss is None:
            # Resumed from a checkpoint of the last step: nothing left to train, but the result still
            # reports the final model's validation loss (the same weights give the same number).
            val_loss = self.evaluate()
        if status == "finished":
            self.save_model(self.run_dir / "model")
        res = TrainResult(status, self.step, self.tokens, val_loss, tok_s, self.run_dir, params,
                          mfu(flops_per_token, tok_s, peak), peak.basis)
        if self.is_main:
            recs = read_metrics(self.run_dir / "metrics.jsonl")
            plot_losses({self.cfg.preset or "run": recs}, self.run_dir / "loss.png")
            write_json_atomic(self.run_dir / "summary.json", {**res.__dict__, "run_dir": str(self.run_dir)})
        return res
