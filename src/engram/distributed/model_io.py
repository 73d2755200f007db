"""Writing the trained model of a row-sharded run: rank 0 the backbone, every rank its own table rows.

An FSDP2 backbone is gathered whole first, tensor by tensor on every rank (a collective), and only rank 0
keeps the gathered tensors.

The directory is a sharded-tables model directory (:mod:`engram.model.sharded_tables`): ``model.safetensors``
without the tables, ``tables/layer_<L>.rows-<a>-<b>.safetensors`` per rank, then ``checksums.json`` over all
of it. No rank ever holds a whole table; ``EngramLM.from_pretrained``, ``engram export-memory`` and sharded
serving on any number of ranks read it. The sequence is the one the format asks for: rank 0 clears the
previous save, every rank writes, rank 0 seals once all have written.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from engram.distributed.parallel import full_state_dict
from engram.model import sharded_tables


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


class _Gathered:
    """A sharded model seen with its gathered state dict: what `sharded_tables.save_backbone` reads of it."""

    def __init__(self, model, state: dict):
        self._model, self._state = model, state

    def state_dict(self) -> dict:
        return self._state

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def save_sharded_model(trainer, directory: Path) -> Path:
    """Collective: write ``trainer``'s model (backbone + its row-sharded tables) to ``directory``."""
    mem, directory = trainer.mem, Path(directory)
    backbone = trainer.model
    if any(hasattr(p, "full_tensor") for p in backbone.parameters()):  # FSDP2: the same on every rank
        backbone = _Gathered(backbone, full_state_dict(backbone, keep=trainer.is_main))
    if trainer.is_main:
        sharded_tables.begin_save(directory)
    _barrier()
    if trainer.is_main:
        sharded_tables.save_backbone(backbone, directory, trainer._tokenizer_files())
    if mem is not None:
        for layer, s in mem.spec.items():
            sharded_tables.save_table_shard(directory, layer, s.start, s.end, s.num_rows, mem.shard(layer).detach())
    _barrier()
    if trainer.is_main:
        sharded_tables.seal(directory)
    _barrier()
    return directory
