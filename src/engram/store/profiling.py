"""Access profiles of row-id traffic: per-row counts, coverage of the hottest rows, simulated hit rates.

These feed the static-hot cache (its ``profile``) and the access-pattern benchmark; the simulation runs
:class:`~engram.store.cache.CachedStore`'s own bookkeeping over rows of width 1, so a simulated hit rate is
the real cache's, not a model of it.
"""

# Shapes: R rows in the table.

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from engram.store.base import RowStore, check_rows

__all__ = ["access_profile", "coverage_curve", "hot_rows", "simulate_hit_rate"]


def hot_rows(profile, num_rows: int, capacity: int) -> np.ndarray:
    """Sorted ids of the (at most ``capacity``) rows a static cache loads; see CachedStore's ``profile``."""
    p = profile.detach().cpu().numpy() if isinstance(profile, torch.Tensor) else np.asarray(profile)
    if p.ndim != 1:
        raise ValueError(f"profile must be 1-D (per-row counts or hot row ids), got shape {list(p.shape)}")
    if p.dtype.kind not in "iuf":
        raise ValueError(f"profile must hold numbers, got dtype {p.dtype}")
    if p.size > num_rows:
        raise ValueError(f"profile has {p.size} entries but the table has {num_rows} rows: pass per-row counts "
                         f"(length {num_rows}) or fewer hot row ids")
    if p.size == num_rows:  # counts
        if np.isnan(p).any() or (p < 0).any():
            raise ValueError("profile counts must be >= 0 (no NaN)")
        seen = np.flatnonzero(p > 0)
        if seen.size <= capacity:
            return seen.astype(np.int64)
        c = p[seen]
        kth = np.partition(c, c.size - capacity)[c.size - capacity]  # the capacity-th largest count
        above = seen[c > kth]
        tied = seen[c == kth][: capacity - above.size]  # ties: lower row ids first
        return np.sort(np.concatenate([above, tied])).astype(np.int64)
    if p.dtype.kind == "f":
        raise ValueError(f"profile of length {p.size} (not num_rows={num_rows}) is read as hot row ids, "
                         f"which must be integers, got {p.dtype}")
    ids = check_rows(np.ascontiguousarray(p), num_rows).numpy()
    if np.unique(ids).size != ids.size:
        raise ValueError("profile hot row ids must be distinct")
    return np.sort(ids[:capacity])


def access_profile(rows_iter: Iterable[torch.Tensor | np.ndarray], num_rows: int) -> np.ndarray:
    """Per-row access counts (int64, length ``num_rows``) of row-id batches of any shape, duplicates counted."""
    counts_R = np.zeros(num_rows, dtype=np.int64)
    for rows in rows_iter:
        flat = rows.reshape(-1) if isinstance(rows, (torch.Tensor, np.ndarray)) else rows
        ids = check_rows(flat, num_rows).numpy()
        if ids.size * 8 >= num_rows:  # a dense pass over the table pays off
            counts_R += np.bincount(ids, minlength=num_rows)
        elif ids.size:
            u, c = np.unique(ids, return_counts=True)
            counts_R[u] += c
    return counts_R


def coverage_curve(counts: np.ndarray | torch.Tensor, fractions: Sequence[float]) -> np.ndarray:
    """Share of all lookups that hit the top ``f`` fraction of rows (by count), for each ``f`` in ``fractions``.

    ``counts`` are per-row counts over the whole table (zeros included: they set the row total); the top
    ``round(f * num_rows)`` rows are counted. Returns float64 values in [0, 1] (0 when nothing was counted).
    """
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError("counts must be a 1-D array of per-row counts >= 0")
    f = np.asarray(fractions, dtype=np.float64)
    if ((f < 0) | (f > 1)).any():
        raise ValueError(f"fractions must lie in [0, 1], got {f.tolist()}")
    nz = np.sort(c[c > 0])[::-1]  # rows never accessed add nothing to any prefix
    total = nz.sum()
    if total == 0:
        return np.zeros(f.shape)
    cum = np.concatenate([[0], np.cumsum(nz, dtype=np.float64)])
    k = np.minimum(np.rint(f * c.size).astype(np.int64), nz.size)
    return cum[k] / float(total)


class _NullStore(RowStore):
    """A backing store without payload (width 1, zeros) for running the cache's bookkeeping alone."""

    tier = "backing"

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self._num_rows = int(num_rows)

    num_rows = property(lambda self: self._num_rows)
    dim = 1
    dtype = torch.float32

    def gather(self, rows_N, out_Nd=None):
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        out_Nd.zero_()
        n = rows_N.numel()
        self._record(n, n, n, 0, 0)
        return out_Nd


def simulate_hit_rate(requests_iter: Iterable[torch.Tensor | np.ndarray], num_rows: int, capacity: int,
                      policy: str = "lru", profile: np.ndarray | torch.Tensor | None = None) -> dict:
    """Run the real cache bookkeeping (rows of width 1) over requests; returns the cache's counters and rates.

    Each request (row ids of any shape) is one gather. ``hit_rate`` is hits / unique (distinct rows per
    request, what the backing store is spared); ``lookup_hit_rate`` also counts repeats inside a request
    as hits, i.e. (requested - misses) / requested.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1 (rows), got {capacity!r}")
    from engram.store.cache import CachedStore  # the cache imports hot_rows from here

    store = CachedStore(_NullStore(num_rows), int(capacity) * 4, policy, profile)
    for rows in requests_iter:
        store.gather(rows.reshape(-1) if isinstance(rows, (torch.Tensor, np.ndarray)) else rows)
    s = store.stats()["cache"]
    return {**s, "capacity": store.capacity,
            "hit_rate": s["hits"] / s["unique"] if s["unique"] else 0.0,
            "lookup_hit_rate": (s["requested"] - s["misses"]) / s["requested"] if s["requested"] else 0.0}
