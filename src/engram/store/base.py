"""Row stores: one Engram table served from RAM or from a memory-mapped file, with per-tier statistics.

Every store answers ``gather(rows_N) -> [N, d]``, bit-identical to ``table[rows_N]``; callers do not need
to know where the rows live. :class:`RamStore` wraps an in-memory tensor, :class:`DiskStore` maps a file
written by :func:`write_store` (layout in :mod:`engram.store.format`).

:class:`DiskStore` (in :mod:`engram.store.disk`, importable from here too) documents how disk
reads work and how the page cache is made cold for measurements.
"""

# Shapes: N requested row ids, U distinct ids among them, R rows in the table, d row width (``dim``).

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engram.store.format import DTYPE_NAMES, RAW_NUMPY, RAW_TORCH, StoreFormatError, write_store

__all__ = ["RamStore", "Ready", "RowStore", "StoreFormatError", "Then", "TierStats", "check_rows", "write_store"]


@dataclass
class TierStats:
    """Cumulative counters of one tier; invariant: ``hits + misses == unique``."""

    requested: int = 0  # row ids asked for (with duplicates)
    unique: int = 0  # distinct row ids among them (per gather call, summed over calls)
    hits: int = 0  # unique rows served by this tier
    misses: int = 0  # unique rows passed on to the next tier
    bytes_read: int = 0  # bytes this tier read from its own storage

    def as_dict(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        self.requested = self.unique = self.hits = self.misses = self.bytes_read = 0


def check_rows(rows_N, num_rows: int, *, check_range: bool = True) -> torch.Tensor:
    """Validate row ids and return them as a 1-D int64 CPU tensor (no copy when already one).

    Accepts a 1-D integer torch tensor or numpy array; raises ValueError for any other type, a float
    or bool dtype, another rank, or an id outside ``[0, num_rows)`` (naming the first bad id). With
    ``check_range=False`` the ids' range is left to the caller (a native kernel that checks as it goes).
    """
    if isinstance(rows_N, np.ndarray):
        if rows_N.dtype.kind not in "iu":
            raise ValueError(f"row ids must have an integer dtype, got numpy {rows_N.dtype}")
        if rows_N.ndim != 1:
            raise ValueError(f"row ids must be 1-D (flatten [B, T, H] first), got shape {list(rows_N.shape)}")
        if check_range and rows_N.size and (rows_N.min() < 0 or rows_N.max() >= num_rows):
            bad = int(np.flatnonzero((rows_N < 0) | (rows_N >= num_rows))[0])
            raise ValueError(f"row id {rows_N[bad]} at position {bad} is out of range [0, {num_rows})")
        rows_N = np.ascontiguousarray(rows_N, dtype=np.int64)
        return torch.from_numpy(rows_N if rows_N.flags.writeable else rows_N.copy())  # torch warns on read-only
    if not isinstance(rows_N, torch.Tensor):
        raise ValueError(f"row ids must be a 1-D integer torch.Tensor or numpy array, got {type(rows_N).__name__}")
    if rows_N.dtype.is_floating_point or rows_N.dtype.is_complex or rows_N.dtype == torch.bool:
        raise ValueError(f"row ids must have an integer dtype, got {rows_N.dtype}")
    if rows_N.dim() != 1:
        raise ValueError(f"row ids must be 1-D (flatten [B, T, H] first), got shape {list(rows_N.shape)}")
    rows_N = rows_N.detach().to("cpu", torch.int64).contiguous()
    if check_range and rows_N.numel():
        # a decode step's few dozen ids: numpy's min/max cost ~2 us, torch.aminmax ~20 us of dispatch
        a = rows_N.numpy()
        lo, hi = (a.min(), a.max()) if a.size <= 4096 else torch.aminmax(rows_N)
        if lo < 0 or hi >= num_rows:
            bad = int(torch.nonzero((rows_N < 0) | (rows_N >= num_rows))[0, 0])
            raise ValueError(f"row id {int(rows_N[bad])} at position {bad} is out of range [0, {num_rows})")
    return rows_N


class Ready:
    """A :meth:`RowStore.gather_start` handle whose rows are already there."""

    done = True

    def __init__(self, value: torch.Tensor) -> None:
        self._value = value

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self._value


class RowStore:
    """A read-only ``[num_rows, dim]`` table that serves row gathers; see the module docstring.

    Subclasses call ``super().__init__()`` (it sets up the statistics), set ``tier`` to the name their
    counters are reported under, and implement ``num_rows``, ``dim``, ``dtype`` and ``gather``. In
    ``gather``, ``_prepare`` validates ids and ``out_Nd`` (allocating it when None) and ``_record`` adds
    to the counters under the stats lock.
    """

    tier = "store"

    def __init__(self) -> None:
        self._stats = TierStats()
        self._stats_lock = threading.Lock()

    num_rows: int
    dim: int
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return self.dim * RAW_NUMPY[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    def gather(self, rows_N, out_Nd: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows_N`` (1-D int flat ids into ``[0, num_rows)``, any order, duplicates allowed) -> ``[N, d]``.

        The result is a CPU tensor of ``self.dtype``, bit-identical to ``table[rows_N]``. If ``out_Nd`` is
        given (CPU, contiguous, ``[N, d]``, ``self.dtype``) it is filled and returned, nothing is allocated for
        the result. Raises ValueError for bad ids (see :func:`check_rows`) or a bad ``out_Nd``. Thread-safe.
        """
        raise NotImplementedError

    def gather_start(self, rows_N, out_Nd: torch.Tensor | None = None):
        """Start :meth:`gather`; returns a handle whose ``result()`` gives the ``[N, d]`` rows.

        A store that can read asynchronously (a direct-read :class:`DiskStore`, a static cache in front
        of one) submits its reads and returns at once, so the caller computes while the device reads;
        others gather here. Invalid ids raise here; read errors raise from ``result()``. Call
        ``result()`` exactly as you would have used the rows: until then the store may hold resources
        (a read ring) for this request.
        """
        return Ready(self.gather(rows_N, out_Nd))

    def stats(self) -> dict[str, dict]:
        """``{tier_name: TierStats.as_dict()}`` for every tier of this store (a snapshot)."""
        with self._stats_lock:
            return {self.tier: self._stats.as_dict()}

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats.reset()

    def close(self) -> None:
        """Release the store's resources; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, requested: int, unique: int, hits: int, misses: int, bytes_read: int) -> None:
        with self._stats_lock:
            s = self._stats
            s.requested += requested
            s.unique += unique
            s.hits += hits
            s.misses += misses
            s.bytes_read += bytes_read

    def _prepare(self, rows_N, out_Nd: torch.Tensor | None, *, check_range: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(rows_N int64, out_Nd)``; allocates ``out_Nd`` when not given (see :func:`check_rows`)."""
        rows_N = check_rows(rows_N, self.num_rows, check_range=check_range)
        shape = (rows_N.numel(), self.dim)
        if out_Nd is None:
            return rows_N, torch.empty(shape, dtype=self.dtype)
        if not isinstance(out_Nd, torch.Tensor):
            raise ValueError(f"out_Nd must be a torch.Tensor, got {type(out_Nd).__name__}")
        if tuple(out_Nd.shape) != shape or out_Nd.dtype != self.dtype or out_Nd.device.type != "cpu":
            raise ValueError(f"out_Nd must be a CPU {self.dtype} tensor of shape {list(shape)}, "
                             f"got {out_Nd.device.type} {out_Nd.dtype} {list(out_Nd.shape)}")
        if not out_Nd.is_contiguous():
            raise ValueError("out_Nd must be contiguous")
        return rows_N, out_Nd

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_rows={self.num_rows}, dim={self.dim}, "
                f"dtype={DTYPE_NAMES.get(self.dtype, self.dtype)})")


class RamStore(RowStore):
    """Serves rows from an in-memory ``[R, d]`` CPU tensor, which is wrapped, not copied.

    Args:
        table_Rd: float32/bfloat16/float16 CPU tensor (e.g. ``MultiHeadTable.weight``; it is detached).
        pin: page-lock the table (one copy) so GPU copies of gathered rows can be asynchronous; only done
            when CUDA is available, otherwise ignored (``self.pinned`` says which).
        count_unique: count distinct ids per gather for the statistics (a sort); with False, ``unique`` and
            ``hits`` count every requested id, which keeps an all-in-RAM baseline free of that cost.

    ``bytes_read`` counts every requested row (``index_select`` reads duplicates again).
    """

    tier = "ram"

    def __init__(self, table_Rd: torch.Tensor, *, pin: bool = False, count_unique: bool = True) -> None:
        super().__init__()
        if not isinstance(table_Rd, torch.Tensor) or table_Rd.dim() != 2 or min(table_Rd.shape) < 1:
            raise ValueError(f"table must be a non-empty [num_rows, dim] tensor, got "
                             f"{list(table_Rd.shape) if isinstance(table_Rd, torch.Tensor) else type(table_Rd)}")
        if table_Rd.dtype not in RAW_TORCH:
            raise ValueError(f"table dtype must be float32, bfloat16 or float16, got {table_Rd.dtype}")
        if table_Rd.device.type != "cpu":
            raise ValueError(f"table must live on the CPU, got device {table_Rd.device}")
        table_Rd = table_Rd.detach()
        self.pinned = bool(pin and torch.cuda.is_available())
        if self.pinned:
            table_Rd = table_Rd.pin_memory()
        self.table = table_Rd
        # index_select on an integer view copies bits: NaN payloads survive, whatever the kernel does.
        self._raw_Rd = table_Rd.view(RAW_TORCH[table_Rd.dtype])
        self.count_unique = count_unique

    num_rows = property(lambda self: self.table.shape[0])
    dim = property(lambda self: self.table.shape[1])
    dtype = property(lambda self: self.table.dtype)

    def gather(self, rows_N, out_Nd: torch.Tensor | None = None) -> torch.Tensor:
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        n = rows_N.numel()
        if n:
            torch.index_select(self._raw_Rd, 0, rows_N, out=out_Nd.detach().view(self._raw_Rd.dtype))
        u = torch.unique(rows_N).numel() if self.count_unique and n else n
        self._record(n, u, u, 0, n * self.row_bytes)
        return out_Nd


def __getattr__(name: str):
    # DiskStore lives in engram.store.disk, which imports this module: resolved on first use.
    if name == "DiskStore":
        from engram.store.disk import DiskStore

        return DiskStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Then:
    """A gather handle: waits for ``inner``, then returns ``finish()`` (once; later calls repeat it)."""

    def __init__(self, inner, finish) -> None:
        self._inner, self._finish = inner, finish
        self._value: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self._value is not None or bool(getattr(self._inner, "done", False))

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if self._value is None:
            self._value = self._finish()
        return self._value
