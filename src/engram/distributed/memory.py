"""A memory provider whose Engram tables are row-sharded over the ranks of a process group.

Each rank holds, per Engram layer, the rows ``[start, end)`` of the flat table that
:func:`engram.distributed.sharding.row_range` gives it, as a parameter of this module (outside the model:
the model asks its provider for rows and knows nothing of ranks). ``rows()`` is a collective: every rank
of the group calls it for the same layers in the same order, a rank with nothing to look up included
(``idle()`` does that for a rank without a batch).

Legend: B batch, T time, H hash heads, d row width, S rows of this rank's shard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from engram.distributed.exchange import ExchangeStats, _world, gather_all_to_all, gather_masked
from engram.distributed.sharding import TableShard, row_bounds, table_shards
from engram.memory.provider import MemoryProvider

__all__ = ["EXCHANGES", "ShardedMemory"]

EXCHANGES = {"all_to_all": gather_all_to_all, "masked": gather_masked}


class ShardedMemory(nn.Module, MemoryProvider):
    """Rows of every Engram layer from tables split by rows over ``group`` (see the module docstring).

    Args:
        head_sizes: ``{layer: rows per hash head}`` (the model's ``hasher.head_sizes(layer)``).
        dim: row width ``d``; ``dtype``: the tables' dtype.
        shards: ``{layer: [S, d] tensor}`` this rank's rows (made parameters here; trained by a sparse-row
            optimizer), or None to allocate them uninitialised (fill them with :meth:`load_rows`).
        group: the process group (None: the default one, or no process group at all in one process).
        exchange: ``"all_to_all"`` (default) or ``"masked"``; both return the same rows bit for bit.

    Attribute ``grad_scale`` (default 1) multiplies the gradient an owner receives: set it to ``1/W`` when
    each rank's loss is the mean over its own share of a global batch (data parallelism), so the shards
    get the gradient of the global mean, as DDP's averaging gives the backbone.
    """

    def __init__(self, head_sizes: Mapping[int, tuple[int, ...]], dim: int, dtype: torch.dtype, *,
                 shards: Mapping[int, torch.Tensor] | None = None, group=None, exchange: str = "all_to_all",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {sorted(EXCHANGES)}, got {exchange!r}")
        self.group, self.exchange = group, exchange
        self.world, self.rank = _world(group)
        self.spec: dict[int, TableShard] = table_shards(head_sizes, dim, dtype, self.world, self.rank)
        self.bounds = {layer: row_bounds(s.num_rows, self.world) for layer, s in self.spec.items()}
        self.offsets = {layer: torch.tensor([0, *torch.tensor(s.head_sizes).cumsum(0)[:-1].tolist()],
                                            dtype=torch.int64, device=device)
                        for layer, s in self.spec.items()}
        self.stats = ExchangeStats()
        self.grad_scale = 1.0
        weights = {}
        for layer, s in self.spec.items():
            if shards is not None:
                w = shards[layer]
                if tuple(w.shape) != (s.rows, s.dim) or w.dtype != dtype:
                    raise ValueError(f"layer {layer}: rank {self.rank} of {self.world} owns rows [{s.start}, {s.end}) "
                                     f"of [{s.num_rows}, {s.dim}] {dtype}, got a {tuple(w.shape)} {w.dtype} shard")
            else:
                w = torch.empty(s.rows, s.dim, dtype=dtype, device=device)
            weights[str(layer)] = nn.Parameter(w.detach())
        self.shards = nn.ParameterDict(weights)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, *, group=None, exchange: str = "all_to_all") -> ShardedMemory:
        """Take this rank's rows of ``model``'s own Engram tables, then drop the tables from the model and
        make this the model's provider. Every rank must have built ``model`` identically (same seed), so the
        sharded model starts where the single-process one does."""
        tables = model.take_engram_tables()
        first = next(iter(tables.values()))
        head_sizes = {layer: tuple(int(x) for x in t.head_sizes.tolist()) for layer, t in tables.items()}
        world, rank = _world(group)
        shards = {}
        for layer, t in tables.items():
            spec = table_shards({layer: head_sizes[layer]}, first.dim, first.weight.dtype, world, rank)[layer]
            shards[layer] = t.weight.detach()[spec.start:spec.end].clone()
        del tables
        mem = cls(head_sizes, first.dim, first.weight.dtype, shards=shards, group=group, exchange=exchange,
                  device=first.weight.device)
        model.set_memory(mem)
        return mem

    @torch.no_grad()
    def load_rows(self, read: Callable[[int, int, int], torch.Tensor]) -> ShardedMemory:
        """Fill every shard from ``read(layer, start, end) -> [end - start, d]`` (a row-range reader of a
        saved model or store): a rank reads only its own rows. Returns ``self``."""
        for layer, s in self.spec.items():
            rows = read(layer, s.start, s.end)
            if tuple(rows.shape) != (s.rows, s.dim):
                raise ValueError(f"layer {layer}: reader gave {tuple(rows.shape)} for rows [{s.start}, {s.end})")
            self.shards[str(layer)].copy_(rows)
        return self

    # -- the provider ----------------------------------------------------------------------------
    def shard(self, layer: int) -> nn.Parameter:
        """This rank's rows of layer ``layer``'s table (rows ``spec[layer].start`` onwards)."""
        return self.shards[str(layer)]

    def rows(self, layer: int, rows_BTH: torch.Tensor) -> torch.Tensor:
        """Collective: the rows ``[*rows_BTH.shape, d]`` of per-head ids ``rows_BTH`` (any batch, even empty)."""
        shard = self.shards[str(layer)]
        idx = rows_BTH.to(torch.int64) + self.offsets[layer].to(rows_BTH.device)
        out = EXCHANGES[self.exchange](shard, idx.reshape(-1), self.bounds[layer], self.group, self.stats,
                                       self.grad_scale)
        return out.reshape(*rows_BTH.shape, shard.shape[1])

    def idle(self) -> None:
        """Take part in one forward's exchanges with nothing to look up (a rank whose batch is empty), so the
        ranks that do have a batch are not left waiting."""
        for layer, s in self.spec.items():
            self.rows(layer, torch.empty(0, len(s.head_sizes), dtype=torch.int64,
                                         device=self.shards[str(layer)].device))

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's shards."""
        return sum(p.numel() * p.element_size() for p in self.shards.values())

    def extra_repr(self) -> str:
        parts = [f"layer {layer}: rows [{s.start}, {s.end}) of {s.num_rows}" for layer, s in self.spec.items()]
        return f"rank {self.rank} of {self.world}, {self.exchange}; " + "; ".join(parts)
