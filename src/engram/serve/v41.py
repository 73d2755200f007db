"""Serve the Engram layers of an imported DeepSeek-V4.1 checkpoint from its store directory.

:func:`open_v41_store` opens what ``engram import-v41`` wrote (:mod:`engram.serve.v41_import`): per
layer a :class:`~engram.v41.V41Engram` built without its table (``table=False``) carrying the dense
weights from ``layer_<i>.dense.safetensors``, and the layer's row store (fp8 rows dequantised to float32 on
lookup, optionally behind a hot-row cache of packed rows). :meth:`V41StoreLayers.forward` looks the
hash ids' rows up in the store and runs the layer on them, giving exactly what the in-memory layer
loaded from the same checkpoint gives (the rows are the same bits, the arithmetic the same).

Legend: B batch, T tokens, H hc streams, D hidden size, C ids per token, E row width.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engram.serve.export import read_manifest
from engram.serve.v41_import import FLAVOUR, dense_digest
from engram.store.disk import DiskStore
from engram.store.format import DTYPES, FP8
from engram.store.fp8rows import Fp8Rows
from engram.v41 import V41Config, V41Engram

__all__ = ["V41StoreLayers", "open_v41_store"]


class V41StoreLayers:
    """The Engram layers of a V4.1 store directory, their rows served from its row stores.

    ``modules[layer_id]`` is the table-less V41Engram, ``stores[layer_id]`` the RowStore serving its
    rows as float32. A context manager; :meth:`close` closes the stores.
    """

    def __init__(self, config: V41Config, modules: dict[int, V41Engram], stores: dict) -> None:
        self.config, self.modules, self.stores = config, modules, stores

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.modules)

    def rows(self, layer_id: int, hash_ids_BTC: torch.Tensor) -> torch.Tensor:
        """The rows [B, T, C, E] of this layer's hash ids, from its store (float32)."""
        store = self.stores[layer_id]
        flat = store.gather(hash_ids_BTC.reshape(-1).cpu())
        return flat.view(*hash_ids_BTC.shape, store.dim).to(hash_ids_BTC.device)

    @torch.no_grad()
    def forward(self, layer_id: int, hidden_streams: torch.Tensor, hash_ids: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``V41Engram.forward`` of layer ``layer_id`` (its real id) with the rows read from the store."""
        if layer_id not in self.modules:
            raise ValueError(f"layer {layer_id} is not in this store (layers {self.layer_ids})")
        module = self.modules[layer_id]
        return module(hidden_streams, hash_ids, token_mask, emb=self.rows(layer_id, hash_ids))

    __call__ = forward

    def stats(self) -> dict[int, dict]:
        return {lay: s.stats() for lay, s in sorted(self.stores.items())}

    def close(self) -> None:
        for s in self.stores.values():
            s.close()

    def __enter__(self) -> V41StoreLayers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_v41_store(store_dir: str | os.PathLike, *, layers=None, io: str = "auto", verify: str = "header",
                   cache_bytes: int = 0, policy: str = "lru", device: str | torch.device = "cpu") -> V41StoreLayers:
    """Open a V4.1 store directory (``engram import-v41``) for serving; see the module docstring.

    layers: the layer ids to open (default: all in the store). io, verify: see :class:`DiskStore`.
    cache_bytes: > 0 puts a cache of packed rows in front of each layer's store, split evenly.
    device: where the modules (and so the layer computation) live.
    """
    from safetensors.torch import load_file

    from engram.store.cache import CachedStore

    d = Path(store_dir)
    manifest = read_manifest(d)
    if manifest.get("flavour") != FLAVOUR:
        raise ValueError(f"store {d} is not a DeepSeek-V4.1 import (write one with `engram import-v41`)")
    cfg = V41Config.from_dict(manifest["v41_config"])
    have = sorted(int(k) for k in manifest["layers"])
    wanted = have if layers is None else [int(x) for x in layers]
    missing = sorted(set(wanted) - set(have))
    if missing:
        raise ValueError(f"store {d} holds Engram layers {have}, not {missing}")
    modules, stores = {}, {}
    try:
        for lay in wanted:
            spec = manifest["layers"][str(lay)]
            dense = load_file(d / spec["dense"])
            if dense_digest(dense) != manifest["weights"]["dense"][str(lay)]:
                raise ValueError(f"{d / spec['dense']} does not match the digest its manifest records: it belongs "
                                 "to another import; import the checkpoint again")
            dtype = DTYPES[manifest["dtype"]]
            disk = DiskStore(d / spec["file"], io=io, verify=verify, expect={
                "num_rows": spec["num_rows"], "dim": manifest["dim"], "dtype": dtype,
                "meta": {"layer": lay, "export_id": manifest["export_id"]}})
            store = disk
            if cache_bytes > 0:
                store = CachedStore(disk, max(disk.row_bytes, cache_bytes // len(wanted)), policy=policy)
            stores[lay] = Fp8Rows(store, manifest["dim"], torch.float32) if dtype == FP8 else store
            if store is not disk:
                stores[lay] = _Owning(stores[lay], disk)
            m = V41Engram(cfg, lay, table=False)
            m.load_state_dict(dense, strict=True)
            modules[lay] = m.to(device).eval()
    except BaseException:
        for s in stores.values():
            s.close()
        raise
    return V41StoreLayers(cfg, modules, stores)


class _Owning:
    """A store that also closes ``also`` (the disk store behind a cache, which a cache does not close)."""

    def __init__(self, store, also) -> None:
        self._store, self._also = store, also

    def __getattr__(self, name):
        return getattr(self._store, name)

    def close(self) -> None:
        self._store.close()
        self._also.close()
