"""Inference with the Engram tables outside the model: rows served by row stores and fetched ahead.

:class:`OffloadedLM` pairs an :class:`EngramLM` built without its tables (``from_pretrained(dir,
tables=False)``) with a :class:`~engram.serve.memory.StoreMemory` over one :class:`RowStore` per Engram
layer (RAM, disk, or a cache in front of either), passed as the model's memory provider on every call
(the model itself is not changed, so one backbone can serve several memories). The model computes all
layers' row ids from the token ids before its first block and hands them to the provider, which starts
the reads; each Engram layer waits only for its own rows. Evaluation prepares batch i+1's rows before
computing batch i. Stores return the exact bits of the table, so every output equals the all-in-RAM
model's.

:func:`open_memory` builds one from a model directory (and a store directory written by
:func:`engram.serve.export.export_tables` for ``memory="disk"``).
"""

# Shapes: B batch, T time, H hash heads, d row width, V vocabulary, R rows of one layer's table.

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from engram.model.generation import DecodeState
from engram.model.generation import generate as _generate
from engram.model.sharded_tables import holds_table, load_table_rows
from engram.model.transformer import WEIGHTS_FILE, EngramLM, ModelOutput
from engram.serve.export import dequantized, open_store_dir
from engram.serve.memory import StoreMemory
from engram.store.base import RamStore

__all__ = ["OffloadedLM", "access_profiles", "format_tier_stats", "open_memory"]

log = logging.getLogger(__name__)
_COUNTERS = ("requested", "unique", "hits", "misses", "bytes_read")


class OffloadedLM:
    """An EngramLM whose Engram rows come from row stores (see the module docstring).

    Args:
        model: the model; its own tables, if any, are not used.
        stores: ``{layer: RowStore}`` for exactly the model's Engram layers, each serving the flat
            ``[sum(head_sizes), d]`` table of its layer in the model's table dtype.
        prefetch, workers, max_pending, sync_rows: see :class:`~engram.serve.memory.StoreMemory`.
        own_stores: :meth:`close` also closes the stores.

    A context manager; :meth:`close` stops the prefetcher (never hangs) and closes owned stores.
    """

    def __init__(self, model: EngramLM, stores: dict, *, prefetch: bool = True, workers: int = 2,
                 max_pending: int = 4, own_stores: bool = True, sync_rows: int = 1024) -> None:
        if model.hasher is None:
            raise ValueError("the model has no Engram layers: there is nothing to serve from a store")
        engrams = {blk.layer: blk.engram for blk in model.blocks if blk.engram is not None}
        if not isinstance(stores, dict) or sorted(stores) != sorted(engrams):
            got = sorted(stores) if isinstance(stores, dict) else type(stores).__name__
            raise ValueError(f"stores must hold exactly the Engram layers {sorted(engrams)}, got {got}")
        for lay, eng in engrams.items():
            s = stores[lay]
            want, got = (eng.num_rows, eng.head_dim, eng.table_dtype), (s.num_rows, s.dim, s.dtype)
            if want != got:
                raise ValueError(f"store of Engram layer {lay} holds [{got[0]}, {got[1]}] {got[2]} rows, the model "
                                 f"needs [{want[0]}, {want[1]}] {want[2]}")
        self.model = model
        self.stores = dict(stores)
        self.own_stores = own_stores
        self._also_close: list = []  # stores behind owned wrappers (a cache need not close its backing)
        self.device = next(model.parameters()).device
        self.memory = StoreMemory(self.stores, {lay: list(e.head_sizes) for lay, e in engrams.items()},
                                  prefetch=prefetch, workers=workers, max_pending=max_pending, device=self.device,
                                  sync_rows=sync_rows)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def prefetcher(self):
        return self.memory.prefetcher

    @property
    def sync_rows(self) -> int:
        return self.memory.sync_rows

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                cache: DecodeState | None = None) -> ModelOutput:
        """Like ``EngramLM.forward(idx_BT, targets_BT, cache=cache)``, with the rows served by the stores.

        With ``cache`` (from ``self.model.new_decode_state``) the chunk continues the cached sequences,
        e.g. one given token per sequence: a decode step on known text (teacher forcing).
        """
        try:
            return self.model(idx_BT, targets_BT, cache=cache, memory=self.memory)
        except BaseException:
            self.memory.forget()
            raise

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompt_idx_BT: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """:func:`engram.model.generation.generate` with the rows served by the stores (same arguments,
        same output): the prompt's rows are read before the prefill's first block, each new token's
        before its step's."""
        try:
            return _generate(self.model, prompt_idx_BT, max_new_tokens, temperature=temperature, top_k=top_k,
                             generator=generator, memory=self.memory)
        except BaseException:
            self.memory.forget()
            raise

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean next-token loss over ``(ids_BT, targets_BT)`` batches, weighted by valid targets (!= -100).

        Pipelined: batch i+1's rows are requested before batch i is computed, so its reads overlap
        with batch i's compute.
        """
        it = iter(batches)
        nxt = next(it, None)
        if nxt is None:
            raise ValueError("evaluate needs at least one batch")
        total, n = 0.0, 0
        try:
            rows = self.model.engram_rows(nxt[0])
            self.memory.prepare(rows)
            while nxt is not None:
                (x_BT, y_BT), cur = nxt, rows
                nxt = next(it, None)
                if nxt is not None:
                    rows = self.model.engram_rows(nxt[0])
                    self.memory.prepare(rows)
                out = self.model(x_BT, y_BT, engram_rows=cur, memory=self.memory)
                k = int((y_BT != -100).sum())
                total += float(out.loss) * k
                n += k
        except BaseException:
            self.memory.forget()
            raise
        return total / max(1, n)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[int, dict[str, dict]]:
        """Per layer, the store's per-tier counters ``{layer: {tier: {...}}}``."""
        return {lay: s.stats() for lay, s in sorted(self.stores.items())}

    def tier_stats(self) -> dict[str, dict]:
        """Counters per tier summed over layers, e.g. ``{"cache": {...}, "disk": {...}}``."""
        out: dict[str, dict] = {}
        for per_tier in self.stats().values():
            for tier, c in per_tier.items():
                acc = out.setdefault(tier, dict.fromkeys(_COUNTERS, 0))
                for k in _COUNTERS:
                    acc[k] += int(c.get(k, 0))
        return out

    def reset_stats(self) -> None:
        for s in self.stores.values():
            s.reset_stats()

    def drop_page_cache(self) -> int:
        """Evict disk-backed stores' files from the page cache (cold start); returns how many files."""
        n = 0
        for s in [*self.stores.values(), *self._also_close]:
            if hasattr(s, "drop_page_cache"):
                s.drop_page_cache()
                n += 1
        return n

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the prefetcher and close owned stores; idempotent."""
        self.memory.close()
        if self.own_stores:
            for s in [*self.stores.values(), *self._also_close]:
                s.close()

    def __enter__(self) -> OffloadedLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_tier_stats(tiers: dict[str, dict]) -> str:
    """A small table of :meth:`OffloadedLM.tier_stats` (hit rate = hits / unique)."""
    lines = [f"{'tier':<8}{'requested':>12}{'unique':>12}{'hits':>12}{'misses':>12}{'hit rate':>10}{'bytes read':>12}"]
    for tier, c in tiers.items():
        rate = f"{c['hits'] / c['unique']:.1%}" if c["unique"] else "-"
        lines.append(f"{tier:<8}{c['requested']:>12,}{c['unique']:>12,}{c['hits']:>12,}{c['misses']:>12,}"
                     f"{rate:>10}{_human_bytes(c['bytes_read']):>12}")
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    k = min(3, (n.bit_length() - 1) // 10)
    return f"{n / 1024**k:,.1f} {('KiB', 'MiB', 'GiB')[k - 1]}"


def access_profiles(model: EngramLM, id_batches: Iterable[torch.Tensor]) -> dict:
    """Per-layer row access counts ``{layer: int64 [R]}`` of token-id batches, for ``policy="static"``.

    Profile on data other than what is then evaluated (e.g. the train split), or the cache knows the future.
    """
    from engram.store.profiling import access_profile

    batches = list(id_batches)
    engrams = {blk.layer: blk.engram for blk in model.blocks if blk.engram is not None}
    return {lay: access_profile((eng.flat_rows(model.engram_rows(x)[lay]).reshape(-1) for x in batches),
                                eng.num_rows)
            for lay, eng in engrams.items()}


def _ram_tables(model_dir: Path, model: EngramLM) -> dict[int, torch.Tensor]:
    """The tables the model directory holds (either layout), read into RAM and checked against its
    checksums (the tables=False load left them unverified)."""
    from engram.memory.hugepages import advise_hugepages

    out = {}
    for blk in model.blocks:
        if blk.engram is None or not holds_table(model_dir, blk.layer):
            continue
        # Filled row by row into memory of our own: "in RAM" must mean resident, or the first gathers
        # pay page faults (and device reads) instead of memory reads.
        table = torch.empty((blk.engram.num_rows, blk.engram.head_dim), dtype=blk.engram.table_dtype)
        advise_hugepages(table)
        out[blk.layer] = load_table_rows(model_dir, blk.layer, 0, table.shape[0], out=table)
    return out


def open_memory(model_dir: str | os.PathLike, memory: str = "ram", store_dir: str | os.PathLike | None = None,
                cache_bytes: int = 0, policy: str = "lru", profile: dict | None = None, *, prefetch: bool = True,
                workers: int = 2, max_pending: int = 4, verify: str = "header", sync_rows: int = 1024,
                io: str = "auto", model: EngramLM | None = None) -> OffloadedLM:
    """An :class:`OffloadedLM` for the model in ``model_dir`` (loaded without its tables).

    memory: ``"ram"``: the tables in RAM (read from the model's weights file, or from ``store_dir``
        when the weights hold none: every row checked against its checksum once, as it is loaded);
        ``"disk"``: read from the store directory ``store_dir``, every row checked as it is read. A store
        is refused unless it was exported from this model's exact weights (its tables when the model or
        its weights file holds them, else its backbone; see :func:`open_store_dir`). An fp8 store
        (``engram export-memory --dtype fp8``) keeps its rows packed in RAM, caches and on disk and
        serves them dequantised to the model's table dtype.
    cache_bytes: > 0 puts a hot-row cache of that many bytes in total in front of the stores, split
        across layers in proportion to their table sizes; ``policy`` "lru", "lfu" or "static" (the
        latter needs ``profile={layer: per-row counts}``, see :func:`access_profiles`).
    prefetch, workers, max_pending, sync_rows: see :class:`OffloadedLM`; verify: see :func:`open_store_dir`.
    io: how disk stores read rows, ``"auto"``, ``"direct"`` or ``"mmap"`` (see :class:`DiskStore`).
    model: the model of ``model_dir`` already loaded (e.g. with its tables, to compare against): its
        backbone is used as it is and its own tables are not, so two servings share one backbone in
        memory. Must have the directory's config. None loads the backbone from ``model_dir``.
    """
    if memory not in ("ram", "disk"):
        raise ValueError(f"memory must be 'ram' or 'disk', got {memory!r}")
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    model_dir = Path(model_dir)
    if model is None:
        model = EngramLM.from_pretrained(model_dir, tables=False).eval()
    else:
        _check_same_config(model, model_dir)
    if model.hasher is None:
        raise ValueError(f"the model in {model_dir} has no Engram layers: nothing to serve from memory")
    if memory == "disk" and store_dir is None:
        raise ValueError("memory='disk' needs store_dir (a directory written by `engram export-memory`)")
    stores: dict = {}
    backing: dict = {}
    try:
        if memory == "ram":
            tables = _ram_tables(model_dir, model)
            if len(tables) < len(model.hasher.layer_ids):
                if store_dir is None:
                    raise ValueError(f"{model_dir} holds no Engram tables; pass store_dir to "
                                     f"load them into RAM from a store")
                disk = open_store_dir(store_dir, model, verify=verify, weights=model_dir / WEIGHTS_FILE, packed=True)
                try:
                    tables = {lay: s.gather(torch.arange(s.num_rows)) for lay, s in disk.items()}
                finally:
                    for s in disk.values():
                        s.close()
            stores = {lay: RamStore(t) for lay, t in tables.items()}
        else:
            stores = open_store_dir(store_dir, model, verify=verify, io=io, weights=model_dir / WEIGHTS_FILE,
                                    packed=True)
        if cache_bytes > 0:
            backing, stores = stores, _with_cache(stores, cache_bytes, policy, profile)
        # fp8 stores: RAM tables and caches hold packed rows (a quarter of float32), dequantised on lookup
        stores = dequantized(stores, model)
        for s in [*stores.values(), *backing.values()]:
            s.reset_stats()  # a static cache's preload is not serving
        lm = OffloadedLM(model, stores, prefetch=prefetch, workers=workers, max_pending=max_pending,
                         sync_rows=sync_rows)
        lm._also_close = list(backing.values())
        return lm
    except BaseException:
        for s in [*stores.values(), *backing.values()]:
            s.close()
        raise


def _check_same_config(model, model_dir: Path) -> None:
    from engram.model.persistence import VOCAB_FILE, load_config
    from engram.tokenizer import CompressedVocab

    if not isinstance(model, EngramLM):
        raise ValueError(f"model must be an EngramLM, got {type(model).__name__}")
    cfg = load_config(model_dir)
    if cfg != model.cfg:
        raise ValueError(f"model= does not have the config saved in {model_dir}: pass the model of that directory")
    if cfg.engram is not None:  # same config, other tokenizer: the rows would be hashed differently
        saved = torch.from_numpy(CompressedVocab.load(model_dir / VOCAB_FILE).lookup.astype("int64"))
        if not torch.equal(saved, model.vocab_lookup.cpu()):
            raise ValueError(f"model= compresses the vocabulary differently from {model_dir / VOCAB_FILE}")


def _with_cache(stores: dict, cache_bytes: int, policy: str, profile: dict | None) -> dict:
    from engram.store.cache import CachedStore

    if policy == "static":
        if profile is None or sorted(profile) != sorted(stores):
            raise ValueError("policy 'static' keeps the rows an access profile ranks highest: pass profile="
                             "{layer: per-row counts} for every Engram layer (see access_profiles)")
    total = sum(s.num_rows * s.dim * s.dtype.itemsize for s in stores.values())
    out = {}
    try:
        for lay, s in sorted(stores.items()):
            budget = cache_bytes * (s.num_rows * s.dim * s.dtype.itemsize) // total
            row_bytes = s.dim * s.dtype.itemsize
            if budget < row_bytes:
                raise ValueError(f"a cache of {cache_bytes:,} bytes gives Engram layer {lay} {budget:,} bytes, less "
                                 f"than one row ({row_bytes} bytes); raise the budget, or use 0 for no cache")
            out[lay] = CachedStore(s, budget, policy=policy, profile=None if profile is None else profile[lay])
    except BaseException:
        for c in out.values():
            c.close()
        raise
    return out
