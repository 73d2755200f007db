"""Model directories whose Engram tables are written in row shards, and reading any row range back.

A sharded training run must not gather a whole table on one rank to save it, and a sharded server must
not read more than its own rows. In a *sharded-tables* model directory::

    model.safetensors                                every tensor but the Engram tables
    tables/layer_<L>.rows-<start>-<end>.safetensors  rows [start, end) of layer L's flat [R, d] table
    config.json, vocab.safetensors, ...              as written by ``save_pretrained``
    checksums.json                                   over every file, the shards included, written last

Each shard holds its rows under the usual key (:func:`engram_table_key`) with its layer, range and the
table's total rows in its metadata. The shards of a layer tile ``[0, R)``; who wrote how many does not
matter to a reader: :func:`load_table_rows` reads any range (written on 2 ranks, read on 3) from either
layout, the single ``model.safetensors`` included, and checks what it reads against ``checksums.json``
block by block (see :mod:`engram.model.checksums`), reading at most a block or two beyond its range.

Saving from W ranks (the distributed package wires the barriers)::

    rank 0: begin_save(dir); barrier; every rank: save_table_shard(dir, L, start, end, R, rows) for its
    rows of each layer, rank 0 also save_backbone(model, dir); barrier; rank 0: seal(dir)

Nothing here imports ``torch.distributed``: a rank's rows are a plain tensor.
"""

# Shapes: R rows of one layer's table, d row width, n rows of one piece.

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engram.model import checksums
from engram.model.persistence import (
    _FORMAT,
    _SAFETENSORS_DTYPES,
    CONFIG_FILE,
    SHARD_DIR,
    VOCAB_FILE,
    WEIGHTS_FILE,
    _write_model_files,
    engram_table_key,
    load_config,
)

__all__ = ["SHARD_DIR", "TableSource", "begin_save", "check_shards", "describe", "holds_table", "is_sharded",
           "iter_table_rows", "load_table_rows", "save_backbone", "save_sharded", "save_table_shard", "seal",
           "shard_file", "split_rows", "table_shape"]

SHARD_FORMAT = "engram-table-shard"
SHARDED_TABLES = "sharded"  # the weights file's "engram_tables" metadata in a sharded-tables directory
_PIECE_BYTES = 64 << 20  # rows read at once when streaming
_NAME = re.compile(r"layer_(\d+)\.rows-(\d+)-(\d+)\.safetensors")


def shard_file(layer: int, start: int, end: int) -> str:
    """The path, relative to the model directory, of the shard holding rows ``[start, end)`` of ``layer``."""
    return f"{SHARD_DIR}/layer_{int(layer)}.rows-{int(start)}-{int(end)}.safetensors"


def split_rows(num_rows: int, parts: int) -> list[int]:
    """``parts + 1`` row boundaries by the rule DTensor's ``Shard(0)`` uses (ceil-sized chunks, the last
    parts taking what is left, possibly nothing): part p holds ``[b[p], b[p + 1])``. The same rule as
    ``engram.distributed.sharding.row_bounds``, which this layer cannot import."""
    if parts < 1 or num_rows < 0:
        raise ValueError(f"cannot split {num_rows} rows into {parts} parts")
    c = math.ceil(num_rows / parts)
    return [min(p * c, num_rows) for p in range(parts)] + [num_rows]


@dataclass(frozen=True)
class TableSource:
    """One file holding rows ``[start, end)`` of a layer's table, under ``key``."""

    path: Path
    rel: str
    key: str
    start: int
    end: int


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
    ValueError naming what is wrong, and writes nothing then.
    """
    d = Path(directory)
    if not is_sharded(d):
        raise ValueError(f"{d / WEIGHTS_FILE} was not written by save_backbone (it does not say its tables are "
                         f"in {SHARD_DIR}/): not a sharded-tables directory")
    specs = _config_tables(d)
    with _open(d / WEIGHTS_FILE) as f:
        inside = sorted(set(f.keys()) & {engram_table_key(lay) for lay in specs})
    if inside:
        raise ValueError(f"{d / WEIGHTS_FILE} holds Engram tables ({inside[:3]}) although they are in {SHARD_DIR}/")
    stray = sorted(set(_shards_on_disk(d)) - set(specs))
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


# ---------------------------------------------------------------------------------------------- reading

def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def is_sharded(directory: str | os.PathLike) -> bool:
    """Whether ``directory``'s weights file was written by :func:`save_backbone` (its tables in shards)."""
    w = Path(directory) / WEIGHTS_FILE
    if not w.is_file():
        return False
    with _open(w) as f:
        return (f.metadata() or {}).get("engram_tables") == SHARDED_TABLES


def holds_table(directory: str | os.PathLike, layer: int) -> bool:
    """Whether the rows of layer ``layer``'s table are in ``directory``, in either layout (a directory saved
    from a model built with ``tables=False`` holds none). Cheap: reads file headers only."""
    d = Path(directory)
    if is_sharded(d) or _shards_on_disk(d).get(int(layer)):
        return True
    w = d / WEIGHTS_FILE
    if not w.is_file():
        return False
    with _open(w) as f:
        return engram_table_key(layer) in f.keys()


def _shards_on_disk(d: Path) -> dict[int, list[tuple[int, int, str]]]:
    """``{layer: [(start, end, rel)]}`` of the shard files in ``d/tables`` (sorted by range)."""
    out: dict[int, list[tuple[int, int, str]]] = {}
    root = d / SHARD_DIR
    for p in sorted(root.iterdir()) if root.is_dir() else ():
        m = _NAME.fullmatch(p.name)
        if m is None:
            continue  # temporaries of a writer, or files that are no shard
        lay, a, b = (int(g) for g in m.groups())
        out.setdefault(lay, []).append((a, b, f"{SHARD_DIR}/{p.name}"))
    for v in out.values():
        v.sort()
    return out


def check_shards(directory: str | os.PathLike, layer: int) -> tuple[list[TableSource], tuple[int, int, torch.dtype]]:
    """The shards of ``layer`` in ``directory/tables`` in row order and the table's ``(R, d, dtype)``,
    after checking they tile ``[0, R)`` exactly and that every file says what its name says.

    Raises ValueError naming the gap, the overlap, the missing shards or the inconsistent file.
    """
    d, layer = Path(directory), int(layer)
    found = _shards_on_disk(d).get(layer, [])
    if not found:
        raise ValueError(f"{d / SHARD_DIR} holds no shard of Engram layer {layer} (its table is missing)")
    key, sources, totals, kinds = engram_table_key(layer), [], set(), set()
    for a, b, rel in found:
        with _open(d / rel) as f:
            meta = f.metadata() or {}
            want = {"format": SHARD_FORMAT, "layer": str(layer), "start": str(a), "end": str(b)}
            if any(meta.get(k) != v for k, v in want.items()) or key not in f.keys():
                raise ValueError(f"{d / rel} is not the shard its name says (metadata {meta}, "
                                 f"tensors {list(f.keys())})")
            sl = f.get_slice(key)
            shape, dt = tuple(sl.get_shape()), sl.get_dtype()
        if len(shape) != 2 or shape[0] != b - a:
            raise ValueError(f"{d / rel} holds a {list(shape)} tensor, not the {b - a} rows its name says")
        totals.add(int(meta.get("total_rows", -1)))
        kinds.add((shape[1], _SAFETENSORS_DTYPES.get(dt, dt)))
        sources.append(TableSource(d / rel, rel, key, a, b))
    if len(totals) != 1 or len(kinds) != 1:
        raise ValueError(f"the shards of Engram layer {layer} in {d / SHARD_DIR} disagree on the table "
                         f"(total rows {sorted(totals)}, widths and dtypes {sorted(map(str, kinds))})")
    (R,), ((dim, dtype),) = totals, kinds
    pos, prev = 0, None
    for s in sources:
        if s.start < pos:
            raise ValueError(f"Engram layer {layer}: shards {prev.rel} and {s.rel} overlap (rows "
                             f"[{s.start}, {min(pos, s.end)}) are in both); remove the shards of an older save")
        if s.start > pos:
            raise ValueError(f"Engram layer {layer}: rows [{pos}, {s.start}) of {R} are in no shard of "
                             f"{d / SHARD_DIR} (a shard is missing)")
        pos, prev = s.end, s
    if pos != R:
        raise ValueError(f"Engram layer {layer}: rows [{pos}, {R}) of {R} are in no shard of {d / SHARD_DIR} "
                         f"(a shard is missing)")
    return sources, (R, dim, dtype)


def _sources(d: Path, layer: int) -> tuple[list[TableSource], tuple[int, int, torch.dtype]]:
    """Where layer ``layer``'s rows are, in either layout, and the table's ``(R, d, dtype)``."""
    key = engram_table_key(layer)
    if is_sharded(d) or _shards_on_disk(d).get(int(layer)):
        return check_shards(d, layer)
    w = d / WEIGHTS_FILE
    if not w.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} and no table shards in {d}")
    with _open(w) as f:
        if key not in f.keys():
            raise ValueError(f"{w} holds no table for Engram layer {layer} (no {key!r}); it was saved without "
                             f"its tables")
        sl = f.get_slice(key)
        (R, dim), dt = sl.get_shape(), sl.get_dtype()
    return [TableSource(w, WEIGHTS_FILE, key, 0, R)], (R, dim, _SAFETENSORS_DTYPES.get(dt, dt))


def table_shape(directory: str | os.PathLike, layer: int) -> tuple[int, int]:
    """``(R, d)`` of layer ``layer``'s table in a model directory of either layout (no rows are read)."""
    _, (R, dim, _) = _sources(Path(directory), int(layer))
    return R, dim


def _entry(manifest: dict, d: Path, src: TableSource) -> dict:
    """The manifest's piece of ``src``'s table, after checking the file's size and header bytes."""
    listed = manifest["files"].get(src.rel)
    if listed is None:
        raise ValueError(f"{src.path} is not covered by {d / checksums.MANIFEST_FILE} (put there after the "
                         f"model was saved?); re-save the model directory")
    if src.path.stat().st_size != listed.get("size"):
        raise ValueError(f"{src.path} is truncated or altered: {checksums.MANIFEST_FILE} says "
                         f"{listed.get('size')} bytes")
    pieces = {p["name"]: p for p in listed.get("pieces", [])}
    if src.key not in pieces or "header" not in pieces:
        raise ValueError(f"{d / checksums.MANIFEST_FILE} records no tensor {src.key!r} of {src.rel}")
    with open(src.path, "rb") as f:  # the offsets the rows are read at come from the header
        if checksums._hash_range(f, 0, pieces["header"]["end"]) != pieces["header"]["sha256"]:
            raise ValueError(f"{src.path} is corrupted: the sha256 of its header does not match "
                             f"{checksums.MANIFEST_FILE}")
    return pieces[src.key]


def _raw(t: torch.Tensor):
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _read(src: TableSource, a: int, b: int, entry: dict | None, step: int) -> Iterator[torch.Tensor]:
    """Rows ``[a, b)`` (local to ``src``, non-empty) in pieces; with the manifest ``entry``, every block
    they touch is read whole and checked before its rows are handed out (a piece recorded without blocks
    and larger than ``step`` rows is streamed and checked when its last row has been read)."""
    rs = src.end - src.start
    with _open(src.path) as f:
        sl = f.get_slice(src.key)
        if entry is None:
            for r in range(a, b, step):
                yield sl[r:min(r + step, b)]
            return
        br = entry.get("block_rows") or rs
        shas = entry.get("blocks") or [entry["sha256"]]
        if len(shas) != -(-rs // br):
            raise ValueError(f"{checksums.MANIFEST_FILE} does not describe {src.path}'s {src.key!r} ({rs} rows)")

        def bad(r0: int, r1: int) -> ValueError:
            return ValueError(f"{src.path} is corrupted: the sha256 of rows [{r0}, {r1}) of tensor {src.key!r} "
                              f"does not match {checksums.MANIFEST_FILE}")

        first, last = a // br, (b - 1) // br
        if br > step:  # one unit larger than a piece: stream it, check at its end
            for u in range(first, last + 1):
                h, r0, r1 = hashlib.sha256(), u * br, min((u + 1) * br, rs)
                for r in range(r0, r1, step):
                    t = sl[r:min(r + step, r1)]
                    h.update(_raw(t))
                    lo, hi = max(a, r), min(b, r + t.shape[0])
                    if lo < hi:
                        yield t[lo - r:hi - r]
                if h.hexdigest() != shas[u]:
                    raise bad(r0, r1)
            return
        per = max(1, step // br)
        for g in range(first, last + 1, per):
            r0, r1 = g * br, min(min(g + per, last + 1) * br, rs)
            t = sl[r0:r1]
            raw, row_bytes = _raw(t), t[0].numel() * t.element_size()
            for u in range(g, min(g + per, last + 1)):
                u0, u1 = (u * br - r0) * row_bytes, (min((u + 1) * br, rs) - r0) * row_bytes
                if hashlib.sha256(raw[u0:u1]).hexdigest() != shas[u]:
                    raise bad(u * br, min((u + 1) * br, rs))
            yield t[max(a, r0) - r0:min(b, r1) - r0]


def iter_table_rows(directory: str | os.PathLike, layer: int, start: int = 0, end: int | None = None, *,
                    verify: bool = True, piece_bytes: int = _PIECE_BYTES) -> Iterator[torch.Tensor]:
    """Rows ``[start, end)`` (``end=None``: to the last) of layer ``layer``'s table, as ``[n, d]`` pieces in
    row order, from a model directory of either layout; a piece never spans two files, so memory stays
    bounded by ``piece_bytes`` (and a checksum block) whatever the table's size.

    ``verify``: check what is read against ``checksums.json``: each file's size and header, and every
    checksum block the range touches (see :mod:`engram.model.checksums`); a shard that is not listed
    there, or listed and gone, is refused. ``verify=False`` is for a directory just verified whole.
    Raises ValueError for a range outside the table, a damaged file or shards that do not tile it.
    """
    d = Path(directory)
    sources, (R, dim, dtype) = _sources(d, int(layer))
    end = R if end is None else int(end)
    start = int(start)
    if not 0 <= start <= end <= R:
        raise ValueError(f"rows [{start}, {end}) are not a range of Engram layer {layer}'s {R}-row table")
    manifest = None
    if verify:
        manifest = checksums.read_manifest(d)
        prefix = f"{SHARD_DIR}/layer_{int(layer)}.rows-"
        gone = sorted(rel for rel in manifest["files"] if rel.startswith(prefix)
                      and rel not in {s.rel for s in sources})
        if gone:
            raise ValueError(f"{d / gone[0]} is missing (listed in {d / checksums.MANIFEST_FILE})")
    step = max(1, piece_bytes // (dim * torch.empty((), dtype=dtype).element_size()))
    for s in sources:
        lo, hi = max(start, s.start), min(end, s.end)
        if lo < hi:
            entry = _entry(manifest, d, s) if manifest is not None else None
            yield from _read(s, lo - s.start, hi - s.start, entry, step)


def load_table_rows(directory: str | os.PathLike, layer: int, start: int, end: int, *, verify: bool = True,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[start, end)`` of layer ``layer``'s table as one ``[end - start, d]`` tensor, reading only
    those rows (and the checksum blocks around them) from a model directory of either layout, whatever
    the shards it was written in. ``out``: a tensor to fill instead of a new one. Every byte returned
    was checked against ``checksums.json`` (``verify``, see :func:`iter_table_rows`)."""
    d = Path(directory)
    _, (R, dim, dtype) = _sources(d, int(layer))
    n = int(end) - int(start)
    if out is None:
        out = torch.empty((max(n, 0), dim), dtype=dtype)
    elif tuple(out.shape) != (n, dim) or out.dtype != dtype:
        raise ValueError(f"out must be a [{n}, {dim}] {dtype} tensor, got {list(out.shape)} {out.dtype}")
    pos = 0
    for piece in iter_table_rows(d, layer, start, end, verify=verify):
        out[pos:pos + piece.shape[0]].copy_(piece)
        pos += piece.shape[0]
    return out


def describe(directory: str | os.PathLike) -> dict:
    """``{layer: [[start, end], ...]}`` of a sharded-tables directory's shards (for logs and tests)."""
    return {lay: [[a, b] for a, b, _ in v] for lay, v in sorted(_shards_on_disk(Path(directory)).items())}

