"""Writing the trained model of a row-sharded run: rank 0 the backbone, every rank its own table rows.

The directory is a sharded-tables model directory (:mod:`engram.model.sharded_tables`): ``model.safetensors``
without the tables, ``tables/layer_<L>.rows-<a>-<b>.safetensors`` per rank, then ``checksums.json`` over all
of it. No rank ever holds a whole table; ``EngramLM.from_pretrained``, ``engram export-memory`` and sharded
serving on any number of ranks read it. The sequence is the one the format asks for: rank 0 clears the
previous save, every rank writes, rank 0 seals once all have written.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from engram.model import sharded_tables


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def save_sharded_model(trainer, directory: Path) -> Path:
    """Collective: write ``trainer``'s model (backbone + its row-sharded tables) to ``directory``."""
    mem, directory = trainer.mem, Path(directory)
    if trainer.is_main:
        sharded_tables.begin_save(directory)
    _barrier()
    if trainer.is_main:
        sharded_tables.save_backbone(trainer.model, directory, trainer._tokenizer_files())
    if mem is not None:
        for layer, s in mem.spec.items():
            sharded_tables.save_table_shard(directory, layer, s.start, s.end, s.num_rows, mem.shard(layer).detach())
    _barrier()
    if trainer.is_main:
        sharded_tables.seal(directory)
    _barrier()
    return directory
