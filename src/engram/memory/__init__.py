"""Hashed n-gram memory storage."""

from engram.memory.table import MultiHeadTable

__all__ = ["MultiHeadTable"]
