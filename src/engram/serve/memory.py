"""The serving memory provider: Engram rows from row stores, read ahead of the layers that need them.

:class:`StoreMemory` implements :class:`engram.memory.MemoryProvider` over one :class:`RowStore` per Engram
layer (RAM, disk, or a cache in front of either). The model hands it every layer's row ids before its
first block (:meth:`StoreMemory.prepare`); it turns them into flat table ids and starts the reads:

* a large request (a prefill or an evaluation batch) goes to a :class:`Prefetcher`, whose worker threads
  gather all layers while the model computes;
* a small one (a decode step: batch x heads x layers ids) is not worth a thread hand-off: it is started in
  the calling thread with :meth:`RowStore.gather_start`, which copies cached rows at once and only submits
  the disk reads (direct I/O), so the device reads while the blocks before the Engram layer compute.

:meth:`StoreMemory.rows`, called right before an Engram layer runs, waits for that layer's rows only. A
read is matched to its ids by identity (the very tensor that was prepared); rows asked for without a
matching read are gathered on the spot, so a provider never serves rows of other ids. Stores return the
exact bits of the table, so every output equals the all-in-RAM model's.
"""

# Shapes: B batch, T time, H hash heads, d row width, R rows of one layer's table.

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import torch

from engram.memory.provider import MemoryProvider
from engram.store.prefetch import Prefetcher

__all__ = ["StoreMemory"]


class StoreMemory(MemoryProvider):
    """Rows of each Engram layer from its row store, prefetched (see the module docstring).

    Args:
        stores: ``{layer: RowStore}``, each serving the flat ``[sum(head_sizes), d]`` table of its layer.
        head_sizes: ``{layer: per-head table sizes}`` (the offsets that turn per-head ids into flat ids).
        prefetch, workers, max_pending, device: a :class:`Prefetcher` (False: reads start in the calling
            thread; stores that read asynchronously still overlap with the blocks before their layer).
        sync_rows: requests of at most this many ids in all are started in the calling thread even with
            ``prefetch`` (0 sends everything to the prefetcher).
        keep: reads kept per layer for :meth:`rows` to collect (a pipelined caller prepares the next batch
            before running this one); older ones are dropped.
    """

    def __init__(self, stores: Mapping, head_sizes: Mapping[int, list[int]], *, prefetch: bool = True,
                 workers: int = 2, max_pending: int = 4, device: torch.device | str = "cpu",
                 sync_rows: int = 1024, keep: int = 4) -> None:
        if sync_rows < 0:
            raise ValueError(f"sync_rows must be >= 0, got {sync_rows}")
        self.stores = dict(stores)
        self.sync_rows = int(sync_rows)
        self.keep = int(keep)
        self._offsets = {}
        for lay, sizes in head_sizes.items():
            sizes_H = torch.tensor(list(sizes), dtype=torch.int64)
            self._offsets[lay] = torch.cumsum(sizes_H, 0) - sizes_H
        self._reads: dict[int, deque] = {lay: deque() for lay in self.stores}
        self.prefetcher = (Prefetcher(self.stores, workers=workers, max_pending=max_pending, device=device)
                           if prefetch else None)

    def flat_rows(self, layer: int, rows_BTH: torch.Tensor) -> torch.Tensor:
        """Per-head ids ``[B, T, H]`` -> int64 ids into the layer's flat table (what its store serves)."""
        return rows_BTH.to(torch.int64) + self._offsets[layer].to(rows_BTH.device)

    # ------------------------------------------------------------------ MemoryProvider
    def prepare(self, rows: Mapping[int, torch.Tensor]) -> None:
        todo = {lay: r for lay, r in rows.items() if not any(src is r for src, _ in self._reads[lay])}
        if not todo:
            return  # already prepared (a pipelined caller read this batch ahead)
        handles = self.fetch(todo)
        for lay, r in todo.items():
            q = self._reads[lay]
            q.append((r, handles[lay]))
            while len(q) > self.keep:
                q.popleft()

    def rows(self, layer: int, rows_BTH: torch.Tensor) -> torch.Tensor:
        q = self._reads[layer]
        for i, (src, handle) in enumerate(q):
            if src is rows_BTH:
                del q[i]
                return handle if isinstance(handle, torch.Tensor) else handle.result()
        flat = self.flat_rows(layer, rows_BTH)
        return self.stores[layer].gather(flat.reshape(-1).cpu()).view(*flat.shape, -1)

    # ------------------------------------------------------------------ reads
    def fetch(self, rows: Mapping[int, torch.Tensor]) -> dict:
        """Start reading ``{layer: [B, T, H] per-head ids}``: ``{layer: handle with .result() or tensor}``."""
        flat = {lay: self.flat_rows(lay, r) for lay, r in rows.items()}
        if self.prefetcher is not None and sum(f.numel() for f in flat.values()) > self.sync_rows:
            return self.prefetcher.submit(flat)
        out = {}
        for lay, f in flat.items():
            store, rows_N = self.stores[lay], f.reshape(-1).cpu()
            start = getattr(store, "gather_start", None)  # any object with gather() may serve rows
            out[lay] = (_Shaped(start(rows_N), tuple(f.shape)) if start is not None
                        else store.gather(rows_N).view(*f.shape, -1))
        return out

    def forget(self) -> None:
        """Drop reads nobody collected (e.g. after a forward pass that raised)."""
        for q in self._reads.values():
            q.clear()

    def close(self) -> None:
        """Stop the prefetcher (never hangs; reads not yet collected fail with ``CancelledError``); the
        stores are the caller's."""
        if self.prefetcher is not None:
            self.prefetcher.close()


class _Shaped:
    """A gather handle whose ``[N, d]`` rows are returned as ``[*shape, d]``."""

    def __init__(self, handle, shape: tuple[int, ...]) -> None:
        self._handle, self._shape = handle, shape

    @property
    def done(self) -> bool:
        return bool(getattr(self._handle, "done", True))

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self._handle.result().view(*self._shape, -1)
