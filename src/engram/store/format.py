"""On-disk layout of a row store: header, reader checks, and the crash-safe streaming writer.

File layout (all integers little-endian)::

    offset  0   magic        8 bytes   b"ENGRMROW"
    offset  8   version      u32       FORMAT_VERSION
    offset 12   json_len     u32       length of the JSON header
    offset 16   table_len    u32       length of the checksum table (4 * num_chunks)
    offset 20   header_crc   u32       crc32 of bytes [8, 20) + JSON header + checksum table
    offset 24   JSON header  utf-8     {"num_rows", "dim", "dtype", "row_bytes", "chunk_rows", "num_chunks",
                                        "data_offset", "byteorder": "little", "checksum": "crc32", "meta": {...}}
    then        checksum table         num_chunks x u32: crc32 of each chunk's row bytes
    then        zero padding up to data_offset (a multiple of 4096)
    data_offset row data               num_rows x dim elements, row-major, rows back to back
    end of file                        file size == data_offset + num_rows * row_bytes, exactly

Chunk ``c`` holds rows ``[c * chunk_rows, min((c + 1) * chunk_rows, num_rows))``. Dtypes are float32,
bfloat16 and float16; the bytes are the tensor's raw bits (bfloat16 is read back through a 16-bit integer
view, since numpy has no bfloat16). Aligning the data region to 4096 bytes keeps every row inside as few
pages as possible and lets the region be memory-mapped on its own; a row is one contiguous read.

The writer streams: it takes an iterable of ``[n, dim]`` pieces (any n), checksums them incrementally
across chunk boundaries and writes each piece at its final offset, so a table far larger than RAM is never
held in memory. It writes to ``<path>.tmp-<pid>`` in the same directory and puts the header down *last*,
then fsyncs the file, renames it over ``path`` (atomic) and fsyncs the directory. A crash at any point
leaves either the previous file at ``path`` or the new one, never a torn one; a leftover temp file has no
magic and does not load. Stale ``*.tmp-<pid>`` files of killed writers may be deleted.
"""

# Shapes: R rows in the store, d row width (``dim``), n rows in one written piece.

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_path

MAGIC = b"ENGRMROW"
FORMAT_VERSION = 1
ALIGN = 4096
_PREAMBLE = struct.Struct("<8sIIII")  # magic, version, json_len, table_len, header_crc
# Bounds on the header lengths, so a corrupted length field is reported instead of read.
_MAX_JSON = 16 << 20
_MAX_CHUNKS = 1 << 24
_DEFAULT_CHUNK_BYTES = 4 << 20
# The writer syncs and drops written pages every this many bytes: a table larger than RAM would
# otherwise fill the page cache with dirty pages and evict everything else on the machine.
_WRITEBACK_BYTES = 256 << 20

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Raw integer views of each dtype: copies through them move bits, never float values.
RAW_TORCH = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
RAW_NUMPY = {torch.float32: np.dtype("<i4"), torch.bfloat16: np.dtype("<i2"), torch.float16: np.dtype("<i2")}
_NUMPY_FLOAT = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16)}


class StoreFormatError(ValueError):
    """A store file is truncated, corrupted, of another format version, or not what was expected."""


def dtype_of(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``"float32"`` etc. -> torch dtype; ValueError for unsupported dtypes."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") in DTYPES:
            return DTYPES[dtype.removeprefix("torch.")]
    elif dtype in DTYPE_NAMES:
        return dtype
    raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class StoreHeader:
    """Everything the header of a store file says, plus the file it came from."""

    path: Path
    num_rows: int
    dim: int
    dtype: torch.dtype
    chunk_rows: int
    data_offset: int
    chunk_crcs: tuple[int, ...]
    meta: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def row_bytes(self) -> int:
        return self.dim * RAW_NUMPY[self.dtype].itemsize

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_crcs)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.num_rows * self.row_bytes

    def chunk_rows_range(self, c: int) -> tuple[int, int]:
        """Rows ``[start, end)`` of chunk ``c``."""
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.num_rows)


def _header_fields(num_rows: int, dim: int, dtype: torch.dtype, chunk_rows: int, data_offset: int, meta: dict):
    return {"num_rows": num_rows, "dim": dim, "dtype": DTYPE_NAMES[dtype], "row_bytes": dim * RAW_NUMPY[dtype].itemsize,
            "chunk_rows": chunk_rows, "num_chunks": math.ceil(num_rows / chunk_rows), "data_offset": data_offset,
            "byteorder": "little", "checksum": "crc32", "meta": meta}


def _encode_header(fields: dict, crcs: list[int]) -> bytes:
    body = json.dumps(fields, sort_keys=True).encode()
    table = np.asarray(crcs, dtype="<u4").tobytes()
    lengths = struct.pack("<III", FORMAT_VERSION, len(body), len(table))
    crc = zlib.crc32(table, zlib.crc32(body, zlib.crc32(lengths)))
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body), len(table), crc) + body + table


def _layout(num_rows: int, dim: int, dtype: torch.dtype, chunk_rows: int, meta: dict) -> dict:
    """Header fields with data_offset settled (it is written inside the header whose size it depends on)."""
    num_chunks = math.ceil(num_rows / chunk_rows)
    offset = 0
    while True:
        fields = _header_fields(num_rows, dim, dtype, chunk_rows, offset, meta)
        need = -(-(_PREAMBLE.size + len(json.dumps(fields, sort_keys=True).encode()) + 4 * num_chunks) // ALIGN) * ALIGN
        if need == offset:
            return fields
        offset = need


def _fail(path, what: str) -> StoreFormatError:
    return StoreFormatError(f"{path}: {what}")


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def read_header(path: str | os.PathLike, fd: int | None = None) -> StoreHeader:
    """Parse and check the header of the store at ``path`` (read through ``fd`` if given).

    Checks magic, version, header checksum, field consistency and the exact file size; raises
    :class:`StoreFormatError` (a ValueError) naming the file and the problem. Chunk checksums of the
    row data are *not* checked here (see :func:`verify_chunks`).
    """
    path = Path(path)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        pre = _pread_exact(fd, _PREAMBLE.size, 0)
        if len(pre) >= len(MAGIC) and pre[: len(MAGIC)] != MAGIC:
            raise _fail(path, f"not an Engram row store (bad magic {pre[:len(MAGIC)]!r}, expected {MAGIC!r})")
        if len(pre) < _PREAMBLE.size:
            raise _fail(path, f"file is truncated: {size} bytes, smaller than the {_PREAMBLE.size}-byte preamble")
        _, version, json_len, table_len, stored_crc = _PREAMBLE.unpack(pre)
        if version != FORMAT_VERSION:
            raise _fail(path, f"unsupported format version {version} (this code reads version {FORMAT_VERSION})")
        if json_len > _MAX_JSON or table_len > 4 * _MAX_CHUNKS or table_len % 4:
            raise _fail(path, f"header is corrupted (implausible lengths: json {json_len}, checksum table {table_len})")
        if _PREAMBLE.size + json_len + table_len > size:
            raise _fail(path, f"file is truncated: the header needs {_PREAMBLE.size + json_len + table_len} bytes, "
                              f"the file has {size}")
        rest = _pread_exact(fd, json_len + table_len, _PREAMBLE.size)
        crc = zlib.crc32(rest, zlib.crc32(pre[8:20]))
        if crc != stored_crc:
            raise _fail(path, f"header checksum mismatch (stored {stored_crc:08x}, computed {crc:08x}): "
                              "the header is corrupted")
        try:
            h = json.loads(rest[:json_len])
            dtype = DTYPES[h["dtype"]]
            num_rows, dim, chunk_rows, data_offset = (int(h[k]) for k in ("num_rows", "dim", "chunk_rows",
                                                                            "data_offset"))
            meta = h.get("meta") or {}
        except (ValueError, KeyError, TypeError) as e:
            raise _fail(path, f"header is corrupted or incomplete ({type(e).__name__}: {e})") from None
        if h.get("byteorder") != "little" or h.get("checksum") != "crc32":
            raise _fail(path, f"unsupported byteorder/checksum {h.get('byteorder')!r}/{h.get('checksum')!r}")
        if min(num_rows, dim, chunk_rows) < 1 or data_offset % ALIGN or data_offset < _PREAMBLE.size + len(rest):
            raise _fail(path, f"header is inconsistent (num_rows={num_rows}, dim={dim}, chunk_rows={chunk_rows}, "
                              f"data_offset={data_offset})")
        crcs = tuple(int(c) for c in np.frombuffer(rest[json_len:], dtype="<u4"))
        hdr = StoreHeader(path, num_rows, dim, dtype, chunk_rows, data_offset, crcs, meta, version)
        if h.get("row_bytes") != hdr.row_bytes or len(crcs) != math.ceil(num_rows / chunk_rows):
            raise _fail(path, f"header is inconsistent (row_bytes {h.get('row_bytes')} vs {hdr.row_bytes}, "
                              f"{len(crcs)} chunk checksums for {math.ceil(num_rows / chunk_rows)} chunks)")
        if size != hdr.file_bytes:
            what = "truncated" if size < hdr.file_bytes else "longer than its header says"
            raise _fail(path, f"file is {what}: expected {hdr.file_bytes} bytes ({num_rows} rows x {hdr.row_bytes} "
                              f"bytes from offset {data_offset}), found {size}")
        return hdr
    finally:
        if own:
            os.close(fd)


def check_expected(hdr: StoreHeader, expect: dict | None) -> None:
    """Raise StoreFormatError listing every field of ``hdr`` that differs from ``expect``.

    Keys: ``num_rows``, ``dim``, ``dtype`` (torch dtype or name), ``chunk_rows``, and ``meta`` (a dict
    whose items must all be present in the header's meta).
    """
    if not expect:
        return
    unknown = set(expect) - {"num_rows", "dim", "dtype", "chunk_rows", "meta"}
    if unknown:
        raise ValueError(f"expect has unknown keys {sorted(unknown)}; allowed: num_rows, dim, dtype, chunk_rows, meta")
    diffs = []
    for key in ("num_rows", "dim", "chunk_rows"):
        if key in expect and int(expect[key]) != getattr(hdr, key):
            diffs.append(f"{key} is {getattr(hdr, key)}, expected {expect[key]}")
    if "dtype" in expect and dtype_of(expect["dtype"]) != hdr.dtype:
        diffs.append(f"dtype is {DTYPE_NAMES[hdr.dtype]}, expected {DTYPE_NAMES[dtype_of(expect['dtype'])]}")
    for key, want in (expect.get("meta") or {}).items():
        if hdr.meta.get(key, "<missing>") != want:
            diffs.append(f"meta[{key!r}] is {hdr.meta.get(key, '<missing>')!r}, expected {want!r}")
    if diffs:
        raise _fail(hdr.path, "store does not match what was expected: " + "; ".join(diffs))


def verify_chunks(fd: int, hdr: StoreHeader, chunk_ids: Iterable[int] | None = None, block: int = 4 << 20) -> int:
    """Recompute the crc32 of the given chunks (all if None) from ``fd``; return how many were checked.

    Reads with pread in ``block``-sized pieces, so even a chunk larger than RAM is checked in bounded memory.
    """
    ids = range(hdr.num_chunks) if chunk_ids is None else sorted({int(c) for c in chunk_ids})
    n = 0
    for c in ids:
        if not 0 <= c < hdr.num_chunks:
            raise ValueError(f"{hdr.path}: chunk id {c} out of range [0, {hdr.num_chunks})")
        start, end = hdr.chunk_rows_range(c)
        pos, stop, crc = hdr.data_offset + start * hdr.row_bytes, hdr.data_offset + end * hdr.row_bytes, 0
        while pos < stop:
            data = _pread_exact(fd, min(block, stop - pos), pos)
            if not data:
                raise _fail(hdr.path, f"file is truncated inside chunk {c}")
            crc = zlib.crc32(data, crc)
            pos += len(data)
        if crc != hdr.chunk_crcs[c]:
            raise _fail(hdr.path, f"chunk {c} (rows {start}..{end - 1}) checksum mismatch (stored "
                                  f"{hdr.chunk_crcs[c]:08x}, computed {crc:08x}): the row data is corrupted")
        n += 1
    return n


def _raw_piece(piece, dim: int, dtype: torch.dtype, index: int) -> np.ndarray:
    """One input piece -> C-contiguous [n, d] raw-integer numpy array (a view where possible)."""
    if isinstance(piece, np.ndarray):
        if piece.dtype != _NUMPY_FLOAT.get(dtype):
            raise ValueError(f"piece {index}: numpy dtype {piece.dtype} does not match store dtype "
                             f"{DTYPE_NAMES[dtype]} (pass a torch tensor for bfloat16)")
        arr = np.ascontiguousarray(piece).view(RAW_NUMPY[dtype])
    elif isinstance(piece, torch.Tensor):
        if piece.dtype != dtype:
            raise ValueError(f"piece {index}: dtype {piece.dtype} does not match store dtype {dtype} "
                             "(convert explicitly; the writer never casts)")
        arr = piece.detach().cpu().contiguous().view(RAW_TORCH[dtype]).numpy()
    else:
        raise ValueError(f"piece {index}: expected a torch.Tensor or numpy array, got {type(piece).__name__}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"piece {index}: expected shape [n, {dim}], got {list(arr.shape)}")
    return arr


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _write_rows(fd: int, pieces: Iterator, fields: dict, num_rows: int, dim: int, dtype, chunk_rows: int,
                row_bytes: int) -> None:
    """Write the row data piece by piece, then the header (last: a torn file has no magic)."""
    data_offset = fields["data_offset"]
    crcs, done, synced = [0] * fields["num_chunks"], 0, data_offset
    # Not enumerate()/zip(): their reused result tuple keeps the previous piece alive while the next is made.
    for i in itertools.count():
        piece = next(pieces, None)
        if piece is None:
            break
        arr = _raw_piece(piece, dim, dtype, i)
        n = arr.shape[0]
        if done + n > num_rows:
            raise ValueError(f"pieces hold more than num_rows={num_rows} rows (piece {i} ends at row {done + n})")
        r, mv = 0, None
        while r < n:  # split at chunk boundaries: each chunk's crc accumulates across pieces
            c = (done + r) // chunk_rows
            take = min(n - r, (c + 1) * chunk_rows - (done + r))
            mv = memoryview(arr[r : r + take]).cast("B")
            crcs[c] = zlib.crc32(mv, crcs[c])
            _pwrite_all(fd, mv, data_offset + (done + r) * row_bytes)
            r += take
        done += n
        del arr, piece, mv  # drop the piece before the generator makes the next one
        end = data_offset + done * row_bytes
        if end - synced >= _WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.fdatasync(fd)  # written-back pages are clean, so DONTNEED can drop them
            os.posix_fadvise(fd, synced, end - synced, os.POSIX_FADV_DONTNEED)
            synced = end
    if done != num_rows:
        raise ValueError(f"pieces hold {done} rows, expected num_rows={num_rows}")
    _pwrite_all(fd, memoryview(_encode_header(fields, crcs)), 0)  # last: a torn file has no magic
    os.fsync(fd)


def write_store(path: str | os.PathLike, rows: torch.Tensor | Iterable[torch.Tensor | np.ndarray], *,
                num_rows: int | None = None, dim: int | None = None, dtype: torch.dtype | str | None = None,
                chunk_rows: int | None = None, meta: dict | None = None) -> Path:
    """Write a row store file at ``path`` crash-safely and return ``path``.

    Args:
        rows: the whole ``[R, d]`` table, or an iterable of ``[n, d]`` pieces in row order (any n), consumed
            once and never held all at once; pieces must have exactly the store dtype (no casting).
        num_rows, dim, dtype: the table's shape and dtype; inferred from a tensor ``rows``, required for an
            iterable. dtype: float32, bfloat16 or float16 (torch dtype or name).
        chunk_rows: rows per checksummed chunk (default: about 4 MiB of rows).
        meta: JSON-serialisable user data stored in the header (e.g. layer id, head sizes).

    Raises ValueError when the pieces do not add up to ``num_rows`` or have the wrong shape/dtype, and
    OSError(ENOSPC) when the file system has not enough free space; in every failure the temp file is
    removed and an existing file at ``path`` is left untouched.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("row stores are little-endian; big-endian hosts are not supported")
    path = Path(path)
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise ValueError(f"rows must be a [num_rows, dim] tensor, got shape {list(rows.shape)}")
        num_rows = rows.shape[0] if num_rows is None else num_rows
        dim = rows.shape[1] if dim is None else dim
        dtype = rows.dtype if dtype is None else dtype
    if num_rows is None or dim is None or dtype is None:
        raise ValueError("num_rows, dim and dtype are required when rows is an iterable of pieces")
    num_rows, dim, dtype = int(num_rows), int(dim), dtype_of(dtype)
    if num_rows < 1 or dim < 1:
        raise ValueError(f"num_rows and dim must be >= 1, got num_rows={num_rows}, dim={dim}")
    row_bytes = dim * RAW_NUMPY[dtype].itemsize
    chunk_rows = max(1, _DEFAULT_CHUNK_BYTES // row_bytes) if chunk_rows is None else int(chunk_rows)
    if chunk_rows < 1 or math.ceil(num_rows / chunk_rows) > _MAX_CHUNKS:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1 and give at most {_MAX_CHUNKS} chunks")
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from None
    fields = _layout(num_rows, dim, dtype, chunk_rows, meta)
    total = fields["data_offset"] + num_rows * row_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total:
        raise OSError(errno.ENOSPC, f"not enough disk space for {path}: needs {total} bytes, {free} free")

    pieces: Iterator = (rows[i : i + chunk_rows] for i in range(0, num_rows, chunk_rows)) \
        if isinstance(rows, torch.Tensor) else iter(rows)
    with atomic_path(path, fsync_file=False) as tmp:  # _write_rows flushes the file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _write_rows(fd, pieces, fields, num_rows, dim, dtype, chunk_rows, row_bytes)
        finally:
            os.close(fd)
    return path
