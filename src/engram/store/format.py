"""On-disk layout of a row store: header, per-row checksums, reader checks, and the crash-safe streaming writer.

File layout (all integers little-endian)::

    offset  0   magic        8 bytes   b"ENGRMROW"
    offset  8   version      u32       2, or 3 for an fp8 store (FORMAT_VERSION); both are read
    offset 12   json_len     u32       length of the JSON header
    offset 16   sums_crc     u32       crc32c of the row checksum array (its bytes as stored)
    offset 20   header_crc   u32       crc32c of bytes [8, 20) + JSON header
    offset 24   JSON header  utf-8     {"num_rows", "dim", "dtype", "row_bytes", "sums_offset", "data_offset",
                                        "byteorder": "little", "checksum": "crc32c", "meta": {...}}
    then        zero padding up to sums_offset (a multiple of 4096)
    sums_offset row checksums          num_rows x u32: crc32c of each row's bytes, in file order
    then        zero padding up to data_offset (a multiple of 4096)
    data_offset row data               num_rows x dim elements, row-major, rows back to back
    end of file                        file size == data_offset + num_rows * row_bytes, exactly

Every row has its own CRC32C (:mod:`engram.store.checksum`), so a read of any set of rows checks
exactly the bytes it read; the checksum array (4 bytes per row, ~0.4% of a table of 1 KiB rows) is
itself covered by ``sums_crc`` in the checksummed preamble, checked whenever it is loaded
(:func:`read_row_sums`: a reader keeps it in RAM for as long as the store is open). A store written in
a co-access order (:mod:`engram.store.layout`) keeps the checksums in file order, beside their rows.
Version-1 files (one crc32 per multi-megabyte chunk, checked only by an explicit full scan) are
refused with a message asking to export again: their checksums cannot verify a single-row read.

Dtypes are float32, bfloat16 and float16; the bytes are the tensor's raw bits (bfloat16 is read back
through a 16-bit integer view, since numpy has no bfloat16). A ``float8_e4m3fn`` store (version 3)
packs each row as its ``dim`` e4m3 bytes followed by its ``dim / 32`` E8M0 scale bytes (one
power-of-two scale per 32 channels, :mod:`engram.store.fp8rows`): one read fetches a row and its
scales, and the row's CRC32C covers both (a 256-wide row is 264 bytes instead of 1 KiB in float32).
Such a store serves packed ``uint8`` rows (``DiskStore.dtype`` is ``torch.uint8``, ``dim`` the packed
width); :class:`engram.store.fp8rows.Fp8Rows` in front of it (or of a cache of them) dequantises on
lookup. Float stores are still written as version 2, byte for byte as before, so older readers keep
reading them and refuse an fp8 store by its version instead of misreading it. Aligning the data region to 4096 bytes
keeps every row inside as few pages as possible and lets the region be memory-mapped on its own; a
row is one contiguous read.

The writer streams: it takes an iterable of ``[n, dim]`` pieces (any n), checksums each piece's rows
and writes rows and checksums at their final offsets, so a table far larger than RAM is never held in
memory. It writes to ``<path>.tmp-<pid>`` in the same directory and puts the header down *last*, then
fsyncs the file, renames it over ``path`` (atomic) and fsyncs the directory. A crash at any point
leaves either the previous file at ``path`` or the new one, never a torn one; a leftover temp file has
no magic and does not load. Stale ``*.tmp-<pid>`` files of killed writers may be deleted.
"""

# Shapes: R rows in the store, d row width (``dim``), n rows in one written piece.

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_path
from engram.store.checksum import crc32c, row_crcs

MAGIC = b"ENGRMROW"
FORMAT_VERSION = 3  # the newest version written (fp8 stores); float stores keep version 2
FLOAT_VERSION = 2
READ_VERSIONS = (2, 3)
FP8_BLOCK = 32  # channels per E8M0 scale byte in an fp8 store
ALIGN = 4096
_PREAMBLE = struct.Struct("<8sIIII")  # magic, version, json_len, sums_crc, header_crc
# Bound on the JSON length, so a corrupted length field is reported instead of read.
_MAX_JSON = 16 << 20
_PIECE_BYTES = 4 << 20  # rows per piece when the writer is handed a whole tensor
# The writer syncs and drops written pages every this many bytes: a table larger than RAM would
# otherwise fill the page cache with dirty pages and evict everything else on the machine.
_WRITEBACK_BYTES = 256 << 20

FP8 = torch.float8_e4m3fn
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3fn": FP8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Raw integer views of each dtype: copies through them move bits, never float values. uint8 is the
# packed-row view of an fp8 store (values and scales together).
RAW_TORCH = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.uint8: torch.uint8}
RAW_NUMPY = {torch.float32: np.dtype("<i4"), torch.bfloat16: np.dtype("<i2"), torch.float16: np.dtype("<i2"),
             torch.uint8: np.dtype(np.uint8)}


def packed_width(dim: int, dtype: torch.dtype) -> int:
    """Raw elements per stored row: ``dim``, or for fp8 the ``dim`` value bytes plus ``dim / 32`` scale bytes."""
    return dim + dim // FP8_BLOCK if dtype == FP8 else dim


def raw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a store of ``dtype`` serves its rows in: itself, or ``uint8`` packed rows for fp8."""
    return torch.uint8 if dtype == FP8 else dtype


def stored_row_bytes(dim: int, dtype: torch.dtype) -> int:
    return packed_width(dim, dtype) * RAW_NUMPY[raw_dtype(dtype)].itemsize
_NUMPY_FLOAT = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16)}


class StoreFormatError(ValueError):
    """A store file is truncated, corrupted, of another format version, or not what was expected."""


class StoreChecksumError(StoreFormatError):
    """Rows read from a store do not match the checksums written at export: the row data is corrupted.

    Raised before any of the rows read is handed out. ``path``, ``layer`` (None when the file's
    header names none) and ``rows`` (logical row ids, at most a few; ``count`` in all) say where.
    """

    def __init__(self, path, layer: int | None, rows: list[int], count: int, of: int | None = None) -> None:
        self.path, self.layer, self.rows, self.count = Path(path), layer, list(rows), int(count)
        more = count - len(self.rows)
        shown = ", ".join(map(str, self.rows)) + (f" and {more} more" if more > 0 else "")
        where = f"layer {layer}" if layer is not None else "a store of no recorded layer"
        read = f" ({count} of {of} rows read)" if of is not None else ""
        super().__init__(f"{path}: checksum mismatch in {where}, row{'s' if count > 1 else ''} {shown}{read}: the "
                         f"row data is corrupted, and none of it was used. `engram verify {self.path.parent}` "
                         f"lists every damaged row; export the store again")


def dtype_of(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``"float32"`` etc. -> torch dtype; ValueError for unsupported dtypes."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") in DTYPES:
            return DTYPES[dtype.removeprefix("torch.")]
    elif dtype in DTYPE_NAMES:
        return dtype
    raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _version_of(dtype: torch.dtype) -> int:
    return FORMAT_VERSION if dtype == FP8 else FLOAT_VERSION


@dataclass(frozen=True)
class StoreHeader:
    """Everything the header of a store file says, plus the file it came from."""

    path: Path
    num_rows: int
    dim: int
    dtype: torch.dtype
    sums_offset: int
    data_offset: int
    sums_crc: int
    meta: dict = field(default_factory=dict)
    version: int = FLOAT_VERSION

    @property
    def row_bytes(self) -> int:
        return stored_row_bytes(self.dim, self.dtype)

    @property
    def raw_dtype(self) -> torch.dtype:
        """What a read serves: the dtype itself, or ``uint8`` packed rows of an fp8 store."""
        return raw_dtype(self.dtype)

    @property
    def raw_width(self) -> int:
        """Raw elements per served row: ``dim``, or the packed width of an fp8 store."""
        return packed_width(self.dim, self.dtype)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.num_rows * self.row_bytes

    @property
    def layer(self) -> int | None:
        """The Engram layer the header's meta names (None when it names none)."""
        lay = self.meta.get("layer")
        return int(lay) if isinstance(lay, int) else None


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _header_fields(num_rows: int, dim: int, dtype: torch.dtype, sums_offset: int, meta: dict) -> dict:
    fields = {"num_rows": num_rows, "dim": dim, "dtype": DTYPE_NAMES[dtype], "row_bytes": stored_row_bytes(dim, dtype),
              "sums_offset": sums_offset, "data_offset": _align(sums_offset + 4 * num_rows), "byteorder": "little",
              "checksum": "crc32c", "meta": meta}
    if dtype == FP8:
        fields["scale"] = {"dtype": "float8_e8m0fnu", "block": FP8_BLOCK, "placement": "after the row's values"}
    return fields


def _encode_header(fields: dict, sums_crc: int) -> bytes:
    body = json.dumps(fields, sort_keys=True).encode()
    version = _version_of(DTYPES[fields["dtype"]])
    lengths = struct.pack("<III", version, len(body), sums_crc)
    crc = crc32c(body, crc32c(lengths))
    return _PREAMBLE.pack(MAGIC, version, len(body), sums_crc, crc) + body


def _layout(num_rows: int, dim: int, dtype: torch.dtype, meta: dict) -> dict:
    """Header fields with the offsets settled (they are written inside the header whose size they depend on)."""
    offset = 0
    while True:
        fields = _header_fields(num_rows, dim, dtype, offset, meta)
        need = _align(_PREAMBLE.size + len(json.dumps(fields, sort_keys=True).encode()))
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
    :class:`StoreFormatError` (a ValueError) naming the file and the problem. The row checksums are
    loaded and checked by :func:`read_row_sums`, the rows against them on every read.
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
        _, version, json_len, sums_crc, stored_crc = _PREAMBLE.unpack(pre)
        if version == 1:
            raise _fail(path, "store format version 1 has no per-row checksums, so its reads cannot be verified; "
                              "export the store again with this version of engram (engram export-memory)")
        if version not in READ_VERSIONS:
            raise _fail(path, f"unsupported format version {version} (this code reads versions "
                              f"{', '.join(map(str, READ_VERSIONS))})")
        if json_len > _MAX_JSON:
            raise _fail(path, f"header is corrupted (implausible JSON length {json_len})")
        if _PREAMBLE.size + json_len > size:
            raise _fail(path, f"file is truncated: the header needs {_PREAMBLE.size + json_len} bytes, "
                              f"the file has {size}")
        body = _pread_exact(fd, json_len, _PREAMBLE.size)
        crc = crc32c(body, crc32c(pre[8:20]))
        if crc != stored_crc:
            raise _fail(path, f"header checksum mismatch (stored {stored_crc:08x}, computed {crc:08x}): "
                              "the header is corrupted")
        try:
            h = json.loads(body)
            dtype = DTYPES[h["dtype"]]
            num_rows, dim, sums_offset, data_offset = (int(h[k]) for k in ("num_rows", "dim", "sums_offset",
                                                                           "data_offset"))
            meta = h.get("meta") or {}
        except (ValueError, KeyError, TypeError) as e:
            raise _fail(path, f"header is corrupted or incomplete ({type(e).__name__}: {e})") from None
        if h.get("byteorder") != "little" or h.get("checksum") != "crc32c":
            raise _fail(path, f"unsupported byteorder/checksum {h.get('byteorder')!r}/{h.get('checksum')!r}")
        if version != _version_of(dtype):
            raise _fail(path, f"header is inconsistent: a {h['dtype']} store must be format version "
                              f"{_version_of(dtype)}, the file says {version}")
        if dtype == FP8 and (dim % FP8_BLOCK or (h.get("scale") or {}).get("block") != FP8_BLOCK):
            raise _fail(path, f"header is inconsistent: an fp8 store needs dim a multiple of {FP8_BLOCK} and "
                              f"scale blocks of {FP8_BLOCK} (dim={dim}, scale={h.get('scale')!r})")
        hdr = StoreHeader(path, num_rows, dim, dtype, sums_offset, data_offset, sums_crc, meta, version)
        if (min(num_rows, dim) < 1 or sums_offset % ALIGN or sums_offset < _PREAMBLE.size + json_len
                or data_offset != _align(sums_offset + 4 * num_rows) or h.get("row_bytes") != hdr.row_bytes):
            raise _fail(path, f"header is inconsistent (num_rows={num_rows}, dim={dim}, "
                              f"row_bytes={h.get('row_bytes')}, sums_offset={sums_offset}, data_offset={data_offset})")
        if size != hdr.file_bytes:
            what = "truncated" if size < hdr.file_bytes else "longer than its header says"
            raise _fail(path, f"file is {what}: expected {hdr.file_bytes} bytes ({num_rows} rows x {hdr.row_bytes} "
                              f"bytes from offset {data_offset}), found {size}")
        return hdr
    finally:
        if own:
            os.close(fd)


def read_row_sums(fd: int, hdr: StoreHeader) -> np.ndarray:
    """The row checksums of the store ``hdr`` describes (uint32 ``[R]``, file order), read through ``fd``
    and checked against the header's ``sums_crc``; StoreFormatError when they are corrupted."""
    sums_R = np.empty(hdr.num_rows, dtype="<u4")
    buf = memoryview(sums_R).cast("B")
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], hdr.sums_offset + got)
        if n <= 0:
            raise _fail(hdr.path, "file is truncated inside its row checksums")
        got += n
    crc = crc32c(sums_R)
    if crc != hdr.sums_crc:
        raise _fail(hdr.path, f"row checksum array is corrupted (its crc32c is {crc:08x}, the header says "
                              f"{hdr.sums_crc:08x}); export the store again")
    return sums_R


def check_expected(hdr: StoreHeader, expect: dict | None) -> None:
    """Raise StoreFormatError listing every field of ``hdr`` that differs from ``expect``.

    Keys: ``num_rows``, ``dim``, ``dtype`` (torch dtype or name), and ``meta`` (a dict whose items must
    all be present in the header's meta).
    """
    if not expect:
        return
    unknown = set(expect) - {"num_rows", "dim", "dtype", "meta"}
    if unknown:
        raise ValueError(f"expect has unknown keys {sorted(unknown)}; allowed: num_rows, dim, dtype, meta")
    diffs = []
    for key in ("num_rows", "dim"):
        if key in expect and int(expect[key]) != getattr(hdr, key):
            diffs.append(f"{key} is {getattr(hdr, key)}, expected {expect[key]}")
    if "dtype" in expect and dtype_of(expect["dtype"]) != hdr.dtype:
        diffs.append(f"dtype is {DTYPE_NAMES[hdr.dtype]}, expected {DTYPE_NAMES[dtype_of(expect['dtype'])]}")
    for key, want in (expect.get("meta") or {}).items():
        if hdr.meta.get(key, "<missing>") != want:
            diffs.append(f"meta[{key!r}] is {hdr.meta.get(key, '<missing>')!r}, expected {want!r}")
    if diffs:
        raise _fail(hdr.path, "store does not match what was expected: " + "; ".join(diffs))


def _raw_piece(piece, dim: int, dtype: torch.dtype, index: int) -> np.ndarray:
    """One input piece -> C-contiguous [n, w] raw-integer numpy array (a view where possible).

    w is ``dim``, or the packed width for fp8, whose pieces are packed ``uint8`` rows or a
    ``(values float8_e4m3fn [n, d], scales float8_e8m0fnu or uint8 [n, d/32])`` pair.
    """
    if dtype == FP8:
        arr = _packed_piece(piece, dim, index)
    elif isinstance(piece, np.ndarray):
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
    width = packed_width(dim, dtype)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"piece {index}: expected shape [n, {width}], got {list(arr.shape)}")
    return arr


def _bytes_of(t, index: int, what: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.element_size() != 1:
            raise ValueError(f"piece {index}: fp8 {what} must be 1-byte elements, got {t.dtype}")
        return t.detach().cpu().contiguous().view(torch.uint8).numpy()
    if isinstance(t, np.ndarray) and t.dtype == np.uint8:
        return np.ascontiguousarray(t)
    raise ValueError(f"piece {index}: fp8 {what} must be a 1-byte torch tensor or a uint8 array, got "
                     f"{getattr(t, 'dtype', type(t).__name__)}")


def _packed_piece(piece, dim: int, index: int) -> np.ndarray:
    if isinstance(piece, tuple):
        if len(piece) != 2:
            raise ValueError(f"piece {index}: an fp8 piece is a (values, scales) pair, got {len(piece)} items")
        q, s = piece
        if isinstance(q, torch.Tensor) and q.dtype != FP8:
            raise ValueError(f"piece {index}: fp8 values must be float8_e4m3fn, got {q.dtype} (quantise first: "
                             "the writer never casts)")
        q, s = _bytes_of(q, index, "values"), _bytes_of(s, index, "scales")
        if q.ndim != 2 or s.ndim != 2 or q.shape != (s.shape[0], dim) or s.shape[1] != dim // FP8_BLOCK:
            raise ValueError(f"piece {index}: expected values [n, {dim}] and scales [n, {dim // FP8_BLOCK}], got "
                             f"{list(q.shape)} and {list(s.shape)}")
        return np.concatenate([q, s], axis=1)
    if isinstance(piece, torch.Tensor) and piece.dtype != torch.uint8:
        raise ValueError(f"piece {index}: an fp8 store takes packed uint8 rows or (values, scales) pairs, got "
                         f"{piece.dtype} (quantise first: the writer never casts)")
    return _bytes_of(piece, index, "packed rows")


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _write_rows(fd: int, pieces: Iterator, fields: dict, num_rows: int, dim: int, dtype, row_bytes: int) -> None:
    """Write the row data and their checksums piece by piece, then the header (last: a torn file has no magic)."""
    data_offset, sums_offset = fields["data_offset"], fields["sums_offset"]
    done, synced, sums_crc = 0, data_offset, 0
    # Not enumerate()/zip(): their reused result tuple keeps the previous piece alive while the next is made.
    for i in itertools.count():
        piece = next(pieces, None)
        if piece is None:
            break
        arr = _raw_piece(piece, dim, dtype, i)
        n = arr.shape[0]
        if done + n > num_rows:
            raise ValueError(f"pieces hold more than num_rows={num_rows} rows (piece {i} ends at row {done + n})")
        if n:
            sums_n = row_crcs(arr).astype("<u4", copy=False)
            sums_crc = crc32c(sums_n, sums_crc)  # pieces arrive in file order: the array's crc accumulates
            _pwrite_all(fd, memoryview(sums_n).cast("B"), sums_offset + 4 * done)
            _pwrite_all(fd, memoryview(arr).cast("B"), data_offset + done * row_bytes)
            done += n
            del sums_n
        del arr, piece  # drop the piece before the generator makes the next one
        end = data_offset + done * row_bytes
        if end - synced >= _WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.fdatasync(fd)  # written-back pages are clean, so DONTNEED can drop them
            os.posix_fadvise(fd, synced, end - synced, os.POSIX_FADV_DONTNEED)
            synced = end
    if done != num_rows:
        raise ValueError(f"pieces hold {done} rows, expected num_rows={num_rows}")
    _pwrite_all(fd, memoryview(_encode_header(fields, sums_crc)), 0)  # last: a torn file has no magic
    os.fsync(fd)


def write_store(path: str | os.PathLike, rows: torch.Tensor | Iterable[torch.Tensor | np.ndarray], *,
                num_rows: int | None = None, dim: int | None = None, dtype: torch.dtype | str | None = None,
                meta: dict | None = None) -> Path:
    """Write a row store file at ``path`` crash-safely and return ``path``.

    Args:
        rows: the whole ``[R, d]`` table, or an iterable of ``[n, d]`` pieces in row order (any n), consumed
            once and never held all at once; pieces must have exactly the store dtype (no casting). For
            ``float8_e4m3fn`` a piece is a ``(values [n, d] e4m3, scales [n, d/32] E8M0 or uint8)`` pair or
            packed ``uint8`` rows ``[n, d + d/32]``; the whole table may be given as one such pair.
        num_rows, dim, dtype: the table's shape and dtype; inferred from a tensor ``rows``, required for an
            iterable. dtype: float32, bfloat16, float16 or float8_e4m3fn (torch dtype or name).
        meta: JSON-serialisable user data stored in the header (e.g. layer id, head sizes).

    Every row's CRC32C is computed as it streams past and stored with the file (see the module docstring).
    Raises ValueError when the pieces do not add up to ``num_rows`` or have the wrong shape/dtype, and
    OSError(ENOSPC) when the file system has not enough free space; in every failure the temp file is
    removed and an existing file at ``path`` is left untouched.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("row stores are little-endian; big-endian hosts are not supported")
    path = Path(path)
    if isinstance(rows, tuple) and len(rows) == 2 and isinstance(rows[0], torch.Tensor):
        q, sc = rows  # a whole fp8 table: stream it in pieces like a tensor
        num_rows, dim, dtype = q.shape[0], q.shape[1], FP8
        step = max(1, _PIECE_BYTES // max(1, dim))
        rows = ((q[i:i + step], sc[i:i + step]) for i in range(0, num_rows, step))
    elif isinstance(rows, torch.Tensor) and rows.dtype == torch.uint8 and dim is None:
        raise ValueError("packed fp8 rows need dim= (the row width in channels) and dtype='float8_e4m3fn'")
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
    if dtype == FP8 and dim % FP8_BLOCK:
        raise ValueError(f"an fp8 store needs dim a multiple of {FP8_BLOCK}, got {dim}")
    row_bytes = stored_row_bytes(dim, dtype)
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from None
    fields = _layout(num_rows, dim, dtype, meta)
    total = fields["data_offset"] + num_rows * row_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total:
        raise OSError(errno.ENOSPC, f"not enough disk space for {path}: needs {total} bytes, {free} free")

    step = max(1, _PIECE_BYTES // row_bytes)
    pieces: Iterator = (rows[i : i + step] for i in range(0, num_rows, step)) \
        if isinstance(rows, torch.Tensor) else iter(rows)
    with atomic_path(path, fsync_file=False) as tmp:  # _write_rows flushes the file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _write_rows(fd, pieces, fields, num_rows, dim, dtype, row_bytes)
        finally:
            os.close(fd)
    return path
