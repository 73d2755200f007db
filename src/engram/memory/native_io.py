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

from engram.memory.native_build import NativeLibrary

__all__ = ["PendingRead", "Ring", "RingPool", "available", "open_direct", "read_rows", "start_rows",
           "unavailable_reason"]

ENTRIES = 128  # reads in flight per call: the device's throughput here saturates around 128
# Largest single read (adjacent rows merge up to this). The slots are registered (locked) memory:
# ENTRIES * SLOT_BYTES = 2 MiB per ring stays well inside the usual 8 MiB RLIMIT_MEMLOCK.
SLOT_BYTES = 16 << 10

_SOURCE = r"""
#define _GNU_SOURCE
#include <linux/io_uring.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <unistd.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>
#include <errno.h>
#include <sys/uio.h>

typedef struct {
  int fd;
  unsigned entries;
  unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
  struct io_uring_sqe* sqes;
  struct io_uring_cqe* cqes;
  void *sq_ptr, *cq_ptr; size_t sq_len, cq_len, sqe_len;
  char* scratch; int64_t slot_bytes; int fixed_buf, fixed_file;
  int64_t *slot_first, *slot_end, *slot_off, *slot_len; int64_t* free_slots;
  /* the read in progress (engram_read_start .. engram_read_finish) */
  int rfd; const int64_t* rows; int64_t n, row_bytes, data_offset, block; char* out;
  int64_t next, inflight, nfree, err, active;
} ring_t;

void engram_ring_free(ring_t* r) {
  if (!r) return;
  if (r->sqes) munmap(r->sqes, r->sqe_len);
  if (r->cq_ptr && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_len);
  if (r->sq_ptr) munmap(r->sq_ptr, r->sq_len);
  if (r->fd >= 0) close(r->fd);
  free(r->scratch); free(r->slot_first); free(r->slot_end); free(r->slot_off); free(r->slot_len);
  free(r->free_slots); free(r);
}

/* A ring with `entries` submission slots and as many aligned read buffers of slot_bytes each, for
   reads of the file `file_fd` (-1: any file, passed per call). Returns NULL with *err = errno on
   failure (ENOSYS/EPERM: io_uring unavailable). */
ring_t* engram_ring_new(int entries, int64_t slot_bytes, int file_fd, int* err) {
  ring_t* r = calloc(1, sizeof(ring_t));
  if (!r) { *err = ENOMEM; return NULL; }
  r->fd = -1;
  struct io_uring_params p; memset(&p, 0, sizeof p);
#ifdef IORING_SETUP_COOP_TASKRUN
  /* completions are reaped by the waiting thread itself: no interrupt of other threads to run them */
  p.flags = IORING_SETUP_COOP_TASKRUN;
#endif
  int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  if (fd < 0 && errno == EINVAL && p.flags) {  /* kernel older than 5.19 */
    memset(&p, 0, sizeof p);
    fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  }
  if (fd < 0) { *err = errno; engram_ring_free(r); return NULL; }
  r->fd = fd; r->entries = p.sq_entries; r->slot_bytes = slot_bytes;
  r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  if (p.features & IORING_FEAT_SINGLE_MMAP) {
    if (r->cq_len > r->sq_len) r->sq_len = r->cq_len;
    r->cq_len = r->sq_len;
  }
  r->sq_ptr = mmap(0, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (r->sq_ptr == MAP_FAILED) { r->sq_ptr = NULL; *err = errno; engram_ring_free(r); return NULL; }
  if (p.features & IORING_FEAT_SINGLE_MMAP) {
    r->cq_ptr = r->sq_ptr;
  } else {
    r->cq_ptr = mmap(0, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    if (r->cq_ptr == MAP_FAILED) { r->cq_ptr = NULL; *err = errno; engram_ring_free(r); return NULL; }
  }
  r->sqe_len = p.sq_entries * sizeof(struct io_uring_sqe);
  r->sqes = mmap(0, r->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (r->sqes == MAP_FAILED) { r->sqes = NULL; *err = errno; engram_ring_free(r); return NULL; }
  char* sq = r->sq_ptr; char* cq = r->cq_ptr;
  r->sq_tail = (unsigned*)(sq + p.sq_off.tail); r->sq_mask = (unsigned*)(sq + p.sq_off.ring_mask);
  r->sq_array = (unsigned*)(sq + p.sq_off.array);
  r->cq_head = (unsigned*)(cq + p.cq_off.head); r->cq_tail = (unsigned*)(cq + p.cq_off.tail);
  r->cq_mask = (unsigned*)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe*)(cq + p.cq_off.cqes);
  unsigned n = r->entries;
  if (posix_memalign((void**)&r->scratch, 4096, (size_t)n * (size_t)slot_bytes)) r->scratch = NULL;
  r->slot_first = malloc(n * sizeof(int64_t)); r->slot_end = malloc(n * sizeof(int64_t));
  r->slot_off = malloc(n * sizeof(int64_t)); r->slot_len = malloc(n * sizeof(int64_t));
  r->free_slots = malloc(n * sizeof(int64_t));
  if (!r->scratch || !r->slot_first || !r->slot_end || !r->slot_off || !r->slot_len || !r->free_slots) {
    *err = ENOMEM; engram_ring_free(r); return NULL;
  }
  /* Registered buffers and file: the kernel pins the slots and takes the file reference once, not
     per read (5.9 -> 3.6 us of CPU per 512-byte read here). Optional: a locked-memory limit too
     small for the slots, or an old kernel, just means plain reads. */
  struct iovec iov = {r->scratch, (size_t)n * (size_t)slot_bytes};
  r->fixed_buf = syscall(__NR_io_uring_register, fd, IORING_REGISTER_BUFFERS, &iov, 1) == 0;
  if (file_fd >= 0)
    r->fixed_file = syscall(__NR_io_uring_register, fd, IORING_REGISTER_FILES, &file_fd, 1) == 0;
  return r;
}

int engram_ring_flags(const ring_t* r) { return r->fixed_buf | (r->fixed_file << 1); }

/* Queue reads for rows[next..) into free slots; returns how many were queued (not yet submitted). */
static unsigned queue_reads(ring_t* r, int64_t* stats) {
  const uint64_t block = (uint64_t)r->block, mask = ~(block - 1), rb = (uint64_t)r->row_bytes;
  const uint64_t off0 = (uint64_t)r->data_offset;
  const int64_t* rows = r->rows;
  unsigned tail = *r->sq_tail, added = 0;
  while (r->next < r->n && !r->err && r->nfree > 0) {
    const int64_t slot = r->free_slots[--r->nfree];
    const int64_t first = r->next;
    const uint64_t a = (off0 + (uint64_t)rows[first] * rb) & mask;
    uint64_t b = (off0 + (uint64_t)(rows[first] + 1) * rb + block - 1) & mask;
    int64_t k = first + 1;
    while (k < r->n) {  /* extend over rows that start in [a, b]: one read covers them all */
      const uint64_t s2 = off0 + (uint64_t)rows[k] * rb;
      const uint64_t b2 = (s2 + rb + block - 1) & mask;
      if ((s2 & mask) > b || b2 - a > (uint64_t)r->slot_bytes) break;
      if (b2 > b) b = b2;
      k++;
    }
    r->slot_first[slot] = first; r->slot_end[slot] = k; r->slot_off[slot] = (int64_t)a;
    r->slot_len[slot] = (int64_t)(b - a);
    const unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe* e = &r->sqes[idx];
    memset(e, 0, sizeof *e);
    if (r->fixed_buf) { e->opcode = IORING_OP_READ_FIXED; e->buf_index = 0; } else e->opcode = IORING_OP_READ;
    if (r->fixed_file) { e->fd = 0; e->flags = IOSQE_FIXED_FILE; } else e->fd = r->rfd;
    e->off = a; e->len = (unsigned)(b - a);
    e->addr = (uint64_t)(uintptr_t)(r->scratch + slot * r->slot_bytes); e->user_data = (uint64_t)slot;
    r->sq_array[idx] = idx;
    tail++; added++; r->next = k; r->inflight++;
    stats[0] += 1; stats[1] += (int64_t)(b - a);
  }
  __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
  return added;
}

/* Submit `to_submit` queued reads, waiting for `wait` completions. 0, or -errno when the ring itself
   failed: reads may still be in flight into its slots, so it must never be reused or freed (stats[2]). */
static int64_t enter(ring_t* r, unsigned to_submit, unsigned wait, int64_t* stats) {
  for (;;) {
    const int ret = (int)syscall(__NR_io_uring_enter, r->fd, to_submit, wait,
                                 wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    if (ret >= 0) { to_submit -= (unsigned)ret; if (to_submit == 0) return 0; continue; }
    if (errno == EINTR || errno == EAGAIN || errno == EBUSY) continue;
    stats[2] = 1; r->active = 0;
    return -(int64_t)errno;
  }
}

/* Copy the rows of every completed read to `out`; frees their slots. */
static void reap(ring_t* r) {
  unsigned head = *r->cq_head;
  const unsigned ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
  const int64_t rb = r->row_bytes, off0 = r->data_offset;
  for (; head != ctail; head++) {
    const struct io_uring_cqe* c = &r->cqes[head & *r->cq_mask];
    const int64_t slot = (int64_t)c->user_data;
    r->inflight--;
    r->free_slots[r->nfree++] = slot;
    if (c->res < 0) { if (!r->err) r->err = c->res; continue; }
    /* the file's last block may be partial: only the rows' own bytes must have arrived */
    const int64_t need = off0 + (r->rows[r->slot_end[slot] - 1] + 1) * rb - r->slot_off[slot];
    if ((int64_t)c->res < need) { if (!r->err) r->err = -EIO; continue; }
    const char* buf = r->scratch + slot * r->slot_bytes;
    for (int64_t i = r->slot_first[slot]; i < r->slot_end[slot]; i++)
      memcpy(r->out + i * rb, buf + (off0 + r->rows[i] * rb - r->slot_off[slot]), (size_t)rb);
  }
  __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
}

/* Start reading rows[0..n) (sorted, distinct) of the file `fd` (opened O_DIRECT): row k is the row_bytes
   at data_offset + rows[k] * row_bytes, copied to out + k * row_bytes by engram_read_finish. Reads are
   aligned to `block` (a power of two) and adjacent rows share a read of at most slot_bytes. Submits the
   first reads (up to one per slot) and returns without waiting: rows and out must stay valid until
   engram_read_finish returns. stats[0] += reads, stats[1] += bytes read. Returns 0 or -errno. */
int64_t engram_read_start(ring_t* r, int fd, const int64_t* rows, int64_t n, int64_t row_bytes,
                          int64_t data_offset, int64_t block, char* out, int64_t* stats) {
  if (r->active) return -EBUSY;
  r->rfd = fd; r->rows = rows; r->n = n; r->row_bytes = row_bytes; r->data_offset = data_offset;
  r->block = block; r->out = out; r->next = 0; r->inflight = 0; r->err = 0; r->nfree = r->entries;
  for (int64_t s = 0; s < r->nfree; s++) r->free_slots[s] = s;
  r->active = 1;
  const unsigned added = queue_reads(r, stats);
  return added ? enter(r, added, 0, stats) : 0;
}

/* Wait for the started read to complete (submitting the remaining rows as slots free up). Returns 0,
   or -errno of the first failed read (-EIO for a read that ends before its rows do: the file is shorter
   than its header says). Every read submitted has completed when this returns, unless stats[2] is set. */
int64_t engram_read_finish(ring_t* r, int64_t* stats) {
  if (!r->active) return -EINVAL;
  reap(r);
  while ((r->next < r->n && !r->err) || r->inflight > 0) {
    const unsigned added = queue_reads(r, stats);
    const int64_t rc = enter(r, added, r->inflight > 0 ? 1 : 0, stats);
    if (rc < 0) return rc;
    reap(r);
  }
  r->active = 0;
  return r->err;
}

int64_t engram_read_rows(ring_t* r, int fd, const int64_t* rows, int64_t n, int64_t row_bytes,
                         int64_t data_offset, int64_t block, char* out, int64_t* stats) {
  const int64_t rc = engram_read_start(r, fd, rows, n, row_bytes, data_offset, block, out, stats);
  if (rc < 0 && (stats[2] || rc == -EBUSY)) return rc;
  return engram_read_finish(r, stats);
}
"""

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
