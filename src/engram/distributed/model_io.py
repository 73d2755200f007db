"""Writing the trained model of a row-sharded run: rank 0 the backbone, every rank its table rows.

With `engram.model.sharded_tables` (a model directory whose tables are stored per row range), each rank writes
its own rows and no rank ever holds a whole table. Without it, the rows are gathered to rank 0, which writes an
ordinary `save_pretrained` directory (fine for tables that fit one process).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_sharded_model(trainer, directory: Path) -> Path:
    """Collective: write ``trainer``'s model (backbone + its row-sharded tables) to ``directory``."""
    try:
        from engram.model import sharded_tables
    except ImportError:
        sharded_tables = None
    mem = trainer.mem
    if sharded_tables is not None and mem is not None:
        if trainer.is_main:
            sharded_tables.save_backbone(trainer.model, directory, trainer._tokenizer_files())
        if _on():
            dist.barrier()
        for layer, s in mem.spec.items():
            sharded_tables.save_table_shard(directory, layer, s.start, s.end, s.num_rows, mem.shard(layer).detach())
        if _on():
            dist.barrier()
        if trainer.is_main:
            sharded_tables.seal(directory)
        if _on():
            dist.barrier()
        return directory
    return _save_gathered(trainer, directory)


def _save_gathered(trainer, directory: Path) -> Path:
    """Stand-in until `engram.model.sharded_tables` is there: gather the rows to rank 0, save one model."""
    # replaced by engram.model.sharded_tables at merge
    mem, model = trainer.mem, trainer.model
    shards = {layer: mem.shard(layer).detach() for layer in mem.spec} if mem is not None else {}
    parts = [shards]
    if _on():
        parts = [None] * dist.get_world_size() if trainer.is_main else None
        dist.gather_object(shards, parts, dst=0)
    if trainer.is_main:
        with torch.random.fork_rng():
            full = type(model)(model.cfg, model.vocab)
        missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected, unexpected
        with torch.no_grad():
            for blk in full.blocks:
                if blk.engram is not None:
                    blk.engram.table.weight.copy_(torch.cat([p[blk.layer] for p in parts]))
        full.save_pretrained(directory, extra_files=trainer._tokenizer_files())
    if _on():
        dist.barrier()
    return directory
