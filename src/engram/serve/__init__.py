"""Serving Engram models with their tables outside the model: export to a store directory, offloaded inference."""

from engram.serve.export import export_tables, open_store_dir, read_manifest
from engram.serve.memory import StoreMemory
from engram.serve.offload import OffloadedLM, access_profiles, format_tier_stats, open_memory

__all__ = ["OffloadedLM", "StoreMemory", "access_profiles", "export_tables", "format_tier_stats", "open_memory",
           "open_store_dir", "read_manifest"]
