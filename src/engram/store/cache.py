"""Hot-row cache: a byte budget of table rows kept in RAM in front of a slower row store.

:class:`CachedStore` answers ``gather`` like any :class:`RowStore` (bit-identical to the backing store) and
keeps up to ``C = budget_bytes // row_bytes`` rows in one preallocated ``[C, d]`` tensor. A gather
de-duplicates its ids, finds the cached ones through a dense row -> slot map, fetches all misses from the
backing store in one gather (distinct, ascending ids), and admits them by the policy:

* ``"lru"``: exact least-recently-used. The distinct rows of a request count as accessed one after the
  other in ascending row-id order, so the cache always holds the ``C`` most recently used distinct rows.
* ``"lfu"``: least-frequently-used, counting accesses while resident (a row starts at 1 when admitted and
  forgets its count when evicted); ties go to the least recently used. A request is served as a whole:
  its own rows are never evicted to make room for each other, so every miss is admitted.
* ``"static"``: the rows ranked highest by an access profile are loaded once at construction and never
  evicted; misses are read from the backing store and not admitted.

A request with more distinct rows than ``C`` is served in full; the cache then keeps the ``C`` rows of
that request the policy ranks highest (LRU: the last ones in row-id order; LFU: highest count, then recency).

Memory: the slots (``C * row_bytes``, within the budget) plus bookkeeping of 8 bytes per slot (static),
17 bytes per slot (LRU: row id, priority key, a flag) or 21 (LFU: also a 4-byte count), plus the dense map
of 4 bytes per *table* row. The map is allocated with ``np.zeros`` (calloc), so the OS commits it lazily,
one 4 KiB page (1024 table rows) at a time when a row in it is first cached: a tiny fraction of the table
(``4 / row_bytes`` of it at worst) and usually far less. LRU/LFU also keep an eviction candidate pool of
at most ~16k slot ids (128 KiB) or one request's misses, and a gather with misses allocates a ``[U, d]``
temporary for its distinct rows.

Eviction is vectorised: each slot has an int64 priority key (LRU: the access tick; LFU: the count in the
high bits and the tick in the low 41 bits, so a count saturates at 2**22 - 1). The victims are the slots
with the smallest keys, taken from a small candidate pool found by one ``argpartition`` over all slots and
reused until it runs dry; the pool stays exact because keys only grow and every resident slot outside it
has a key above the pool's threshold. A lock makes one CachedStore safe to call from several threads; it
is held for the whole gather (including the backing read), so requests on one cache are serialised.
"""

# Shapes: N requested row ids, U distinct ids among them, C cache slots, R rows in the table, d row width,
# P slots in the eviction candidate pool.

from __future__ import annotations

import threading

import numpy as np
import torch

from engram.store import native_cache
from engram.store.base import Ready, RowStore, Then
from engram.store.format import RAW_TORCH
from engram.store.profiling import hot_rows

__all__ = ["POLICIES", "CachedStore"]

POLICIES = ("lru", "lfu", "static")
_TICK_BITS = 41  # 2.2e12 row accesses per cache before ticks would collide with the count bits
_COUNT_MAX = (1 << (63 - _TICK_BITS)) - 1
_NO_KEY = np.iinfo(np.int64).max


class CachedStore(RowStore):
    """A byte-budgeted hot-row cache in front of ``backing``; see the module docstring for the policies.

    Args:
        backing: the store that holds every row (e.g. a DiskStore). It is not closed by :meth:`close`.
        budget_bytes: bytes for cached rows; the cache holds ``budget_bytes // backing.row_bytes`` rows
            (at most ``num_rows``). A budget smaller than one row is an error.
        policy: ``"lru"``, ``"lfu"`` or ``"static"``.
        profile: ``"static"`` only (and required there): per-row access counts of length ``num_rows`` (see
            :func:`access_profile`), or a shorter array of distinct row ids ordered hottest first. The
            ``C`` rows with the highest positive counts (ties: lower row id) are loaded; rows never seen in
            the profile are not. Loading reads them from ``backing`` (it shows in its statistics).

    ``stats()`` gives ``{"cache": ..., **backing.stats()}``; the cache's ``bytes_read`` counts bytes copied
    out of its slots, its ``misses`` are the distinct rows it asked the backing store for.
    """

    tier = "cache"

    def __init__(self, backing: RowStore, budget_bytes: int, policy: str = "lru",
                 profile: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(backing, RowStore):
            raise ValueError(f"backing must be a RowStore, got {type(backing).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
            raise ValueError(f"budget_bytes must be an int, got {type(budget_bytes).__name__}")
        row_bytes = backing.row_bytes
        if budget_bytes < row_bytes:
            raise ValueError(f"budget_bytes={budget_bytes} is smaller than one row ({row_bytes} bytes: "
                             f"dim {backing.dim} x {backing.dtype}); the cache could hold nothing")
        if policy == "static" and profile is None:
            raise ValueError("policy 'static' needs profile= (per-row access counts, see access_profile)")
        if policy != "static" and profile is not None:
            raise ValueError(f"profile is only used by policy 'static', not {policy!r}")
        self.backing = backing
        self.policy = policy
        self.budget_bytes = int(budget_bytes)
        # The map stores slot + 1 in int32 (0 = not cached).
        self.capacity = int(min(budget_bytes // row_bytes, backing.num_rows, 2**31 - 2))
        self._row_bytes = row_bytes
        self._raw_dtype = RAW_TORCH[backing.dtype]
        self._lock = threading.Lock()
        self._closed = False
        # Static-policy requests take one native pass (native_cache.split); False keeps the numpy path.
        self.native = policy == "static" and native_cache.available()
        self._slot_of_R = np.zeros(backing.num_rows, dtype=np.int32)  # calloc: committed lazily
        self._used = 0  # slots [0, used) hold rows; slots are only freed all at once (see _refill)
        if policy == "static":
            hot = hot_rows(profile, backing.num_rows, self.capacity)
            self._alloc_slots(hot.size)  # only the rows the profile ranks: never more than the budget
            if hot.size:
                backing.gather(torch.from_numpy(hot), out_Nd=self._slots_Cd)
                self._row_of_C[:] = hot
                self._slot_of_R[hot] = np.arange(1, hot.size + 1, dtype=np.int32)
            self._used = hot.size
            return
        self._alloc_slots(self.capacity)
        C = self.capacity
        self._key_C = np.zeros(C, dtype=np.int64)
        self._count_C = np.zeros(C, dtype=np.int32) if policy == "lfu" else None
        self._protect_C = np.zeros(C, dtype=bool)  # this request's hits, while choosing victims
        self._tick = 0
        self._pool_P = np.empty(0, dtype=np.int64)
        self._tau = -1  # every resident slot outside the pool has a key > tau
        self._pool_min = int(np.clip(C // 32, 256, 16384))

    def _alloc_slots(self, n: int) -> None:
        self._slots_Cd = torch.empty((n, self.backing.dim), dtype=self.backing.dtype)
        self._raw_Cd = self._slots_Cd.view(self._raw_dtype).numpy()  # copies move bits (NaN payloads too)
        self._row_of_C = np.zeros(n, dtype=np.int64)

    num_rows = property(lambda self: self.backing.num_rows)
    dim = property(lambda self: self.backing.dim)
    dtype = property(lambda self: self.backing.dtype)

    @property
    def resident(self) -> int:
        """How many rows are cached now."""
        return self._used

    def resident_rows(self) -> np.ndarray:
        """Sorted int64 ids of the rows cached now (a snapshot)."""
        with self._lock:
            return np.sort(self._row_of_C[: self._used])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``slots`` (row payload), ``bookkeeping`` (per-slot arrays and pool) and ``row_map``
        (the dense map's virtual size; the OS commits only the pages of rows ever cached)."""
        book = self._row_of_C.nbytes
        if self.policy != "static":
            book += self._key_C.nbytes + self._protect_C.nbytes + self._pool_P.nbytes
            book += 0 if self._count_C is None else self._count_C.nbytes
        return {"slots": self._slots_Cd.nbytes, "bookkeeping": book, "row_map": self._slot_of_R.nbytes}

    def gather(self, rows_N, out_Nd: torch.Tensor | None = None) -> torch.Tensor:
        if self._native_static(rows_N):
            return self._start_native(rows_N, out_Nd).result()
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        n = rows_N.numel()
        if n == 0:
            self._record(0, 0, 0, 0, 0)
            return out_Nd
        uniq_U, inv_N = np.unique(rows_N.numpy(), return_inverse=True)
        out_raw = out_Nd.detach().view(self._raw_dtype).numpy()
        with self._lock:
            if self._closed:
                raise ValueError("CachedStore is closed")
            hits = self._serve(uniq_U, inv_N.reshape(-1), out_raw)
        self._record(n, uniq_U.size, hits, uniq_U.size - hits, hits * self.row_bytes)
        return out_Nd

    def gather_start(self, rows_N, out_Nd: torch.Tensor | None = None):
        """See :meth:`RowStore.gather_start`. The static policy copies its hits now and starts the
        backing store's read of the misses (its resident set never changes, so nothing waits on the
        read); LRU and LFU admit what they read, so they gather here."""
        if self.policy != "static":
            return Ready(self.gather(rows_N, out_Nd))
        if self._native_static(rows_N):
            return self._start_native(rows_N, out_Nd)
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        n = rows_N.numel()
        if n == 0:
            self._record(0, 0, 0, 0, 0)
            return Ready(out_Nd)
        uniq_U, inv_N = np.unique(rows_N.numpy(), return_inverse=True)
        inv_N = inv_N.reshape(-1)
        out_raw = out_Nd.detach().view(self._raw_dtype).numpy()
        with self._lock:
            if self._closed:
                raise ValueError("CachedStore is closed")
            slot_U = self._slot_of_R[uniq_U].astype(np.int64) - 1
            hit_U = slot_U >= 0
            U, h = uniq_U.size, int(np.count_nonzero(hit_U))
            if h == U:
                np.take(self._raw_Cd, slot_U[inv_N], axis=0, out=out_raw, mode="clip")
                self._record(n, U, h, 0, h * self.row_bytes)
                return Ready(out_Nd)
            hit_H, miss_M, pos_U, buf_Ud, buf_raw = self._stage_hits(slot_U, hit_U, h)
        rows_M = uniq_U[miss_M]  # checked, sorted and distinct already: a disk store skips doing it again
        start = getattr(self.backing, "_start_unique", None)
        misses = (start(rows_M, buf_Ud[h:], None) if start is not None
                  else self.backing.gather_start(torch.from_numpy(rows_M), out_Nd=buf_Ud[h:]))

        def finish() -> torch.Tensor:
            misses.result()
            np.take(buf_raw, pos_U[inv_N], axis=0, out=out_raw, mode="clip")
            self._record(n, U, h, U - h, h * self.row_bytes)
            return out_Nd

        return Then(misses, finish)

    def _native_static(self, rows_N) -> bool:
        """Whether a static-policy request goes through :meth:`_start_native` (kernel built, <= MAX_IDS ids)."""
        if not (self.native and self.policy == "static"):
            return False
        n = (rows_N.numel() if isinstance(rows_N, torch.Tensor)
             else rows_N.size if isinstance(rows_N, np.ndarray) else native_cache.MAX_IDS + 1)
        return n <= native_cache.MAX_IDS

    def _start_native(self, rows_N, out_Nd: torch.Tensor | None):
        """The static policy's gather_start in one native pass (:func:`native_cache.split_at`): hits copied to
        the output, ids checked, the distinct misses handed to the backing store already sorted. A decode
        step's request costs tens of microseconds here instead of ~15 numpy calls; a prefill batch's
        rows are copied once (numpy: hits staged, then expanded) and sorted by radix."""
        if (out_Nd is None and type(rows_N) is torch.Tensor and rows_N.dtype == torch.int64 and rows_N.dim() == 1
                and rows_N.is_cpu and rows_N.is_contiguous()):  # the usual request, checked cheaply
            out_Nd = torch.empty((rows_N.shape[0], self.dim), dtype=self.dtype)
        else:
            rows_N, out_Nd = self._prepare(rows_N, out_Nd, check_range=False)  # the kernel checks the range
        n, rb = rows_N.shape[0], self._row_bytes
        with self._lock:
            if self._closed:
                raise ValueError("CachedStore is closed")
            sp = native_cache.split_at(rows_N.data_ptr(), n, self.num_rows, self._slot_of_R.ctypes.data,
                                       self._raw_Cd.ctypes.data, rb, out_Nd.data_ptr())
        U, h, M = sp.unique, sp.hits, sp.miss_rows_M.size
        if M == 0:
            self._record(n, U, h, 0, h * rb)
            return Ready(out_Nd)
        buf_Md = torch.empty((M, self.dim), dtype=self.dtype)
        start = getattr(self.backing, "_start_unique", None)  # a disk store: skips re-checking sorted ids
        misses = (start(sp.miss_rows_M, buf_Md, None) if start is not None
                  else self.backing.gather_start(torch.from_numpy(sp.miss_rows_M), out_Nd=buf_Md))

        def finish() -> torch.Tensor:
            misses.result()
            native_cache.scatter_at(out_Nd.data_ptr(), buf_Md.data_ptr(), sp.miss_pos_K, sp.miss_inv_K, rb)
            self._record(n, U, h, M, h * rb)
            return out_Nd

        return Then(misses, finish)

    def _serve(self, uniq_U: np.ndarray, inv_N: np.ndarray, out_raw: np.ndarray) -> int:
        """Fill ``out_raw`` with rows ``uniq_U[inv_N]`` and update the cache; returns the number of hits."""
        slot_U = self._slot_of_R[uniq_U].astype(np.int64) - 1
        hit_U = slot_U >= 0
        h = int(np.count_nonzero(hit_U))
        U = uniq_U.size
        if h == U:  # all cached (the common decode case): one copy, no temporary
            np.take(self._raw_Cd, slot_U[inv_N], axis=0, out=out_raw, mode="clip")
            self._touch(slot_U, None)
            return h
        hit_H, miss_M, pos_U, buf_Ud, buf_raw = self._stage_hits(slot_U, hit_U, h)
        rows_M = uniq_U[miss_M]
        self.backing.gather(torch.from_numpy(rows_M), out_Nd=buf_Ud[h:])
        np.take(buf_raw, pos_U[inv_N], axis=0, out=out_raw, mode="clip")
        if self.policy != "static":  # bookkeeping only after the read succeeded
            tick_U = self._touch(slot_U, hit_H)
            if U > self.capacity:
                self._refill(uniq_U, slot_U, hit_H, miss_M, tick_U, buf_raw, pos_U)
            else:
                self._admit(rows_M, tick_U[miss_M], buf_raw[h:], slot_U[hit_H])
        return h

    def _stage_hits(self, slot_U: np.ndarray, hit_U: np.ndarray, h: int):
        """A request's ``[U, d]`` buffer with its ``h`` cached rows copied in: hits first, then room for the
        misses, so the backing store writes straight into ``buf_Ud[h:]``. Returns ``(hit_H, miss_M, pos_U,
        buf_Ud, buf_raw)``; ``pos_U[u]`` is distinct row u's place in the buffer."""
        U = slot_U.size
        hit_H, miss_M = np.flatnonzero(hit_U), np.flatnonzero(~hit_U)
        pos_U = np.empty(U, dtype=np.intp)
        pos_U[hit_H] = np.arange(h)
        pos_U[miss_M] = np.arange(h, U)
        buf_Ud = torch.empty((U, self.dim), dtype=self.dtype)
        buf_raw = buf_Ud.view(self._raw_dtype).numpy()
        np.take(self._raw_Cd, slot_U[hit_H], axis=0, out=buf_raw[:h], mode="clip")
        return hit_H, miss_M, pos_U, buf_Ud, buf_raw

    def _touch(self, slot_U: np.ndarray, hit_H: np.ndarray | None) -> np.ndarray | None:
        """Count an access to the request's cached rows (ticks in ascending row order); returns the ticks."""
        if self.policy == "static":
            return None
        U = slot_U.size
        tick_U = np.arange(self._tick + 1, self._tick + 1 + U, dtype=np.int64)
        self._tick += U
        slot_H, tick_H = (slot_U, tick_U) if hit_H is None else (slot_U[hit_H], tick_U[hit_H])
        if self._count_C is None:
            self._key_C[slot_H] = tick_H
        else:
            count_H = np.minimum(self._count_C[slot_H] + 1, _COUNT_MAX)
            self._count_C[slot_H] = count_H
            self._key_C[slot_H] = (count_H.astype(np.int64) << _TICK_BITS) | tick_H
        return tick_U

    def _new_keys(self, tick_M: np.ndarray) -> np.ndarray:
        return tick_M if self._count_C is None else (np.int64(1) << _TICK_BITS) | tick_M

    def _admit(self, rows_M: np.ndarray, tick_M: np.ndarray, raw_Md: np.ndarray, slot_H: np.ndarray) -> None:
        """Put all misses of a request that fits in the cache into free slots, then evicted ones."""
        m = rows_M.size
        n_free = min(m, self.capacity - self._used)
        slot_M = np.arange(self._used, self._used + n_free, dtype=np.int64)
        if m > n_free:  # choose victims among the old residents, before the free slots count as used
            self._protect_C[slot_H] = True
            try:
                victims = self._evict(m - n_free)
            finally:
                self._protect_C[slot_H] = False
            self._slot_of_R[self._row_of_C[victims]] = 0
            slot_M = np.concatenate([slot_M, victims])
        self._used += n_free
        self._raw_Cd[slot_M] = raw_Md
        self._row_of_C[slot_M] = rows_M
        self._slot_of_R[rows_M] = (slot_M + 1).astype(np.int32)
        key_M = self._new_keys(tick_M)
        self._key_C[slot_M] = key_M
        if self._count_C is not None:
            self._count_C[slot_M] = 1
        low = key_M <= self._tau  # LFU: a new row can rank below the pool's threshold
        if low.any():
            self._pool_P = np.concatenate([self._pool_P, slot_M[low]])

    def _evict(self, k: int) -> np.ndarray:
        """The ``k`` unprotected resident slots with the smallest keys (removed from the pool)."""
        pool_P = self._pool_P
        key_P = self._key_C[pool_P]
        keep_P = key_P <= self._tau  # entries above tau have grown out of the pool
        cand = np.flatnonzero(keep_P & ~self._protect_C[pool_P])
        if cand.size < k:
            self._rebuild_pool(k)
            pool_P = self._pool_P
            key_P = self._key_C[pool_P]
            keep_P = key_P <= self._tau
            cand = np.flatnonzero(keep_P & ~self._protect_C[pool_P])
        if cand.size > k:
            cand = cand[np.argpartition(key_P[cand], k - 1)[:k]]
        keep_P[cand] = False
        self._pool_P = pool_P[keep_P]
        return pool_P[cand]

    def _rebuild_pool(self, k: int) -> None:
        """Pool := the max(k, pool_min) unprotected slots with the smallest keys (one pass over all slots)."""
        used = self._used
        protect = self._protect_C[:used]
        key_C = np.where(protect, _NO_KEY, self._key_C[:used])
        n_open = used - int(np.count_nonzero(protect))
        K = min(n_open, max(k, self._pool_min))
        pool_P = np.argpartition(key_C, K - 1)[:K] if K < used else np.flatnonzero(~protect)
        self._tau = int(key_C[pool_P].max())
        # Protected slots are no candidates now, but the invariant (outside the pool: key > tau) covers them.
        low = np.flatnonzero(protect & (self._key_C[:used] <= self._tau))
        self._pool_P = np.concatenate([pool_P, low]).astype(np.int64)

    def _refill(self, uniq_U, slot_U, hit_H, miss_M, tick_U, buf_raw, pos_U) -> None:
        """A request larger than the cache: keep only its ``C`` highest-ranked rows."""
        C, U = self.capacity, uniq_U.size
        key_U = self._new_keys(tick_U)
        key_U[hit_H] = self._key_C[slot_U[hit_H]]
        count_U = None
        if self._count_C is not None:
            count_U = np.ones(U, dtype=np.int32)
            count_U[hit_H] = self._count_C[slot_U[hit_H]]
        keep_C = np.argpartition(key_U, U - C)[U - C:]
        self._slot_of_R[self._row_of_C[: self._used]] = 0
        np.take(buf_raw, pos_U[keep_C], axis=0, out=self._raw_Cd, mode="clip")
        self._row_of_C[:] = uniq_U[keep_C]
        self._slot_of_R[self._row_of_C] = np.arange(1, C + 1, dtype=np.int32)
        self._key_C[:] = key_U[keep_C]
        if count_U is not None:
            self._count_C[:] = count_U[keep_C]
        self._used = C
        self._pool_P = np.empty(0, dtype=np.int64)
        self._tau = -1

    def stats(self) -> dict[str, dict]:
        return {**super().stats(), **self.backing.stats()}

    def reset_stats(self) -> None:
        super().reset_stats()
        self.backing.reset_stats()

    def close(self) -> None:
        """Drop the cached rows (the backing store stays open: close it yourself); idempotent."""
        with self._lock:
            self._closed = True
            self._alloc_slots(0)
            self._slot_of_R = np.zeros(0, dtype=np.int32)
            self._used = 0

    def __repr__(self) -> str:
        return (f"CachedStore({self.backing!r}, policy={self.policy!r}, capacity={self.capacity}, "
                f"resident={self._used})")
