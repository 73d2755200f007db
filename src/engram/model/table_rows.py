"""Reading an Engram table's rows back from a model directory, by any row range, from either layout.

A model directory keeps each Engram layer's flat ``[R, d]`` table either in ``model.safetensors`` (the
single-file layout of ``save_pretrained``) or in row shards ``tables/layer_<L>.rows-<start>-<end>.safetensors``
(the sharded-tables layout, written by :mod:`engram.model.sharded_tables`). A reader asks for rows
``[start, end)`` and gets exactly those, whoever wrote how many shards (written on 2 ranks, read on 3),
reading only the files and rows its range touches, each checked against the directory's
``checksums.json`` block by block (:mod:`engram.model.checksums`): at most a block on either side of the
range is read beyond it.
"""

# Shapes: R rows of one layer's table, d row width, n rows of one piece.

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engram.model import checksums
from engram.model.persistence import _SAFETENSORS_DTYPES, SHARD_DIR, WEIGHTS_FILE, engram_table_key

__all__ = ["SHARDED_TABLES", "SHARD_FORMAT", "TableSource", "check_shards", "describe", "holds_table", "is_sharded",
           "iter_table_rows", "load_table_rows", "open_safetensors", "shard_file", "shards_on_disk", "table_shape"]

SHARD_FORMAT = "engram-table-shard"
SHARDED_TABLES = "sharded"  # the weights file's "engram_tables" metadata in a sharded-tables directory
_PIECE_BYTES = 64 << 20  # rows read at once when streaming
_NAME = re.compile(r"layer_(\d+)\.rows-(\d+)-(\d+)\.safetensors")


def shard_file(layer: int, start: int, end: int) -> str:
    """The path, relative to the model directory, of the shard holding rows ``[start, end)`` of ``layer``."""
    return f"{SHARD_DIR}/layer_{int(layer)}.rows-{int(start)}-{int(end)}.safetensors"


@dataclass(frozen=True)
class TableSource:
    """One file holding rows ``[start, end)`` of a layer's table, under ``key``."""

    path: Path
    rel: str
    key: str
    start: int
    end: int


def open_safetensors(path: Path):
    """``safe_open`` on the CPU, a damaged file being a ValueError that names it."""
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
    with open_safetensors(w) as f:
        return (f.metadata() or {}).get("engram_tables") == SHARDED_TABLES


def holds_table(directory: str | os.PathLike, layer: int) -> bool:
    """Whether the rows of layer ``layer``'s table are in ``directory``, in either layout (a directory saved
    from a model built with ``tables=False`` holds none). Cheap: reads file headers only."""
    d = Path(directory)
    if is_sharded(d) or shards_on_disk(d).get(int(layer)):
        return True
    w = d / WEIGHTS_FILE
    if not w.is_file():
        return False
    with open_safetensors(w) as f:
        return engram_table_key(layer) in f.keys()


def shards_on_disk(d: Path) -> dict[int, list[tuple[int, int, str]]]:
    """``{layer: [(start, end, rel)]}`` of the shard files in ``d/tables`` as their names say (sorted by
    range; nothing is opened or checked, see :func:`check_shards`)."""
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
    found = shards_on_disk(d).get(layer, [])
    if not found:
        raise ValueError(f"{d / SHARD_DIR} holds no shard of Engram layer {layer} (its table is missing)")
    key, sources, totals, kinds = engram_table_key(layer), [], set(), set()
    for a, b, rel in found:
        with open_safetensors(d / rel) as f:
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
    if is_sharded(d) or shards_on_disk(d).get(int(layer)):
        return check_shards(d, layer)
    w = d / WEIGHTS_FILE
    if not w.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} and no table shards in {d}")
    with open_safetensors(w) as f:
        if key not in f.keys():
            raise ValueError(f"{w} holds no table for Engram layer {layer} (no {key!r}); it was saved without "
                             f"its tables")
        sl = f.get_slice(key)
        (R, dim), dt = sl.get_shape(), sl.get_dtype()
    return [TableSource(w, WEIGHTS_FILE, key, 0, R)], (R, dim, _SAFETENSORS_DTYPES.get(dt, dt))


def table_info(directory: str | os.PathLike, layer: int) -> tuple[int, int, torch.dtype]:
    """``(R, d, dtype)`` of layer ``layer``'s table in a model directory of either layout (headers only)."""
    return _sources(Path(directory), int(layer))[1]


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


class _RowFile:
    """Reads rows of one tensor of a safetensors file with plain reads into fresh buffers: a mapped file
    (``safe_open``) would count every page read in the process's resident memory, growing with the table."""

    def __init__(self, path: Path, key: str, dim: int, dtype: torch.dtype):
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed on leaving its with-block
        n = int.from_bytes(self._f.read(8), "little")
        self._offset = 8 + n + json.loads(self._f.read(n))[key]["data_offsets"][0]
        self.dim, self.dtype = dim, dtype
        self.row_bytes = dim * torch.empty((), dtype=dtype).element_size()

    def take(self, r0: int, r1: int) -> torch.Tensor:
        out = torch.empty((r1 - r0, self.dim), dtype=self.dtype)
        view, pos = _raw(out), 0
        self._f.seek(self._offset + r0 * self.row_bytes)
        while pos < len(view):
            n = self._f.readinto(view[pos:])
            if not n:
                raise ValueError(f"{self._f.name} is truncated: rows [{r0}, {r1}) of it cannot be read")
            pos += n
        return out

    def __enter__(self) -> _RowFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _read(src: TableSource, a: int, b: int, entry: dict | None, step: int, dim: int,
          dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Rows ``[a, b)`` (local to ``src``, non-empty) in pieces; with the manifest ``entry``, every block
    they touch is read whole and checked before its rows are handed out (a piece recorded without blocks
    and larger than ``step`` rows is streamed and checked when its last row has been read)."""
    with _RowFile(src.path, src.key, dim, dtype) as rows:
        yield from _read_rows(rows, src, a, b, entry, step)


def _read_rows(rows: _RowFile, src: TableSource, a: int, b: int, entry: dict | None,
               step: int) -> Iterator[torch.Tensor]:
    rs = src.end - src.start
    if entry is None:
        for r in range(a, b, step):
            yield rows.take(r, min(r + step, b))
        return
    br = entry.get("block_rows") or rs
    shas = entry.get("blocks") or [entry["sha256"]]
    if len(shas) != -(-rs // br):
        raise ValueError(f"{checksums.MANIFEST_FILE} does not describe {src.path}'s {src.key!r} ({rs} rows)")

    def bad(r0: int, r1: int) -> ValueError:  # rows of the whole table, wherever the file starts
        return ValueError(f"{src.path} is corrupted: the sha256 of rows [{src.start + r0}, {src.start + r1}) "
                          f"of tensor {src.key!r} does not match {checksums.MANIFEST_FILE}")

    first, last = a // br, (b - 1) // br
    if br > step:  # one unit larger than a piece: stream it, check at its end
        for u in range(first, last + 1):
            h, r0, r1 = hashlib.sha256(), u * br, min((u + 1) * br, rs)
            for r in range(r0, r1, step):
                t = rows.take(r, min(r + step, r1))
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
        t = rows.take(r0, r1)
        raw, row_bytes = _raw(t), rows.row_bytes
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
            yield from _read(s, lo - s.start, hi - s.start, entry, step, dim, dtype)


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
    return {lay: [[a, b] for a, b, _ in v] for lay, v in sorted(shards_on_disk(Path(directory)).items())}

