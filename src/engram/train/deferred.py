"""Training steps that read nothing back to the host: the loss and gradient norm of each step stay on
the device, and a device-side flag collects whether they were all finite; both are read in one transfer
on logging steps. A host read waits for the device to finish everything queued so far, so reading
every step would keep the device idle while Python prepares the next one.

The price: a non-finite loss is found at the next logging step rather than at its own, after the
updates in between; the trainer's `save` checks the parameters, so no checkpoint holds such a model.
"""

from __future__ import annotations

import math

import torch


class DeferredReads:
    """Mixed into `engram.train.trainer.Trainer`: the deferred half of a training step and the reads.

    Expects of the trainer: ``cfg``, ``model``, ``opt``, ``table_opt``, ``step``, ``metrics``,
    ``_diverged``, and the ``_pending`` (records of steps not yet written) and ``_finite`` attributes.
    """

    def _deferred_step(self, loss, lm_loss) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of `_train_step` without a host read: a non-finite loss or norm is caught at the next
        logging step (`_read_pending`), after this update; `save` refuses the non-finite model it leaves."""
        from engram.optim.sparse_adam import clip_grad_norm_

        tc = self.cfg.train
        loss.backward()
        if tc.grad_clip > 0:
            gnorm = clip_grad_norm_(list(self.model.parameters()), tc.grad_clip).detach()
        else:
            gnorm = torch.zeros((), device=loss.device)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm)
        self._finite = finite if self._finite is None else self._finite & finite
        self.opt.step()
        if self.table_opt is not None:
            self.table_opt.step()
        self.model.zero_grad(set_to_none=True)
        return lm_loss.detach(), gnorm

    def _read_pending(self) -> None:
        """Read the device values of the steps taken since the last read, in one transfer; TrainingDiverged
        (naming the first bad step) when the finite flag went false."""
        deferred = [r for r in self._pending if isinstance(r["loss"], torch.Tensor)]
        if deferred:
            vals = [v.float() for r in deferred for v in (r["loss"], r["grad_norm"])]
            host = torch.stack([*vals, self._finite.float()]).tolist()  # the one device-to-host transfer
            for i, r in enumerate(deferred):
                r["loss"], r["grad_norm"] = host[2 * i], host[2 * i + 1]
            if host[-1] != 1.0:
                self._pending = []
                self._raise_first_bad(deferred, found_at=self.step)
            self._finite = None

    def _write_pending(self) -> None:
        """Append the read steps to metrics.jsonl, one line per step."""
        for r in self._pending:
            self.metrics.log(**r)
        self._pending = []

    def _raise_first_bad(self, records: list[dict], found_at: int):
        """TrainingDiverged for the first non-finite step of ``records``; the steps before it are logged, as
        an immediate check would have logged them."""
        for i, r in enumerate(records):
            what = ("training loss" if not math.isfinite(r["loss"]) else
                    "gradient norm" if not math.isfinite(r["grad_norm"]) else None)
            if what is not None:
                self._pending = records[:i]
                self._write_pending()
                raise self._diverged(what, r["loss" if what == "training loss" else "grad_norm"], step=r["step"],
                                     found_at=found_at)
        # Only the router's auxiliary loss (not logged) went non-finite: the first deferred step is the bound.
        raise self._diverged("training loss (with the router aux loss)", "non-finite", step=records[0]["step"],
                             found_at=found_at)
