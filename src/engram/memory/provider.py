"""The one interface between an Engram model and wherever its rows live.

An Engram layer needs, for its per-head row ids ``rows_BTH``, the rows ``[B, T, H, d]`` of its table.
The model asks a :class:`MemoryProvider` for them and knows nothing else: the rows may come from a local
table (training: :class:`LocalMemory`, differentiable with sparse gradients), from a store behind a cache
and a prefetcher (serving: ``engram.serve.StoreMemory``), or from a table sharded across ranks.

Row ids depend only on token ids, so the model computes every layer's ids before its first block and
hands them to :meth:`MemoryProvider.prepare`; a provider that reads from slow storage starts reading
there, and :meth:`MemoryProvider.rows`, called right before each Engram layer runs, waits only for that
layer's rows.
"""

# Shapes: B batch, T time, H hash heads, d row width.

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engram.memory.table import MultiHeadTable

__all__ = ["LocalMemory", "MemoryProvider"]


class MemoryProvider:
    """Serves Engram rows: subclass and implement :meth:`rows` (and :meth:`prepare` to read ahead).

    Contract: ``rows(layer, rows_BTH)`` returns exactly the table rows of ``rows_BTH`` (bit for bit what
    the layer's table holds), shape ``[*rows_BTH.shape, d]``. Row ids come from the model's hasher and
    are in range; a provider need not check them on the hot path.
    """

    def prepare(self, rows: Mapping[int, torch.Tensor]) -> None:
        """The ids ``{layer: rows_BTH}`` of the forward pass about to run; a hint, by default ignored."""

    def rows(self, layer: int, rows_BTH: torch.Tensor) -> torch.Tensor:
        """The rows ``[*rows_BTH.shape, d]`` of Engram layer ``layer`` for per-head row ids ``rows_BTH``."""
        raise NotImplementedError


class LocalMemory(MemoryProvider):
    """Rows from in-process tables ``{layer: MultiHeadTable}`` (autograd and sparse gradients as the table's).

    A model's default provider wraps its Engram layers' own tables; the tables stay parameters of the
    model (this object holds references only, so nothing is registered twice).
    """

    def __init__(self, tables: Mapping[int, MultiHeadTable]) -> None:
        for layer, t in tables.items():
            if not isinstance(t, nn.Module) or not hasattr(t, "offsets"):
                raise TypeError(f"table of layer {layer} must be a MultiHeadTable, got {type(t).__name__}")
        self.tables = dict(tables)

    def rows(self, layer: int, rows_BTH: torch.Tensor) -> torch.Tensor:
        return self.tables[layer](rows_BTH, validate=False)

    def __repr__(self) -> str:
        return f"LocalMemory(layers={sorted(self.tables)})"
