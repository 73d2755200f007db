"""`torch.optim.SparseAdam` for tables whatever their gradient layout (sparse COO or dense rows)."""

# Shapes: U touched rows, d row width.

from __future__ import annotations

import torch

from engram.optim.sparse_adam import sparse_rows

__all__ = ["TorchSparseAdam"]


class TorchSparseAdam(torch.optim.SparseAdam):
    """`torch.optim.SparseAdam` (lazy Adam: a row's moments move only on the steps that touch it)
    that also takes a dense gradient, as a table built with ``sparse=False`` produces.

    torch's SparseAdam refuses dense gradients; a table's dense gradient is zero on every row the
    batch did not touch, so it is converted to the sparse COO tensor of its nonzero rows first (an
    O(rows) scan, the cost the dense gradient has already paid) and the update is the one the
    sparse gradient of the same lookups gets. (A touched row whose gradient cancels to exactly zero
    is skipped, where the sparse gradient would give it a momentum step.) The state dict is
    torch's, so checkpoints load in either class.
    """

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    rows_U, g_Ud = sparse_rows(p.grad)
                    p.grad = torch.sparse_coo_tensor(rows_U.unsqueeze(0), g_Ud.reshape(rows_U.numel(), *p.shape[1:]),
                                                     p.shape, is_coalesced=True, check_invariants=False)
        return super().step(closure)
