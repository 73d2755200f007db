"""Engram memory: hashed n-gram tables, their sparse-row optimizer, and tiered row stores."""

from engram.memory.cache import POLICIES, CachedStore, access_profile, coverage_curve, simulate_hit_rate
from engram.memory.disk_store import DiskStore
from engram.memory.optim import SparseRowAdam, clip_grad_norm_
from engram.memory.prefetch import Pending, Prefetcher
from engram.memory.store import (
    RamStore,
    RowStore,
    StoreFormatError,
    TierStats,
    check_rows,
    write_store,
)
from engram.memory.table import MultiHeadTable

__all__ = [
    "POLICIES",
    "CachedStore",
    "access_profile",
    "coverage_curve",
    "simulate_hit_rate",
    "DiskStore",
    "MultiHeadTable",
    "Pending",
    "Prefetcher",
    "RamStore",
    "RowStore",
    "SparseRowAdam",
    "StoreFormatError",
    "TierStats",
    "check_rows",
    "clip_grad_norm_",
    "write_store",
]
