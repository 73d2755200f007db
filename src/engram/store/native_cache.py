"""Small C kernels for the per-request bookkeeping of a static hot-row cache and a co-access layout.

Why: a decode step asks for a few dozen rows. Served with numpy, the cache's bookkeeping is ~15
array calls (unique with inverse, slot lookup, hit mask, staging copies, layout rank, sort, scatter),
each a few microseconds, and several times that right after a forward pass has flushed the CPU's
caches, which is when a decode step runs them. That bookkeeping can cost a decode step more
than the step's disk reads. Here it is one pass in C, which takes about a third off a decode step's
fetch (what remains is mostly submitting the reads); ``benchmarks/bench_fetch_path.py`` times both
paths side by side.

* :func:`split` copies a request's cached rows straight to the output, checks every id, and returns
  the distinct missed rows (sorted, as a backing store reads them), where each miss goes, and the
  request's distinct / distinct-hit counts for the statistics.
* :func:`physical` maps logical rows to file positions for :class:`engram.store.layout.RowLayout`
  (rank of a placed-bit index, the same arithmetic as its numpy path).
* :func:`sort_rank` sorts distinct file positions and says where each one lands.

The results equal the numpy paths' exactly (tests compare them); where no C compiler works, or with
``ENGRAM_NATIVE_CACHE=0``, :func:`available` is False and callers keep the numpy paths.
"""

# Shapes: N requested ids, K of them misses, M distinct missed rows, R table rows, C cache slots, d row width.

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from engram.native import NativeLibrary, native_source

__all__ = ["MAX_IDS", "Split", "available", "physical", "scatter_at", "sort_rank", "split", "split_at",
           "unavailable_reason"]

MAX_IDS = 1 << 20  # requests up to this many ids take the native paths (scratch: 56 bytes per id)

_SOURCE = native_source("cache.c")


def _configure(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.engram_cache_split.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, p, p]
    lib.engram_cache_split.restype = i64
    for name in ("engram_physical_i32", "engram_physical_i64"):
        getattr(lib, name).argtypes = [p, i64, p, p, p, i64, p]
        getattr(lib, name).restype = None
    lib.engram_scatter_rows.argtypes = [p, p, p, p, i64, i64]
    lib.engram_scatter_rows.restype = None
    lib.engram_sort_rank.argtypes = [p, i64, p, p, p]
    lib.engram_sort_rank.restype = None


_native = NativeLibrary(_SOURCE, "cache", env_switch="ENGRAM_NATIVE_CACHE", configure=_configure)


def available() -> bool:
    """True if the kernels are compiled and loaded (builds them on the first call)."""
    return _native.load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _native.error


def _lib() -> ctypes.CDLL:
    lib = _native.load()
    if lib is None:
        raise RuntimeError(f"native cache kernels unavailable: {_native.error}")
    return lib


class Split(NamedTuple):
    """What :func:`split` found: ``unique`` distinct ids, ``hits`` of them cached; ``miss_rows_M`` the
    distinct missed rows ascending; request position ``miss_pos_K[k]`` needs ``miss_rows_M[miss_inv_K[k]]``."""

    unique: int
    hits: int
    miss_rows_M: np.ndarray
    miss_pos_K: np.ndarray
    miss_inv_K: np.ndarray


def split(ids_N: np.ndarray, num_rows: int, slot_of_R: np.ndarray, slots_raw_Cd: np.ndarray,
          out_raw_Nd: np.ndarray) -> Split:
    """Copy the cached rows of request ``ids_N`` into ``out_raw_Nd`` and return the rest (see :class:`Split`).

    ``ids_N`` C-contiguous int64; ``slot_of_R`` C-contiguous int32 of length ``num_rows`` (slot + 1, 0 =
    not cached); ``slots_raw_Cd`` and ``out_raw_Nd`` C-contiguous with equal row bytes (the caller checks).
    Raises ValueError naming the first id outside ``[0, num_rows)``; nothing is written then.
    """
    return split_at(ids_N.ctypes.data, ids_N.size, num_rows, slot_of_R.ctypes.data, slots_raw_Cd.ctypes.data,
                    slots_raw_Cd.shape[1] * slots_raw_Cd.itemsize, out_raw_Nd.ctypes.data)


def split_at(ids: int, n: int, num_rows: int, slot_of: int, slots: int, row_bytes: int, out: int) -> Split:
    """:func:`split` on raw addresses (what a caller that keeps them saves: ~1-2 us per array and call)."""
    buf = np.empty(7 * n + 3, dtype=np.int64)  # sort scratch (2n pairs), miss rows, positions, inverse, counts
    a = buf.ctypes.data
    m = _lib().engram_cache_split(ids, n, num_rows, slot_of, slots, row_bytes, out, a, a + 32 * n, a + 40 * n,
                                  a + 48 * n, a + 56 * n)
    if m < 0:
        bad = -m - 1
        bad_id = ctypes.c_int64.from_address(ids + 8 * bad).value
        raise ValueError(f"row id {bad_id} at position {bad} is out of range [0, {num_rows})")
    k = int(buf[7 * n + 2])
    return Split(int(buf[7 * n]), int(buf[7 * n + 1]), buf[4 * n:4 * n + m], buf[5 * n:5 * n + k],
                 buf[6 * n:6 * n + k])


def scatter_at(out: int, buf: int, pos_K: np.ndarray, inv_K: np.ndarray, row_bytes: int) -> None:
    """Row ``pos_K[k]`` of the rows at ``out`` := row ``inv_K[k]`` of the rows at ``buf`` (addresses of
    C-contiguous rows of ``row_bytes``; ``pos_K``/``inv_K`` contiguous int64, in range: the caller's own)."""
    _lib().engram_scatter_rows(out, buf, pos_K.ctypes.data, inv_K.ctypes.data, pos_K.size, row_bytes)


def physical(rows_N: np.ndarray, bits_W: np.ndarray, before_W: np.ndarray, slot_P: np.ndarray,
             num_placed: int) -> np.ndarray:
    """File positions of range-checked logical rows (see ``RowLayout.physical``); int32 or int64 index arrays."""
    rows = np.ascontiguousarray(rows_N, dtype=np.int64)
    out = np.empty(rows.shape, dtype=np.int64)
    if before_W.dtype != slot_P.dtype or before_W.dtype not in (np.int32, np.int64):
        raise ValueError(f"layout index arrays must both be int32 or int64, got {before_W.dtype} / {slot_P.dtype}")
    fn = _lib().engram_physical_i32 if before_W.dtype == np.int32 else _lib().engram_physical_i64
    fn(rows.ctypes.data, rows.size, bits_W.ctypes.data, before_W.ctypes.data, slot_P.ctypes.data, num_placed,
       out.ctypes.data)
    return out


def sort_rank(pos_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted_M, rank_M)``: ``pos_M`` ascending, and ``sorted_M[rank_M[j]] == pos_M[j]``."""
    pos = np.ascontiguousarray(pos_M, dtype=np.int64)
    n = pos.size
    scratch = np.empty(4 * n, dtype=np.int64)  # 2n pairs
    sorted_M, rank_M = np.empty(n, np.int64), np.empty(n, np.int64)
    _lib().engram_sort_rank(pos.ctypes.data, n, scratch.ctypes.data, sorted_M.ctypes.data, rank_M.ctypes.data)
    return sorted_M, rank_M
