"""Optimizers for the Engram tables: sparse-row Adam (native kernel where a C compiler works)."""

from engram.optim.sparse_adam import SparseRowAdam, clip_grad_norm_

__all__ = ["SparseRowAdam", "clip_grad_norm_"]
