"""Row stores for serving Engram tables outside the model.

The on-disk format (:mod:`~engram.store.format`), RAM and disk tiers (:mod:`~engram.store.base`,
:mod:`~engram.store.disk`), the hot-row cache (:mod:`~engram.store.cache`), the prefetcher
(:mod:`~engram.store.prefetch`), the co-access row layout (:mod:`~engram.store.layout`) and the
I/O helpers beneath them (direct reads, read-ahead, block-device facts, per-row CRC32C checksums).
"""

from engram.store.base import RamStore, RowStore, StoreFormatError, TierStats, check_rows, write_store
from engram.store.cache import POLICIES, CachedStore
from engram.store.disk import DiskStore
from engram.store.format import StoreChecksumError
from engram.store.prefetch import Pending, Prefetcher
from engram.store.profiling import access_profile, coverage_curve, simulate_hit_rate

__all__ = [
    "POLICIES",
    "CachedStore",
    "DiskStore",
    "Pending",
    "Prefetcher",
    "RamStore",
    "RowStore",
    "StoreChecksumError",
    "StoreFormatError",
    "TierStats",
    "access_profile",
    "check_rows",
    "coverage_curve",
    "simulate_hit_rate",
    "write_store",
]
