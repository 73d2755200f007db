"""Engram memory: multi-head hashed embedding tables and their sparse-row optimizer."""

from engram.memory.optim import SparseRowAdam, clip_grad_norm_
from engram.memory.table import MultiHeadTable

__all__ = ["MultiHeadTable", "SparseRowAdam", "clip_grad_norm_"]
