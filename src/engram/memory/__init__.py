"""Engram memory as the model sees it: the hashed n-gram table and the provider interface.

Where the rows live (a local table, a store behind a cache and prefetcher, a table sharded across
ranks) is the provider's business; the model only asks :class:`MemoryProvider` for the rows of its
row ids. Stores live in :mod:`engram.store`, the sparse-row optimizer in :mod:`engram.optim`.
"""

from engram.memory.provider import LocalMemory, MemoryProvider
from engram.memory.table import MultiHeadTable

__all__ = ["LocalMemory", "MemoryProvider", "MultiHeadTable"]
