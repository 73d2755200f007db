"""Engram across ranks: row-sharded tables (all-to-all with autograd), data-parallel backbone, launch.

The model never imports this package; it wraps the model from outside (a memory provider, DDP).
"""

from engram.distributed.exchange import ExchangeStats, gather_all_to_all, gather_masked
from engram.distributed.launch import DistContext, init_distributed, rank_zero_output, shutdown
from engram.distributed.memory import EXCHANGES, ShardedMemory
from engram.distributed.sharding import TableShard, check_budget, row_bounds, row_range, table_shards

__all__ = ["EXCHANGES", "DistContext", "ExchangeStats", "ShardedMemory", "TableShard", "check_budget",
           "gather_all_to_all", "gather_masked", "init_distributed", "rank_zero_output", "row_bounds", "row_range",
           "shutdown", "table_shards"]
