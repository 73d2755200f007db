"""Serving a saved model with its Engram tables row-sharded over the ranks: no rank ever holds a whole table.

:func:`load_sharded` builds the backbone without its tables (``EngramLM.from_pretrained(dir, tables=False)``),
checks the per-rank memory budget (:func:`~engram.distributed.sharding.check_budget`) before reading a byte
of a table, and fills each rank's :class:`~engram.distributed.memory.ShardedMemory` shards straight from
disk, in pieces, into the shard's own memory (no second copy of a shard, no mapping of the whole file):

* from an exported store directory (``engram export-memory``): the store's own reader, so every row is
  checked against the CRC32C the store keeps beside it; the store must fit the model (manifest, config,
  tokenizer, backbone identity) and, where the model's weights file holds the tables, each rank also
  checks that its rows' checksums are those of the weights file's rows (together the ranks check all);
* from the model directory, either layout (one ``model.safetensors`` or the per-rank ``tables/`` shards of a
  sharded training run, written by any world size): only this rank's rows, each checked against the
  directory's per-block checksums (:mod:`engram.model.table_rows`).

:class:`ShardedLM` runs inference with it. Its ``forward``/``generate`` are collectives (every rank, the
same calls, the same batch shape: generation replicates the prompts, which keeps the sampling identical on
every rank). :meth:`ShardedLM.evaluate` splits the batches round-robin over the ranks; a rank without a
batch in a round joins that round's exchanges with :meth:`ShardedMemory.idle`. Rows arrive bit for bit, so
logits, generated ids and the evaluation loss equal the single-process model's (at equal thread counts:
CPU kernels may round differently with a different number of threads).

Legend: B batch, T time, d row width, N rows of one piece.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engram.distributed.exchange import _world
from engram.distributed.memory import ShardedMemory
from engram.distributed.sharding import check_budget
from engram.model import table_rows
from engram.model.generation import generate as _generate
from engram.model.transformer import WEIGHTS_FILE, EngramLM
from engram.store.format import RAW_TORCH

__all__ = ["ShardedLM", "StoreRowReader", "WeightsRowReader", "load_sharded"]

_PIECE_BYTES = 32 << 20  # rows read per piece: bounds the transient memory of a read to this much


# ---------------------------------------------------------------------------------------------- readers
class WeightsRowReader:
    """Rows ``[start, end)`` of the tables in a model directory, either layout (one ``model.safetensors`` or
    per-rank ``tables/`` shards written by another world size), via :mod:`engram.model.table_rows`: only the
    requested rows (and the checksum blocks around them) are read, with plain reads (never mapped, so the
    pages do not count against the process), and every byte is checked against ``checksums.json``."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.dir = Path(model_dir)
        self.path = self.dir / WEIGHTS_FILE

    def has_tables(self, layers: Iterable[int]) -> bool:
        return all(table_rows.holds_table(self.dir, lay) for lay in layers)

    def shape(self, layer: int) -> tuple[tuple[int, int], torch.dtype]:
        if not table_rows.holds_table(self.dir, layer):
            raise ValueError(f"{self.dir} holds no table of Engram layer {layer}: it was saved without its "
                             f"tables; serve them from a store directory (engram export-memory)")
        R, d, dtype = table_rows.table_info(self.dir, layer)
        return (R, d), dtype

    def read_into(self, layer: int, start: int, out_Nd: torch.Tensor) -> None:
        table_rows.load_table_rows(self.dir, layer, start, start + out_Nd.shape[0], out=out_Nd)

    def row_sums(self, layer: int, start: int, end: int) -> np.ndarray:
        """CRC32C of rows ``[start, end)`` (to compare with a store's), read in pieces."""
        from engram.store.checksum import row_crcs

        out, pos = np.empty(end - start, dtype=np.uint32), 0
        for piece in table_rows.iter_table_rows(self.dir, layer, start, end, piece_bytes=_PIECE_BYTES):
            out[pos:pos + piece.shape[0]] = row_crcs(piece.view(RAW_TORCH[piece.dtype]).numpy())
            pos += piece.shape[0]
        return out

    def close(self) -> None:
        pass


class StoreRowReader:
    """Rows ``[start, end)`` of a store directory's tables, through :class:`~engram.store.disk.DiskStore`
    (every row checked against its CRC32C before it is handed out)."""

    def __init__(self, store_dir: str | os.PathLike, model: EngramLM, *, io: str = "auto") -> None:
        from engram.serve.export import open_store_dir

        # The backbone's identity here; the tables' (when the weights file holds them) per rank, by range.
        self.stores = open_store_dir(store_dir, model, verify="header", io=io, weights=None)

    def read_into(self, layer: int, start: int, out_Nd: torch.Tensor) -> None:
        self.stores[layer].gather(torch.arange(start, start + out_Nd.shape[0]), out_Nd)

    def row_sums(self, layer: int, start: int, end: int) -> np.ndarray:
        return self.stores[layer].row_sums()[start:end]

    def close(self) -> None:
        for s in self.stores.values():
            s.close()


def fill_shards(mem: ShardedMemory, reader) -> ShardedMemory:
    """Read every shard of ``mem`` from ``reader.read_into(layer, start, out_Nd)`` in pieces, straight into
    the shard (what :meth:`ShardedMemory.load_rows` does with one allocation per shard less)."""
    with torch.no_grad():
        for layer, s in mem.spec.items():
            shard = mem.shard(layer).data
            step = max(1, _PIECE_BYTES // max(1, s.dim * shard.element_size()))
            for a in range(0, s.rows, step):
                reader.read_into(layer, s.start + a, shard[a:a + step])
    return mem


# ---------------------------------------------------------------------------------------------- loading
def load_sharded(model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None, *, group=None,
                 exchange: str = "all_to_all", budget_bytes: int | None = None, io: str = "auto") -> ShardedLM:
    """A :class:`ShardedLM` of the model in ``model_dir``: this rank's rows only, from ``store_dir`` (a store
    directory) or else from the model's weights file. Every rank of ``group`` must call it.

    ``budget_bytes``: the most bytes of table shards one rank may hold; a world too small for it is refused
    before anything is read (ConfigError naming the smallest world that fits).
    """
    model = EngramLM.from_pretrained(model_dir, tables=False).eval()
    engrams = {blk.layer: blk.engram for blk in model.blocks if blk.engram is not None}
    if not engrams:
        raise ValueError(f"the model in {model_dir} has no Engram layers: there are no tables to shard")
    first = next(iter(engrams.values()))
    head_sizes = {lay: tuple(e.head_sizes) for lay, e in engrams.items()}
    world, rank = _world(group)
    check_budget(head_sizes, first.head_dim, first.table_dtype, world, budget_bytes)
    weights = WeightsRowReader(model_dir)
    reader = weights if store_dir is None else StoreRowReader(store_dir, model, io=io)
    try:
        for lay, e in engrams.items():
            if store_dir is None or weights.has_tables([lay]):
                shape, dtype = weights.shape(lay)
                if shape != (e.num_rows, e.head_dim) or dtype != e.table_dtype:
                    raise ValueError(f"{weights.path}: table of Engram layer {lay} is {list(shape)} {dtype}, the "
                                     f"config needs [{e.num_rows}, {e.head_dim}] {e.table_dtype}")
        mem = ShardedMemory(head_sizes, first.head_dim, first.table_dtype, group=group, exchange=exchange)
        fill_shards(mem, reader)
        if store_dir is not None and weights.has_tables(engrams):
            _check_rows_match(mem, reader, weights, store_dir)
    finally:
        weights.close()
        if reader is not weights:
            reader.close()
    return ShardedLM(model, mem)


def _check_rows_match(mem: ShardedMemory, store: StoreRowReader, weights: WeightsRowReader, store_dir) -> None:
    """Every rank compares its rows' store checksums with its weights file rows'; all ranks fail together."""
    bad = [lay for lay, s in mem.spec.items()
           if not np.array_equal(store.row_sums(lay, s.start, s.end), weights.row_sums(lay, s.start, s.end))]
    flag = torch.tensor([len(bad)], dtype=torch.int64)
    if mem.world > 1:
        dist.all_reduce(flag, group=mem.group)
    if int(flag):
        raise ValueError(f"store {store_dir} does not hold the tables of {weights.path} (rows of Engram layer(s) "
                         f"{bad or 'on another rank'} differ): export the store again from this model "
                         f"(engram export-memory)")


# ---------------------------------------------------------------------------------------------- inference
class ShardedLM:
    """A backbone replicated on every rank with its Engram rows from a :class:`ShardedMemory`.

    Every method is a collective over the memory's group (see the module docstring)."""

    def __init__(self, model: EngramLM, memory: ShardedMemory) -> None:
        self.model, self.memory = model, memory

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def rank(self) -> int:
        return self.memory.rank

    @property
    def world(self) -> int:
        return self.memory.world

    @torch.no_grad()
    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None):
        return self.model(idx_BT, targets_BT, memory=self.memory)

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompt_idx_BT: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """:func:`engram.model.generation.generate` with the same prompts and seed on every rank: every rank
        samples the same tokens (the logits are equal bit for bit), so the steps stay in lockstep."""
        return _generate(self.model, prompt_idx_BT, max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=generator, memory=self.memory)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean next-token loss over ``(ids_BT, targets_BT)`` batches, weighted by valid targets (!= -100).

        ``batches`` is the whole list, the same on every rank; rank r computes batches r, r + W, ... Every
        rank then sums all batches' losses in batch order, so the result is the single-process sum bit for bit.
        """
        n = len(batches)
        if n == 0:
            raise ValueError("evaluate needs at least one batch")
        W, r = self.world, self.rank
        per_batch = torch.zeros(n, 2, dtype=torch.float64)  # (loss, valid targets) of each batch
        for i in range(r, -(-n // W) * W, W):
            if i >= n:
                self.memory.idle()  # a rank out of batches still serves its rows to the others
                continue
            x_BT, y_BT = batches[i]
            out = self.model(x_BT, y_BT, memory=self.memory)
            per_batch[i, 0], per_batch[i, 1] = float(out.loss), int((y_BT != -100).sum())
        if W > 1:
            dist.all_reduce(per_batch, group=self.memory.group)  # each entry is one rank's value plus zeros
        total, count = 0.0, 0
        for loss, k in per_batch.tolist():
            total += loss * int(k)
            count += int(k)
        return total / max(1, count)

    def peak_rss_bytes(self) -> int:
        """This process's peak resident set so far (``getrusage`` maxrss)."""
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
