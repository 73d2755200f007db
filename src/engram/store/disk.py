"""Row store over a file written by :func:`write_store`: direct reads (io_uring + ``O_DIRECT``) or a mapping.

Disk reads, and how the page cache is made cold for measurements:

* A gather de-duplicates its ids and reads the distinct rows in ascending file order, then expands them
  with the inverse index; ``bytes_read`` counts ``unique * row_bytes`` (logical bytes; the device reads
  whole aligned blocks).
* ``io="direct"`` (the default where available, see :mod:`engram.store.native_io`): the rows are read
  with ``O_DIRECT`` through io_uring, up to 128 reads in flight, each widened only to the device's
  block alignment (512 bytes here) and merged with adjacent rows. No page cache: the file's pages
  never take RAM beyond the cache the caller budgets, and a cold row costs ~4 us of CPU instead of
  ~11 us through the page cache. ``direct_counts()`` reports the reads and device bytes.
* ``io="mmap"``: the data region is mapped read-only and advised ``MADV_RANDOM`` (Engram rows are
  hashed, so the kernel's default 128 KiB read-around would read ~500x the bytes needed). Before
  copying, a gather asks the kernel for all its distinct pages not advised before at once
  (``posix_fadvise(WILLNEED)`` per run of adjacent pages, see :mod:`engram.store.readahead`): the reads
  are queued together instead of one page fault at a time, ~3-4x faster from a cold cache. The copy
  still reads the mapping, so the advice changes speed, never bytes. ``readahead=False`` turns it off.
* Either way the bytes are the file's bytes: every mode returns the same rows bit for bit.
* Every row read is checked against its CRC32C (written at export, :mod:`engram.store.format`) after
  it lands and before the gather returns: the landed buffer of a direct read, the copied rows of a
  mapped one (never the mapping itself, which could change under the check). A mismatch raises
  :class:`StoreChecksumError` naming the file, the layer and the rows, and no row of that gather is
  handed out. The check hashes only the distinct rows read (~10 GB/s with the hardware CRC32C); the
  row checksums (4 bytes per row) are read and checked when the store opens and kept in RAM.
* A store written with a co-access layout (:mod:`engram.store.layout`; its header names the sidecar)
  holds row ``r`` at file position ``layout.physical(r)``: ids are mapped to positions before they are
  de-duplicated and sorted, so the reads walk the file forwards and the rows an n-gram uses together
  share a read. Opening checks the sidecar (present, checksum, a permutation of the right size).
* :meth:`DiskStore.drop_page_cache` first drops this process's mappings of the file's pages
  (``madvise(MADV_DONTNEED)``; the kernel never evicts pages that are still mapped) and then calls
  ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``, which evicts the file's clean pages from the page
  cache. Dirty pages are not dropped, which is one reason the writer fsyncs. Other processes mapping the
  same file keep their pages. :meth:`DiskStore.page_cache_bytes` (``mincore``) shows the effect.
"""

# Shapes: N requested row ids, U distinct ids among them, R rows in the table, d row width (``dim``).

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import numpy as np
import torch

from engram.memory.hugepages import libc
from engram.store import checksum, native_cache, native_io
from engram.store.base import Ready, RowStore
from engram.store.format import (
    RAW_NUMPY,
    RAW_TORCH,
    StoreChecksumError,
    StoreFormatError,
    StoreHeader,
    check_expected,
    read_header,
    read_row_sums,
)
from engram.store.layout import RowLayout, read_layout_file
from engram.store.readahead import SeenPages, advise_willneed, page_runs

__all__ = ["DiskStore", "StoreChecksumError", "StoreFormatError"]


class _DirectGather:
    """A direct-read gather in flight (:meth:`DiskStore.gather_start`): ``result()`` completes it once."""

    def __init__(self, store, ring, pending, pos_U, buf_Ud, inv_N, out_raw, out_Nd, n: int) -> None:
        self._store, self._ring, self._pending, self._pos_U = store, ring, pending, pos_U
        self._buf_Ud, self._inv_N, self._out_raw, self._out_Nd, self._n = buf_Ud, inv_N, out_raw, out_Nd, n
        self._error: BaseException | None = None
        self.done = False

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if not self.done:
            self.done = True
            store = self._store
            try:
                reads, nbytes = self._pending.wait()
            except OSError as e:
                self._error = OSError(e.errno, f"{store.path}: {e.strerror}")
            finally:
                store._rings.release(self._ring)
            if self._error is None:
                try:
                    store._check_rows(self._buf_Ud, self._pos_U)
                except StoreChecksumError as e:
                    self._error = e
            if self._error is None:
                if self._inv_N is not None:
                    np.take(self._buf_Ud, self._inv_N, axis=0, out=self._out_raw, mode="clip")
                u = self._buf_Ud.shape[0]
                store._record(self._n, u, u, 0, u * store.row_bytes)
                with store._stats_lock:
                    store._direct_counts[0] += reads
                    store._direct_counts[1] += nbytes
            self._pending = self._buf_Ud = self._inv_N = self._out_raw = self._pos_U = None
        if self._error is not None:
            self._out_Nd = None  # rows that failed their check are never handed out
            raise self._error
        return self._out_Nd

    def __del__(self) -> None:  # a dropped handle must still give its ring back, after its reads land
        if not getattr(self, "done", True):
            try:
                self.result()
            except Exception:
                pass


def _mincore():
    return libc().mincore


class DiskStore(RowStore):
    """Serves rows from a store file: direct reads or a read-only memory mapping (see the module docstring).

    Open with ``DiskStore.open(path, verify=..., expect=...)`` (or the constructor, same arguments).

    Args:
        verify: ``"header"`` checks magic, version, header checksum, fields, exact file size and the row
            checksum array (cheap); ``"full"`` also checks every row against its checksum (reads the whole
            file). Either way every row read is checked before it is returned (see the module docstring).
        expect: fields the file must have, e.g. ``{"num_rows": R, "dim": d, "dtype": torch.bfloat16,
            "meta": {"layer": 2}}``; a mismatch raises StoreFormatError listing every difference.
        io: how rows are read. ``"direct"``: ``O_DIRECT`` reads batched through io_uring
            (:mod:`engram.store.native_io`; about half the CPU per cold row, and the file stays out of
            the page cache); ``"mmap"``: through the memory mapping; ``"auto"`` (default): direct where
            the kernel, file system and a C compiler allow it, else mmap. ``self.io`` is the choice made.
        readahead: (mmap reads) before copying a gather's rows, queue the reads of their pages not
            advised yet in one batch (see the module docstring); False reads through plain page faults.
        verify_reads: check every row read against its checksum (default). False serves unchecked bytes
            and exists only to measure what the check costs (``benchmarks/bench_verify.py``).

    All format problems raise :class:`StoreFormatError` (a ValueError) naming the file; rows that fail
    their checksum raise its subclass :class:`StoreChecksumError`.
    """

    tier = "disk"

    def __init__(self, path: str | os.PathLike, *, verify: str = "header", expect: dict | None = None,
                 readahead: bool = True, io: str = "auto", verify_reads: bool = True) -> None:
        super().__init__()
        if verify not in ("header", "full"):
            raise ValueError(f"verify must be 'header' or 'full', got {verify!r}")
        if io not in ("auto", "direct", "mmap"):
            raise ValueError(f"io must be 'auto', 'direct' or 'mmap', got {io!r}")
        self.path = Path(path)
        self.io = "mmap"
        self._dfd, self._block, self._rings = -1, 0, None
        self._direct_counts = [0, 0]  # reads, bytes read by direct I/O
        self._fd = -1
        self._mmap = None
        self._rows_Rd = None
        self._close_lock = threading.Lock()
        self.readahead = bool(readahead)
        self.verify_reads = bool(verify_reads)
        self._sums_R: np.ndarray | None = None  # uint32 CRC32C of each row, in file order
        self._seen: SeenPages | None = None
        self.layout: RowLayout | None = None  # where each row sits in the file (None: row r at position r)
        self._advised = [0, 0]  # page runs, pages: requests handed to the kernel by the read-ahead
        # The header is read through the descriptor that is mapped, so a concurrent os.replace of the
        # path cannot pair one file's header with another file's data.
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.header: StoreHeader = read_header(self.path, self._fd)
            check_expected(self.header, expect)
            h = self.header
            if h.meta.get("layout") is not None:
                self.layout = read_layout_file(self.path, h.meta["layout"], h.num_rows)
            self._sums_R = read_row_sums(self._fd, h)
            self._mmap = mmap.mmap(self._fd, h.file_bytes, access=mmap.ACCESS_READ)
            if hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                self._mmap.madvise(mmap.MADV_RANDOM)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            raw = RAW_NUMPY[h.raw_dtype]
            self._rows_Rd = np.frombuffer(self._mmap, dtype=raw, count=h.num_rows * h.raw_width,
                                          offset=h.data_offset).reshape(h.num_rows, h.raw_width)
            self._seen = SeenPages(h.file_bytes)
            if verify == "full":
                self.verify_rows()
            if io != "mmap":
                direct = native_io.open_direct(self._fd, self.row_bytes)
                if direct is None and io == "direct":
                    raise ValueError(f"{self.path}: io='direct' unavailable here ("
                                     f"{native_io.unavailable_reason() or 'the file system refuses O_DIRECT'})")
                if direct is not None:
                    self._dfd, self._block = direct
                    self._rings = native_io.RingPool(self._dfd)
                    self.io = "direct"
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: str = "header", expect: dict | None = None,
             readahead: bool = True, io: str = "auto", verify_reads: bool = True) -> DiskStore:
        """Open and check the store file at ``path``; see the class docstring."""
        return cls(path, verify=verify, expect=expect, readahead=readahead, io=io, verify_reads=verify_reads)

    num_rows = property(lambda self: self.header.num_rows)
    # What a gather serves: the stored rows, or for an fp8 store its packed uint8 rows (values and
    # scales, ``header.dim + header.dim / 32`` bytes); engram.store.fp8rows.Fp8Rows dequantises them.
    dim = property(lambda self: self.header.raw_width)
    dtype = property(lambda self: self.header.raw_dtype)
    meta = property(lambda self: dict(self.header.meta))

    def _table(self) -> np.ndarray:
        table = self._rows_Rd
        if table is None:
            raise ValueError(f"{self.path}: store is closed")
        return table

    def gather(self, rows_N, out_Nd: torch.Tensor | None = None) -> torch.Tensor:
        if self.io == "direct":  # one read path: start the direct reads, then collect them
            return self.gather_start(rows_N, out_Nd).result()
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        table_Rd = self._table()
        n = rows_N.numel()
        if n == 0:
            self._record(0, 0, 0, 0, 0)
            return out_Nd
        out_raw = out_Nd.detach().view(RAW_TORCH[self.dtype]).numpy()
        rows = self._positions(rows_N.numpy())
        uniq_U, inv_N = np.unique(rows, return_inverse=True)  # sorted: reads walk the file forwards
        u = uniq_U.size
        if self.readahead:
            self._advise(uniq_U)
        # Already distinct and ascending: read straight into `out`; else into a per-call buffer, then expand.
        in_place = u == n and (n == 1 or bool((rows[1:] > rows[:-1]).all()))
        buf_Ud = out_raw if in_place else np.empty((u, self.dim), dtype=table_Rd.dtype)
        # mode="clip": ids are already checked, and mode="raise" copies `out` through a temp buffer.
        np.take(table_Rd, uniq_U, axis=0, out=buf_Ud, mode="clip")
        self._check_rows(buf_Ud, uniq_U)  # the copy is checked, never the mapping that could still change
        if not in_place:
            np.take(buf_Ud, inv_N.reshape(-1), axis=0, out=out_raw, mode="clip")
        self._record(n, u, u, 0, u * self.row_bytes)
        return out_Nd

    def gather_start(self, rows_N, out_Nd: torch.Tensor | None = None):
        if self.io != "direct":
            return Ready(self.gather(rows_N, out_Nd))
        rows_N, out_Nd = self._prepare(rows_N, out_Nd)
        rows = self._positions(rows_N.numpy())
        uniq_U, inv_N = np.unique(rows, return_inverse=True)
        in_place = uniq_U.size == rows.size and (rows.size <= 1 or bool((rows[1:] > rows[:-1]).all()))
        return self._start_positions(uniq_U, out_Nd, None if in_place else inv_N.reshape(-1))

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """File positions of checked logical row ids (themselves without a layout)."""
        return rows if self.layout is None else self.layout.physical(rows)

    def _start_unique(self, uniq_U: np.ndarray, out_Nd: torch.Tensor, inv_N: np.ndarray | None):
        """gather_start for checked, sorted, distinct int64 ids ``uniq_U`` (a cache's misses): the rows go to
        ``out_Nd`` (``[U, d]``) directly when ``inv_N`` is None, else to ``out_Nd = rows[uniq_U[inv_N]]``."""
        if self.io != "direct":
            if inv_N is not None:
                uniq_U = uniq_U[inv_N]
            return Ready(self.gather(torch.from_numpy(uniq_U), out_Nd))
        if self.layout is not None:  # read in file order; rank_U[j] = where logical uniq_U[j] lands
            pos_U = self.layout.physical(uniq_U)
            if pos_U.size <= native_cache.MAX_IDS and native_cache.available():
                uniq_U, rank_U = native_cache.sort_rank(pos_U)
            else:
                order_U = np.argsort(pos_U)
                rank_U = np.empty_like(order_U)
                rank_U[order_U] = np.arange(order_U.size)
                uniq_U = pos_U[order_U]
            inv_N = rank_U if inv_N is None else rank_U[inv_N]
        return self._start_positions(uniq_U, out_Nd, inv_N)

    def _start_positions(self, uniq_U: np.ndarray, out_Nd: torch.Tensor, inv_N: np.ndarray | None):
        """Start direct reads of sorted distinct file positions ``uniq_U``; see :meth:`_start_unique`."""
        self._table()  # raises if closed
        n = uniq_U.size if inv_N is None else inv_N.size
        out_raw = out_Nd.detach().view(RAW_TORCH[self.dtype]).numpy()
        buf_Ud = out_raw if inv_N is None else np.empty((uniq_U.size, self.dim), dtype=out_raw.dtype)
        rings = self._rings
        if rings is None or self._dfd < 0:
            raise ValueError(f"{self.path}: store is closed")
        ring = rings.acquire()
        try:
            pending = native_io.start_rows(ring, self._dfd, uniq_U, self.row_bytes, self.header.data_offset,
                                           self._block, buf_Ud)
        except OSError as e:
            rings.release(ring)
            raise OSError(e.errno, f"{self.path}: {e.strerror}") from e
        except BaseException:
            rings.release(ring)
            raise
        return _DirectGather(self, ring, pending, uniq_U, buf_Ud, inv_N, out_raw, out_Nd, n)

    def direct_counts(self) -> dict[str, int]:
        """Direct reads made so far: ``{"reads": ..., "bytes": ...}`` (device bytes: whole aligned blocks)."""
        with self._stats_lock:
            return {"reads": self._direct_counts[0], "bytes": self._direct_counts[1]}

    def _advise(self, uniq_U: np.ndarray) -> None:
        """Queue the reads of the not yet advised pages of sorted distinct rows ``uniq_U`` (no waiting)."""
        seen, fd = self._seen, self._fd
        if seen is None or fd < 0:
            raise ValueError(f"{self.path}: store is closed")
        first_K, count_K = seen.unseen(*page_runs(uniq_U, self.row_bytes, self.header.data_offset, seen.page))
        if advise_willneed(fd, first_K, count_K, seen.page):
            seen.mark(first_K, count_K)
            with self._stats_lock:
                self._advised[0] += len(first_K)
                self._advised[1] += int(count_K.sum())

    def readahead_counts(self) -> dict[str, int]:
        """Read-ahead requests handed to the kernel so far: ``{"runs": ..., "pages": ...}`` (0 without it)."""
        with self._stats_lock:
            return {"runs": self._advised[0], "pages": self._advised[1]}

    def _check_rows(self, buf_Ud: np.ndarray, pos_U: np.ndarray) -> None:
        """StoreChecksumError unless rows ``buf_Ud`` (read from file positions ``pos_U``) match their checksums."""
        sums_R = self._sums_R
        if not self.verify_reads or not buf_Ud.shape[0]:
            return
        if sums_R is None:
            raise ValueError(f"{self.path}: store is closed")
        count, first = checksum.mismatches(buf_Ud, sums_R, pos_U)
        if count:
            raise StoreChecksumError(self.path, self.header.layer, self._logical(pos_U[first]).tolist(), count,
                                     of=buf_Ud.shape[0])

    def _logical(self, pos: np.ndarray) -> np.ndarray:
        return np.asarray(pos, dtype=np.int64) if self.layout is None else self.layout.logical(pos)

    def row_sums(self) -> np.ndarray:
        """The CRC32C of every row in logical row order (uint32 ``[R]``; a copy): what identifies the table."""
        sums = self._sums_R
        if sums is None:
            raise ValueError(f"{self.path}: store is closed")
        return sums.copy() if self.layout is None else sums[self.layout.physical(np.arange(self.num_rows))]

    def scan(self, progress=None, max_report: int = 1 << 20) -> tuple[int, np.ndarray]:
        """Check every row of the file against its checksum: ``(count, sorted logical ids of bad rows)``.

        Reads the whole file in blocks (``progress(nbytes)`` after each), never raises for bad rows
        (that is :meth:`verify_rows`), and leaves the file's pages out of the page cache.
        """
        self._table()
        count, pos = checksum.scan_file(self._fd, self.header.data_offset, self.row_bytes, self._sums_R,
                                        progress=progress, max_report=max_report)
        return count, np.sort(self._logical(pos))

    def verify_rows(self) -> None:
        """Check every row against its checksum; StoreChecksumError naming (a few of) the bad rows if any.

        Reading rows checks them anyway; this checks without serving (``verify="full"`` at open).
        """
        count, bad = self.scan(max_report=8)
        if count:
            raise StoreChecksumError(self.path, self.header.layer, bad.tolist(), count, of=self.num_rows)

    def drop_page_cache(self) -> None:
        """Evict this file's pages from the page cache so the next reads come from the device.

        ``madvise(MADV_DONTNEED)`` on our mapping, then ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``;
        see the module docstring for what this can and cannot drop.
        """
        self._table()
        if hasattr(mmap, "MADV_DONTNEED") and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._seen.clear()  # the evicted pages must be advised again

    def page_cache_bytes(self) -> int | None:
        """Bytes of the data region now in the page cache (Linux ``mincore``), or None where unavailable."""
        table_Rd = self._table()
        page = mmap.PAGESIZE
        start = table_Rd.ctypes.data // page * page
        length = table_Rd.ctypes.data + table_Rd.nbytes - start
        vec = np.zeros(-(-length // page), dtype=np.uint8)
        try:
            rc = _mincore()(ctypes.c_void_p(start), ctypes.c_size_t(length), vec.ctypes.data_as(ctypes.c_void_p))
        except (OSError, AttributeError):
            return None
        return int(np.count_nonzero(vec & 1)) * page if rc == 0 else None

    def close(self) -> None:
        with self._close_lock:
            self._rows_Rd = self._sums_R = None
            if self._rings is not None:
                self._rings.close()
                self._rings = None
            if self._dfd >= 0:
                os.close(self._dfd)
                self._dfd = -1
            if self._mmap is not None:
                try:
                    self._mmap.close()
                except BufferError:
                    pass  # a gather in flight still holds a view; the mapping goes when it finishes
                self._mmap = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, path={str(self.path)!r}, io={self.io!r})"
