"""Model directories whose Engram tables are written in row shards (and, re-exported from
:mod:`engram.model.table_rows`, reading any row range back).

A sharded training run must not gather a whole table on one rank to save it, and a sharded server must
not read more than its own rows. In a *sharded-tables* model directory::

    model.safetensors                                every tensor but the Engram tables
    tables/layer_<L>.rows-<start>-<end>.safetensors  rows [start, end) of layer L's flat [R, d] table
    config.json, vocab.safetensors, ...              as written by ``save_pretrained``
    checksums.json                                   over every file, the shards included, written last

Each shard holds its rows under the usual key (:func:`engram_table_key`) with its layer, range and the
table's total rows in its metadata. The shards of a layer tile ``[0, R)``; who wrote how many does not
matter to a reader: :func:`load_table_rows` reads any range (written on 2 ranks, read on 3) from either
layout, the single ``model.safetensors`` included (see :mod:`engram.model.table_rows`).

Saving from W ranks (the distributed package wires the barriers)::

    rank 0: begin_save(dir); barrier; every rank: save_table_shard(dir, L, start, end, R, rows) for its
    rows of each layer, rank 0 also save_backbone(model, dir); barrier; rank 0: seal(dir)

Nothing here imports ``torch.distributed``: a rank's rows are a plain tensor.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from engram.model import checksums
from engram.model.persistence import (
    _FORMAT,
    CONFIG_FILE,
    SHARD_DIR,
    VOCAB_FILE,
    WEIGHTS_FILE,
    _write_model_files,
    engram_table_key,
    load_config,
)
from engram.model.table_rows import (
    SHARD_FORMAT,
    SHARDED_TABLES,
    TableSource,
    check_shards,
    describe,
    holds_table,
    is_sharded,
    iter_table_rows,
    load_table_rows,
    open_safetensors,
    shard_file,
    shards_on_disk,
    table_shape,
)

__all__ = ["SHARD_DIR", "TableSource", "begin_save", "check_shards", "describe", "holds_table", "is_sharded",
           "iter_table_rows", "load_table_rows", "save_backbone", "save_sharded", "save_table_shard", "seal",
           "shard_file", "split_rows", "table_shape"]


def split_rows(num_rows: int, parts: int) -> list[int]:
    """``parts + 1`` row boundaries by the rule DTensor's ``Shard(0)`` uses (ceil-sized chunks, the last
    parts taking what is left, possibly nothing): part p holds ``[b[p], b[p + 1])``. The same rule as
    ``engram.distributed.sharding.row_bounds``, which this layer cannot import."""
    if parts < 1 or num_rows < 0:
        raise ValueError(f"cannot split {num_rows} rows into {parts} parts")
    c = math.ceil(num_rows / parts)
    return [min(p * c, num_rows) for p in range(parts)] + [num_rows]


# ---------------------------------------------------------------------------------------------- writing

def begin_save(directory: str | os.PathLike) -> Path:
    """Prepare ``directory`` for a sharded save, once, before any rank writes (rank 0, then a barrier).

    Removes the checksum manifest (until :func:`seal` the directory does not load, whatever happens in
    between) and the table shards of an earlier save, which could be cut at other rows.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    checksums.unseal(d)
    if (d / SHARD_DIR).exists():
        shutil.rmtree(d / SHARD_DIR)
        checksums.fsync_dir(d)
    return d


def save_backbone(model, directory: str | os.PathLike,
                  extra_files: Mapping[str, bytes | str | os.PathLike] | None = None) -> Path:
    """Write what rank 0 writes of a sharded-tables directory: ``model.safetensors`` without the Engram
    tables (the model may hold them or not), ``config.json``, ``vocab.safetensors`` and ``extra_files``
    (see :func:`engram.model.persistence.save_pretrained`). The weights file records that its tables are
    in ``tables/``, so a load never mistakes the directory for one saved without tables."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    checksums.unseal(d)
    tables = {engram_table_key(blk.layer) for blk in model.blocks if blk.engram is not None}
    _write_model_files(model, d, extra_files, skip=tables,
                       metadata={"format": _FORMAT, "engram_tables": SHARDED_TABLES})
    return d


def save_table_shard(directory: str | os.PathLike, layer: int, start: int, end: int, total_rows: int,
                     rows: torch.Tensor) -> Path | None:
    """Write rows ``[start, end)`` of layer ``layer``'s ``[total_rows, d]`` table (what each rank writes).

    ``rows`` is ``[end - start, d]`` (a rank's local part; copied to the CPU). The file is written under
    a temporary name and renamed, so a crash leaves no partial shard. Returns its path, or None for an
    empty range (a rank owning no rows writes nothing).
    """
    from safetensors.torch import save_file

    from engram.atomic import atomic_path

    layer, start, end, total_rows = int(layer), int(start), int(end), int(total_rows)
    if not 0 <= start <= end <= total_rows:
        raise ValueError(f"layer {layer}: rows [{start}, {end}) are not a range of a {total_rows}-row table")
    if rows.dim() != 2 or rows.shape[0] != end - start:
        raise ValueError(f"layer {layer}: rows [{start}, {end}) need a [{end - start}, d] tensor, "
                         f"got {list(rows.shape)}")
    if start == end:
        return None
    path = Path(directory) / shard_file(layer, start, end)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": SHARD_FORMAT, "layer": str(layer), "start": str(start), "end": str(end),
            "total_rows": str(total_rows)}
    with atomic_path(path) as tmp:
        save_file({engram_table_key(layer): rows.detach().contiguous().cpu()}, str(tmp), metadata=meta)
    return path


def save_sharded(model, directory: str | os.PathLike, writers: int,
                 extra_files: Mapping[str, bytes | str | os.PathLike] | None = None) -> Path:
    """Save a model that holds its tables as a sharded-tables directory cut for ``writers`` ranks, from
    one process: what a run on that many ranks writes (to convert a directory, or to test readers)."""
    if not model.has_tables:
        raise ValueError("the model holds no Engram tables to write in shards")
    d = begin_save(directory)
    save_backbone(model, d, extra_files)
    for blk in model.blocks:
        if blk.engram is not None:
            w = blk.engram.table.weight
            b = split_rows(w.shape[0], writers)
            for p in range(writers):
                save_table_shard(d, blk.layer, b[p], b[p + 1], w.shape[0], w[b[p]:b[p + 1]])
    return seal(d)


def seal(directory: str | os.PathLike) -> Path:
    """Check a sharded-tables directory is complete, then write ``checksums.json`` over every file.

    Run once after every rank's shards and rank 0's backbone exist. Every Engram layer of the saved
    config must be tiled by its shards, exactly: no gap, no overlap, the config's row count, width and
    dtype; a stray shard (another layer) or a weights file that holds tables is refused too. Raises
    ValueError naming what is wrong, leaving the directory without a manifest (so it does not load).
    """
    d = Path(directory)
    checksums.unseal(d)  # a manifest from before the shards changed must not outlive a failed check
    if not is_sharded(d):
        raise ValueError(f"{d / WEIGHTS_FILE} was not written by save_backbone (it does not say its tables are "
                         f"in {SHARD_DIR}/): not a sharded-tables directory")
    specs = _config_tables(d)
    with open_safetensors(d / WEIGHTS_FILE) as f:
        inside = sorted(set(f.keys()) & {engram_table_key(lay) for lay in specs})
    if inside:
        raise ValueError(f"{d / WEIGHTS_FILE} holds Engram tables ({inside[:3]}) although they are in {SHARD_DIR}/")
    stray = sorted(set(shards_on_disk(d)) - set(specs))
    if stray:
        raise ValueError(f"{d / SHARD_DIR} holds shards of layers {stray}, which have no Engram table in "
                         f"{d / CONFIG_FILE} (Engram layers {sorted(specs)})")
    for lay, (R, dim, dtype) in sorted(specs.items()):
        _, (total, got_dim, got_dtype) = check_shards(d, lay)
        if (total, got_dim, got_dtype) != (R, dim, dtype):
            raise ValueError(f"the shards of Engram layer {lay} in {d / SHARD_DIR} make a [{total}, {got_dim}] "
                             f"{got_dtype} table, {d / CONFIG_FILE} says [{R}, {dim}] {dtype}")
    checksums.seal(d)
    return d


def _config_tables(d: Path) -> dict[int, tuple[int, int, torch.dtype]]:
    """``{layer: (rows, width, dtype)}`` of the Engram tables the config in ``d`` describes."""
    from engram.hashing import NgramHasher
    from engram.tokenizer.compression import CompressedVocab

    cfg = load_config(d)
    e = cfg.engram
    if e is None:
        return {}
    hasher = NgramHasher.from_config(e, CompressedVocab.load(d / VOCAB_FILE))
    dim = e.n_embed_per_ngram // e.n_head_per_ngram
    return {int(lay): (sum(hasher.head_sizes(lay)), dim, e.torch_table_dtype) for lay in e.layer_ids}


