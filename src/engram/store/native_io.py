"""Direct reads of table rows from a store file: io_uring + O_DIRECT, built on first use (Linux only).

Why: reading a cold row through the page cache costs the CPU twice: the kernel allocates, inserts and
reads a whole 4 KiB page (``posix_fadvise(WILLNEED)`` or a fault), and the copy then faults that page
into the process. On a 2-core machine that CPU is taken from the model's compute. Measured on this
project's virtual machine (random cold rows of a 4 GiB file, queue depth 128): 9-13 us of CPU per
page through the page cache, 5.8 us per 512-byte ``O_DIRECT`` read submitted through io_uring, at
~90k reads/s. Direct reads also keep the file out of the page cache, so the only RAM the rows use
is the cache the user budgets.

:func:`read_rows` reads the rows ``rows_U`` (sorted, distinct) of a store file opened with
``O_DIRECT``: each row's byte range is widened to the device's block alignment, adjacent ranges
merge into one read (up to one slot), reads go into a ring of ``entries`` aligned slots with up to
``entries`` in flight, and each completed slot's rows are copied to ``out[i]``. The bytes are the
file's bytes: the result equals reading the same rows through a memory mapping.

A :class:`Ring` is one io_uring instance with its slots; it serves one call at a time (a store keeps a
small pool, one per concurrent caller). :func:`available` is False where the kernel refuses io_uring
(e.g. a container's seccomp profile), where no C compiler works, off Linux, or with
``ENGRAM_DIRECT_IO=0``; stores then read through the memory mapping.
"""

# Shapes: U distinct sorted row ids, d row width.

from __future__ import annotations

import ctypes
import os
import sys
import threading

import numpy as np

from engram.native import NativeLibrary, native_source

__all__ = ["PendingRead", "Ring", "RingPool", "available", "open_direct", "read_rows", "start_rows",
           "unavailable_reason"]

ENTRIES = 128  # reads in flight per call: the device's throughput here saturates around 128
# Largest single read (adjacent rows merge up to this). The slots are registered (locked) memory:
# ENTRIES * SLOT_BYTES = 2 MiB per ring stays well inside the usual 8 MiB RLIMIT_MEMLOCK.
SLOT_BYTES = 16 << 10

_SOURCE = native_source("direct_io.c")

def _configure(lib: ctypes.CDLL) -> None:
    lib.engram_ring_new.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.engram_ring_new.restype = ctypes.c_void_p
    lib.engram_ring_flags.argtypes = [ctypes.c_void_p]
    lib.engram_ring_flags.restype = ctypes.c_int
    lib.engram_ring_free.argtypes = [ctypes.c_void_p]
    lib.engram_ring_free.restype = None
    for name in ("engram_read_rows", "engram_read_start"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int64
    lib.engram_read_finish.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.engram_read_finish.restype = ctypes.c_int64


def _probe(lib: ctypes.CDLL) -> None:
    """The kernel may still refuse io_uring (seccomp, io_uring_disabled): find out once."""
    Ring(entries=2, slot_bytes=4096).close()


_native = NativeLibrary(
    _SOURCE, "direct_io", env_switch="ENGRAM_DIRECT_IO", configure=_configure, check=_probe,
    unsupported=None if sys.platform.startswith("linux") and hasattr(os, "O_DIRECT")
    else "io_uring and O_DIRECT are Linux-only")


def available() -> bool:
    """True if direct reads work here (kernel and compiler allowing; builds on the first call)."""
    return _native.load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _native.error


class Ring:
    """One io_uring instance with ``entries`` aligned read slots of ``slot_bytes``; one caller at a time."""

    def __init__(self, entries: int = ENTRIES, slot_bytes: int = SLOT_BYTES, fd: int = -1) -> None:
        lib = _native.lib
        if lib is None:
            raise RuntimeError(f"direct I/O unavailable: {_native.error}")
        err = ctypes.c_int(0)
        self.slot_bytes = int(slot_bytes)
        self.fd = int(fd)
        self.broken = False
        self._pending: PendingRead | None = None  # a started read not waited for yet
        self._lib = lib  # kept: freeing must work even if the module state changes later
        self._ptr = lib.engram_ring_new(int(entries), self.slot_bytes, self.fd, ctypes.byref(err))
        if not self._ptr:
            raise OSError(err.value, f"io_uring_setup: {os.strerror(err.value)}")
        flags = lib.engram_ring_flags(self._ptr)
        self.fixed_buffers, self.fixed_file = bool(flags & 1), bool(flags & 2)

    def close(self) -> None:
        if self._pending is not None:  # its reads write into this ring's slots: complete them first
            try:
                self._pending.wait()
            except OSError:
                pass
        if self._ptr:
            self._lib.engram_ring_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class RingPool:
    """Rings for reads of file ``fd``, one per concurrent caller, created on demand, freed by :meth:`close`."""

    def __init__(self, fd: int, entries: int = ENTRIES, slot_bytes: int = SLOT_BYTES) -> None:
        self.fd, self.entries, self.slot_bytes = fd, entries, slot_bytes
        self._idle: list[Ring] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> Ring:
        with self._lock:
            if self._closed:
                raise ValueError("ring pool is closed")
            if self._idle:
                return self._idle.pop()
        return Ring(self.entries, self.slot_bytes, self.fd)

    def release(self, ring: Ring) -> None:
        """Return ``ring`` after a call (a broken or closed ring is dropped instead)."""
        if ring._pending is not None:  # never hand out a ring whose reads are still landing
            try:
                ring._pending.wait()
            except OSError:
                pass
        if ring._ptr is None:
            return
        with self._lock:
            if not self._closed:
                self._idle.append(ring)
                return
        ring.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for ring in idle:
            ring.close()


def open_direct(path_or_fd, row_bytes: int) -> tuple[int, int] | None:
    """``(fd, block)``: the file opened ``O_DIRECT`` and the read alignment it accepts (512 or 4096).

    ``path_or_fd`` may be an open descriptor: the same file is reopened through ``/proc/self/fd`` (so a
    concurrent rename of the path cannot swap files). Returns None where the file system refuses
    ``O_DIRECT`` (e.g. tmpfs) or direct I/O is unavailable.
    """
    if not available():
        return None
    path = f"/proc/self/fd/{path_or_fd}" if isinstance(path_or_fd, int) else os.fspath(path_or_fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    size = os.fstat(fd).st_size
    ring = Ring(entries=2, slot_bytes=16384, fd=fd)
    try:
        for block in (512, 4096):  # the smallest alignment the device and file system accept
            if size < block:
                break
            out = np.empty(min(block, 64), dtype=np.uint8)
            try:
                read_rows(ring, fd, np.zeros(1, np.int64), out.size, 0, block, out)
            except OSError:
                continue
            return fd, block
    finally:
        ring.close()
    os.close(fd)
    return None


class PendingRead:
    """A direct read started by :func:`start_rows`; :meth:`wait` completes it (the first call waits,
    later calls return the same result or raise the same error). Holds the row ids and the output
    buffer until then, and the ring: it serves nothing else until the read is waited for."""

    def __init__(self, ring: Ring, rows_U: np.ndarray, out: np.ndarray) -> None:
        self.ring, self.rows_U, self.out = ring, rows_U, out
        self.stats = np.zeros(3, np.int64)
        self._result: tuple[int, int] | None = None
        self._error: OSError | None = None
        self._rc = 0

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def _fail(self, rc: int) -> None:
        self._error = OSError(-rc, f"direct read of {self.rows_U.size} rows failed: {os.strerror(-rc)}")

    def wait(self) -> tuple[int, int]:
        """Block until every row is in ``out``; returns ``(reads, bytes read)``, raises OSError on a failed read."""
        if not self.done:
            ring = self.ring
            rc = self._rc
            if rc == 0 and ring._ptr is not None and self.rows_U.size:
                rc = ring._lib.engram_read_finish(ring._ptr, self.stats.ctypes.data)
            if self.stats[2]:  # io_uring_enter failed with reads in flight: their buffers stay allocated, forever
                ring.broken = True
                ring._ptr = None
            ring._pending = None
            if rc < 0:
                self._fail(rc)
            else:
                self._result = int(self.stats[0]), int(self.stats[1])
        if self._error is not None:
            raise self._error
        return self._result


def start_rows(ring: Ring, fd: int, rows_U: np.ndarray, row_bytes: int, data_offset: int, block: int,
               out: np.ndarray) -> PendingRead:
    """Submit the reads of rows ``rows_U`` (int64, sorted, distinct) of ``fd`` into ``out`` (C-contiguous,
    ``U * row_bytes`` bytes) and return at once; see the module docstring. The first ``entries`` reads are
    in flight when this returns, the rest are submitted by :meth:`PendingRead.wait` as slots free up."""
    rows_U = np.ascontiguousarray(rows_U, dtype=np.int64)
    if not out.flags.c_contiguous or out.nbytes != rows_U.size * row_bytes:
        raise ValueError(f"out must be C-contiguous with {rows_U.size * row_bytes} bytes, got {out.nbytes}")
    if row_bytes + 2 * block > ring.slot_bytes:
        raise ValueError(f"rows of {row_bytes} bytes do not fit read slots of {ring.slot_bytes} bytes")
    if ring._ptr is None:
        raise ValueError("ring is closed")
    if ring.fd >= 0 and ring.fd != fd:
        raise ValueError(f"this ring reads file descriptor {ring.fd}, not {fd}")
    if ring._pending is not None:
        raise ValueError("this ring has a read in progress: wait for it first")
    pending = PendingRead(ring, rows_U, out)
    if rows_U.size:
        ring._pending = pending
        pending._rc = ring._lib.engram_read_start(ring._ptr, fd, rows_U.ctypes.data, rows_U.size, row_bytes,
                                                  data_offset, block, out.ctypes.data, pending.stats.ctypes.data)
        if pending._rc < 0:
            pending.wait()  # marks a failed ring broken and raises
    else:
        pending._result = (0, 0)
    return pending


def read_rows(ring: Ring, fd: int, rows_U: np.ndarray, row_bytes: int, data_offset: int, block: int,
              out: np.ndarray) -> tuple[int, int]:
    """Read rows ``rows_U`` (int64, sorted, distinct) of ``fd`` into ``out`` (C-contiguous, ``U * row_bytes``
    bytes); see the module docstring. Returns ``(reads, bytes read)``; raises OSError on a failed read."""
    return start_rows(ring, fd, rows_U, row_bytes, data_offset, block, out).wait()
