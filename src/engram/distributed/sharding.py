"""How an Engram table's rows are split over ranks, and whether a world size can hold them.

Every layer's flat table ``[R, d]`` is cut into contiguous row ranges by the rule DTensor's
``Shard(0)`` uses (ceil-sized chunks, the last ranks taking what is left, possibly nothing). Using the
same rule means a shard *is* the local part of a ``DTensor`` placed ``Shard(0)``, so
``torch.distributed.checkpoint`` can save on N ranks and load on M without any code of ours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from engram.config import ConfigError

__all__ = ["TableShard", "check_budget", "row_bounds", "row_range", "table_shards"]


def row_range(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a ``num_rows`` table that ``rank`` of ``world`` owns (DTensor Shard(0) rule)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    c = math.ceil(num_rows / world) if num_rows else 0
    return min(rank * c, num_rows), min((rank + 1) * c, num_rows)


def row_bounds(num_rows: int, world: int) -> list[int]:
    """``world + 1`` boundaries: rank r owns ``[bounds[r], bounds[r + 1])``."""
    return [row_range(num_rows, world, r)[0] for r in range(world)] + [num_rows]


@dataclass(frozen=True)
class TableShard:
    """One rank's part of one Engram layer's table."""

    layer: int
    head_sizes: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    world: int
    rank: int

    @property
    def num_rows(self) -> int:
        return sum(self.head_sizes)

    @property
    def start(self) -> int:
        return row_range(self.num_rows, self.world, self.rank)[0]

    @property
    def end(self) -> int:
        return row_range(self.num_rows, self.world, self.rank)[1]

    @property
    def rows(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        return self.rows * self.dim * torch.empty((), dtype=self.dtype).element_size()


def table_shards(head_sizes: Mapping[int, Sequence[int]], dim: int, dtype: torch.dtype, world: int,
                 rank: int) -> dict[int, TableShard]:
    """``{layer: TableShard}`` of ``rank`` for tables with the given per-layer head sizes."""
    return {int(layer): TableShard(int(layer), tuple(int(s) for s in sizes), int(dim), dtype, world, rank)
            for layer, sizes in sorted(head_sizes.items())}


def check_budget(head_sizes: Mapping[int, Sequence[int]], dim: int, dtype: torch.dtype, world: int,
                 budget_bytes: int | None) -> None:
    """Refuse, before any work, a world size whose largest per-rank shard set exceeds ``budget_bytes``.

    Every rank holds rank 0's share at most (rank 0 always has the largest chunk of every layer), so that
    share is what must fit. The error names the smallest world size that would fit.
    """
    if budget_bytes is None:
        return
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(sum(s) for s in head_sizes.values()) * dim * elem

    def need(w: int) -> int:
        return sum(row_range(sum(s), w, 0)[1] * dim * elem for s in head_sizes.values())

    if need(world) <= budget_bytes:
        return
    # Past the largest table's row count every rank holds at most one row per layer: nothing smaller exists.
    # need() never grows with the world size, so the smallest world that fits is found by bisection.
    lo, hi = world + 1, max(world + 1, max((sum(s) for s in head_sizes.values()), default=1))
    fits = None
    if need(hi) <= budget_bytes:
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if need(mid) <= budget_bytes else (mid + 1, hi)
        fits = lo
    hint = f"at least {fits} ranks" if fits else "a larger per-rank budget (one row per rank does not fit)"
    raise ConfigError(f"a world of {world} rank(s) cannot hold the Engram tables ({_size(total)} in all): each "
                      f"rank's shards take up to {_size(need(world))}, over the per-rank memory budget of "
                      f"{_size(budget_bytes)}; use {hint}")


def _size(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.3f} {unit}"
    return f"{n} bytes"
