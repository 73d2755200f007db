"""Optimizers for the Engram tables: sparse-row Adam (native kernel where a C compiler works)."""

from engram.optim.sparse_adam import SparseRowAdam, clip_grad_norm_
from engram.optim.torch_sparse import TorchSparseAdam

__all__ = ["SparseRowAdam", "TorchSparseAdam", "clip_grad_norm_"]
