"""Import the Engram tables of a DeepSeek-V4.1-layout checkpoint into a store directory, streaming.

A V4.1 checkpoint is sharded safetensors plus ``model.safetensors.index.json`` (its ``weight_map``
names the shard of each tensor) and a ``config.json`` (:class:`engram.v41.V41Config`). Each Engram
layer ``i`` holds, under the checkpoint's key prefix (the released files name them
``layers.{i}.engram.``; a transformers save of ``DeepseekV41ForCausalLM`` adds ``model.``, and both
are found):

    embed.weight  [rows, head_dim]        float8_e4m3fn    the table (~100 GB per layer in the release)
    embed.scale   [rows, head_dim / 32]   float8_e8m0fnu   one power-of-two scale per 32 channels
    wkv.weight, q_weight, k_weight                         the layer's small dense weights

:func:`import_v41` writes the store directory::

    layer_<i>.engram     the table of layer i as an fp8 row store (engram.store.format, version 3): row r
                         is the checkpoint's row r, addressed from 0 with the per-(order, head) offsets
                         V41Hasher adds, each row packed with its scales
    layer_<i>.dense.safetensors   layer i's dense weights under their names in the layer (``wkv.weight``, ...)
    manifest.json        format "engram-memory", flavour "v41": the V4.1 config, the layers with their
                         bucket primes, the row width and dtype, an export id every layer file carries,
                         the table digests (as `engram verify` checks them) and the dense files'
                         digests; written last

Tables are read in row chunks and written as they arrive, so memory stays at a few chunks whatever
the table size (``chunk_rows``): ``safe_open(...).get_slice`` checks each tensor's dtype and shape,
and the rows are then read with pread at the offsets the safetensors header gives (get_slice's views
of the mapped file would keep every page read resident), dropped from the page cache behind the
reader. Everything is written into a temporary directory beside the
output and swapped in at the end (:func:`engram.atomic.replace_dir`), the manifest last, so an
interrupted import leaves the previous directory or none. A float (fp32/bf16/fp16) table is stored in
its own dtype instead. :mod:`engram.serve.v41` serves the result.
"""

# Shapes: R rows of one layer's table, E row width (head_dim), S = E / 32 scales per row, n rows per chunk.

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_path, replace_dir, write_json_atomic
from engram.config import ConfigError
from engram.serve.identity import raw_row_crcs
from engram.store.checksum import crc32c
from engram.store.format import DTYPE_NAMES, FP8, FP8_BLOCK, write_store
from engram.v41 import V41Config, bucket_primes

__all__ = ["FLAVOUR", "INDEX_FILE", "dense_digest", "find_prefix", "import_v41", "v41_dense_file", "v41_layer_file"]

INDEX_FILE = "model.safetensors.index.json"
FLAVOUR = "v41"
DENSE_NAMES = ("wkv.weight", "q_weight", "k_weight")
_CHUNK_BYTES = 64 << 20  # table bytes read per chunk by default
_FLOAT_TABLES = (torch.float32, torch.bfloat16, torch.float16)


def v41_layer_file(layer: int) -> str:
    return f"layer_{int(layer)}.engram"


def v41_dense_file(layer: int) -> str:
    return f"layer_{int(layer)}.dense.safetensors"


def _weight_map(ckpt: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index JSON (or the keys of a lone model.safetensors)."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        if not isinstance(wm, dict):
            raise ConfigError(f"{index}: weight_map must be an object of tensor name -> shard file")
        return {str(k): str(v) for k, v in wm.items()}
    single = ckpt / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single.name)
    raise ConfigError(f"{ckpt} has neither {INDEX_FILE} nor model.safetensors: not a safetensors checkpoint")


def find_prefix(weight_map: dict[str, str], layers: Iterable[int]) -> str:
    """The key prefix of the Engram tensors (``""`` for the released ``layers.{i}.engram.`` names,
    ``"model."`` for a transformers save), the same for every layer; ConfigError if not found."""
    found = set()
    for lay in layers:
        tail = f"layers.{lay}.engram.embed.weight"
        hits = [k[: -len(tail)] for k in weight_map if k.endswith(tail) and (k == tail or k[-len(tail) - 1] == ".")]
        if not hits:
            raise ConfigError(f"the checkpoint has no table of Engram layer {lay} (no key ending in {tail!r})")
        if len(hits) > 1:
            raise ConfigError(f"the checkpoint has several tables of Engram layer {lay}: {sorted(hits)}")
        found.add(hits[0])
    if len(found) != 1:
        raise ConfigError(f"the Engram tables sit under different key prefixes {sorted(found)}")
    return found.pop()


class _Digest:
    """sha256 of the per-row CRC32C of the rows streamed through it: the manifest's table digest
    (engram.serve.identity.digest_of_sums) computed on the way, without keeping the sums."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, packed_rows) -> None:
        self.h.update(np.ascontiguousarray(raw_row_crcs(packed_rows), dtype="<u4").tobytes())

    def value(self) -> str:
        return "sha256:" + self.h.hexdigest()


def _tensor_offset(shard: Path, key: str) -> int:
    """File offset of tensor ``key``'s data in a safetensors file (8-byte header length, JSON header,
    then the data; each tensor's ``data_offsets`` count from the data's start)."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100 << 20:
            raise ConfigError(f"{shard} is not a safetensors file (implausible header length {n})")
        header = json.loads(f.read(n))
    return 8 + n + int(header[key]["data_offsets"][0])


def _read_rows(fd: int, offset: int, row_bytes: int, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a row-major tensor at ``offset``, as uint8 [b - a, row_bytes], read with pread and
    then dropped from the page cache (the import never reads them again)."""
    buf = np.empty((b - a, row_bytes), np.uint8)
    view, got, at = memoryview(buf).cast("B"), 0, offset + a * row_bytes
    while got < len(view):
        k = os.preadv(fd, [view[got:]], at + got)
        if k <= 0:
            raise ConfigError(f"the checkpoint file ends inside a table (row {a + got // row_bytes})")
        got += k
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, at, len(view), os.POSIX_FADV_DONTNEED)
    return buf


def _table_pieces(shard: Path, wkey: str, scales: tuple[Path, str] | None, row_bytes: int, chunk_rows: int,
                  rows: int, digest: _Digest):
    """Yield the table's rows chunk by chunk (packed with their scales for fp8) and feed ``digest``.

    The bytes are read with pread at the offsets the safetensors header gives, not through
    ``safe_open(...).get_slice``: its slices are views of a mapping of the whole file, and every page
    they touch stays in this process's resident set while the file is open (1.1 GB after a 1 GB
    table), where pread keeps it at one chunk.
    """
    fds = [os.open(shard, os.O_RDONLY)]
    try:
        w_off = _tensor_offset(shard, wkey)
        if scales is not None:
            fds.append(os.open(scales[0], os.O_RDONLY))
            s_off, s_bytes = _tensor_offset(scales[0], scales[1]), row_bytes // FP8_BLOCK
        for a in range(0, rows, chunk_rows):
            b = min(rows, a + chunk_rows)
            piece = _read_rows(fds[0], w_off, row_bytes, a, b)
            if scales is not None:
                piece = np.concatenate([piece, _read_rows(fds[1], s_off, s_bytes, a, b)], axis=1)
            out = torch.from_numpy(piece)
            digest.add(out)
            yield out
            del piece, out
    finally:
        for fd in fds:
            os.close(fd)


def _check_table(lay: int, key: str, shape, dtype, rows: int, E: int) -> None:
    if len(shape) != 2 or shape[0] != rows or shape[1] != E:
        raise ConfigError(f"{key} is {list(shape)}, the config says [{rows}, {E}] (engram_num_embeddings of layer "
                          f"{lay}, engram_head_dim)")
    if dtype != FP8 and dtype not in _FLOAT_TABLES:
        raise ConfigError(f"{key} is {dtype}: a V4.1 table is float8_e4m3fn (or a float dtype)")


def import_v41(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, layers: Iterable[int] | None = None,
               chunk_rows: int | None = None, progress=None) -> Path:
    """Stream the Engram tables and dense weights of a V4.1 checkpoint into the store directory ``out_dir``.

    layers: the Engram layer ids to import (default: every one of ``engram_layer_ids``).
    chunk_rows: rows read and written per step (default: 64 MiB of table); memory stays at a few chunks.
    progress: called with the bytes of each chunk written, if given.
    Returns ``out_dir``. Raises ConfigError for a checkpoint that does not match its config (shapes,
    dtypes, missing tensors), OSError(ENOSPC) when the disk cannot hold a table.
    """
    from safetensors import safe_open

    ckpt, final = Path(checkpoint_dir), Path(out_dir)
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint directory {ckpt} does not exist")
    cfg = V41Config.from_pretrained(ckpt)
    wanted = list(cfg.engram_layer_ids) if layers is None else [int(x) for x in layers]
    for lay in wanted:
        cfg.layer_index(lay)  # ConfigError for a layer without an Engram
    if not wanted or len(set(wanted)) != len(wanted):
        raise ConfigError(f"layers must be distinct Engram layer ids, got {wanted}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    wmap = _weight_map(ckpt)
    prefix = find_prefix(wmap, wanted)
    primes = bucket_primes(cfg)
    E = cfg.engram_head_dim

    staged = final.with_name(f".{final.name}.import-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        export_id = uuid.uuid4().hex
        spec, digests, dense_digests, dtype = {}, {}, {}, None
        for lay in sorted(wanted):
            base = f"{prefix}layers.{lay}.engram."
            rows = cfg.engram_num_embeddings[cfg.layer_index(lay)]
            wkey, skey = base + "embed.weight", base + "embed.scale"
            shard = ckpt / wmap[wkey]
            with safe_open(shard, "pt") as f:
                sl = f.get_slice(wkey)
                wdtype = getattr(torch, _ST_DTYPES.get(sl.get_dtype(), "uint8"))
                _check_table(lay, wkey, sl.get_shape(), wdtype, rows, E)
            fp8 = wdtype == FP8
            if fp8:
                if skey not in wmap:
                    raise ConfigError(f"the checkpoint has no {skey}: an fp8 table needs its scales")
                with safe_open(ckpt / wmap[skey], "pt") as g:
                    s_sl = g.get_slice(skey)
                    if s_sl.get_shape() != [rows, E // FP8_BLOCK] or s_sl.get_dtype() not in ("F8_E8M0", "U8"):
                        raise ConfigError(f"{skey} is {s_sl.get_dtype()} {s_sl.get_shape()}, expected E8M0 "
                                          f"[{rows}, {E // FP8_BLOCK}]")
            if dtype not in (None, wdtype):
                raise ConfigError(f"the Engram tables have different dtypes ({DTYPE_NAMES[dtype]}, {wdtype})")
            dtype = wdtype
            row_bytes = E * (1 if fp8 else wdtype.itemsize)
            n = chunk_rows or max(1, _CHUNK_BYTES // (E + E // FP8_BLOCK if fp8 else row_bytes))
            digest = _Digest()
            pieces = _table_pieces(shard, wkey, (ckpt / wmap[skey], skey) if fp8 else None, row_bytes, n, rows,
                                   digest)
            if not fp8:  # float rows: the pieces are their raw bytes, viewed back as the dtype
                pieces = (p.view(wdtype) for p in pieces)
            if progress is not None:
                pieces = _counting(pieces, progress)
            write_store(staged / v41_layer_file(lay), pieces, num_rows=rows, dim=E, dtype=dtype,
                        meta={"layer": lay, "export_id": export_id, "flavour": FLAVOUR, "source_key": wkey})
            digests[str(lay)] = digest.value()
            spec[str(lay)] = {"file": v41_layer_file(lay), "num_rows": rows, "head_sizes": primes[cfg.layer_index(lay)],
                              "dense": v41_dense_file(lay)}
            dense = {}  # one layer's at a time: wkv alone is ~300 MB in the release
            for name in DENSE_NAMES:
                key = base + name
                if key not in wmap:
                    raise ConfigError(f"the checkpoint has no {key} (a dense weight of Engram layer {lay})")
                with safe_open(ckpt / wmap[key], "pt") as f:
                    dense[name] = f.get_tensor(key)
            dense_digests[str(lay)] = _write_dense(staged / v41_dense_file(lay), dense)
            del dense
        manifest = {"format": "engram-memory", "version": 2, "flavour": FLAVOUR,
                    "config_hash": hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest(),
                    "vocab_hash": None, "dim": E, "dtype": DTYPE_NAMES[dtype], "layers": spec,
                    "export_id": export_id, "v41_config": cfg.to_dict(), "key_prefix": prefix,
                    "weights": {"tables": digests, "dense": dense_digests,
                                "backbone": "sha256:" + hashlib.sha256(json.dumps(dense_digests, sort_keys=True)
                                                                       .encode()).hexdigest()}}
        write_json_atomic(staged / "manifest.json", manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir(staged, final)
    return final


_ST_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _counting(pieces, progress):
    for p in pieces:
        progress(p.numel() * p.element_size())
        yield p


def _write_dense(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Save the dense weights (small) crash-safely; returns their digest (names, dtypes, shapes, CRC32C)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return dense_digest(tensors)


def dense_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each dense tensor's name, dtype, shape and the CRC32C of its bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        crc = crc32c(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{crc:08x}\n".encode())
    return "sha256:" + h.hexdigest()
