"""CRC32C of store rows: one checksum per row, written at export and checked on every read.

Why per row: a random single-row read (a decode step's cold rows) can then verify exactly the bytes it
read, at the cost of hashing them once (hardware CRC32C runs at several GB/s, a 256-byte row in
tens of nanoseconds against microseconds to read it). A checksum per multi-row chunk would force
reading the whole chunk to check one row.

The CRC32C itself comes from the kept ``google-crc32c`` library (its ``libcrc32c``: SSE4.2 / ARMv8
CRC instructions with a portable fallback). A batch of rows is checked in one call of a small C loop
(:file:`engram/native/row_crc.c`) that is handed the library's ``crc32c_extend`` function pointer;
where no C compiler works, with ``ENGRAM_NATIVE_CRC=0``, or where the library's symbol cannot be
found, a Python loop over ``google_crc32c`` gives the same checksums (slower: ~1 us per row).
"""

# Shapes: n rows in a batch, d row width in raw elements, R rows in the store.

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

import numpy as np

from engram.native import NativeLibrary, native_source

__all__ = ["available", "crc32c", "mismatches", "row_crcs", "unavailable_reason"]

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


def _find_extend():
    """``crc32c_extend`` of the CRC32C library as a ctypes function, or None.

    Looked up through google-crc32c's compiled extension first (dlsym on it searches the library it
    links, wherever the wheel put it), then its bundled ``google_crc32c.libs``, then a system libcrc32c.
    """
    cands = []
    try:
        import google_crc32c
        from google_crc32c import _crc32c  # the C extension; absent when the package fell back to Python

        cands.append(_crc32c.__file__)
        base = os.path.dirname(os.path.dirname(google_crc32c.__file__))
        cands += sorted(glob.glob(os.path.join(base, "google_crc32c.libs", "libcrc32c*.so*")))
    except ImportError:
        pass
    system = ctypes.util.find_library("crc32c")
    if system:
        cands.append(system)
    for path in cands:
        try:
            fn = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_uint32, _P, ctypes.c_size_t]
        fn.restype = ctypes.c_uint32
        return fn
    return None


_EXTEND = _find_extend()


def _configure(lib: ctypes.CDLL) -> None:
    lib.engram_row_crcs.argtypes = [_P, _P, _I64, _I64, _P]
    lib.engram_row_crcs.restype = None
    lib.engram_verify_rows.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _I64]
    lib.engram_verify_rows.restype = _I64


def _check(lib: ctypes.CDLL) -> None:
    """The kernel must agree with google-crc32c's own answer (catches a wrong symbol or calling convention)."""
    import google_crc32c

    probe = np.frombuffer(b"engram row checksum probe, 37 bytes", dtype=np.uint8).reshape(1, -1).copy()
    out = np.zeros(1, np.uint32)
    lib.engram_row_crcs(_fn_ptr(), probe.ctypes.data, 1, probe.shape[1], out.ctypes.data)
    if int(out[0]) != google_crc32c.value(probe.tobytes()):
        raise OSError("the CRC32C library's crc32c_extend disagrees with google_crc32c.value")


def _fn_ptr() -> int:
    return ctypes.cast(_EXTEND, ctypes.c_void_p).value


_native = NativeLibrary(native_source("row_crc.c"), "row_crc", env_switch="ENGRAM_NATIVE_CRC", configure=_configure,
                        check=_check, unsupported=None if _EXTEND is not None else
                        "no CRC32C library exporting crc32c_extend was found (google-crc32c's C extension)")


def available() -> bool:
    """True if batches of rows are checked in C (builds the kernel on the first call)."""
    return _native.load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _native.error


def _bytes_view(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous:
        raise ValueError("rows must be C-contiguous")
    return a.reshape(-1).view(np.uint8)


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of ``data`` (bytes or a C-contiguous numpy array's bytes), continuing from ``crc``."""
    if isinstance(data, np.ndarray):
        data = _bytes_view(data)
        if _EXTEND is not None:
            return int(_EXTEND(crc, data.ctypes.data, data.nbytes))
        data = data.tobytes()
    import google_crc32c

    return int(google_crc32c.extend(crc, bytes(data)))


def row_crcs(rows_nd: np.ndarray, out_n: np.ndarray | None = None) -> np.ndarray:
    """CRC32C of each row of the C-contiguous 2-D array ``rows_nd`` (any dtype: its raw bytes) -> uint32 ``[n]``."""
    if rows_nd.ndim != 2:
        raise ValueError(f"rows must be a 2-D array, got shape {list(rows_nd.shape)}")
    n, row_bytes = rows_nd.shape[0], rows_nd.shape[1] * rows_nd.itemsize
    _bytes_view(rows_nd)
    out_n = np.empty(n, np.uint32) if out_n is None else out_n
    lib = _native.load() if n else None
    if lib is not None:
        lib.engram_row_crcs(_fn_ptr(), rows_nd.ctypes.data, n, row_bytes, out_n.ctypes.data)
    else:
        raw = rows_nd.view(np.uint8).reshape(n, row_bytes)
        for i in range(n):
            out_n[i] = crc32c(raw[i])
    return out_n


def mismatches(rows_nd: np.ndarray, sums_R: np.ndarray, pos_n: np.ndarray | None = None,
               max_report: int = 8) -> tuple[int, np.ndarray]:
    """Check each row ``i`` of ``rows_nd`` against ``sums_R[pos_n[i]]`` (``sums_R[i]`` when ``pos_n`` is None).

    Returns ``(count, first_n)``: how many rows do not match, and the indices ``i`` of the first
    ``max_report`` of them (int64). ``pos_n`` must be int64 ids into ``sums_R`` (uint32), already in range.
    """
    n, row_bytes = rows_nd.shape[0], rows_nd.shape[1] * rows_nd.itemsize
    if n == 0:
        return 0, np.zeros(0, np.int64)
    _bytes_view(rows_nd)
    if pos_n is not None:
        pos_n = np.ascontiguousarray(pos_n, dtype=np.int64)
    lib = _native.load()
    if lib is not None:
        bad = np.empty(max(1, max_report), np.int64)
        count = lib.engram_verify_rows(_fn_ptr(), rows_nd.ctypes.data, n, row_bytes,
                                       None if pos_n is None else pos_n.ctypes.data, sums_R.ctypes.data,
                                       bad.ctypes.data, max_report)
        return int(count), bad[:min(count, max_report)].copy()
    want = sums_R[:n] if pos_n is None else sums_R[pos_n]
    bad_all = np.flatnonzero(row_crcs(rows_nd) != want)
    return int(bad_all.size), bad_all[:max_report].astype(np.int64)


def scan_file(fd: int, data_offset: int, row_bytes: int, sums_R: np.ndarray, *, block_bytes: int = 8 << 20,
              progress=None, max_report: int = 1 << 20) -> tuple[int, np.ndarray]:
    """Check every row of a store file against ``sums_R``, reading ``fd`` in blocks of whole rows.

    Returns ``(count, positions)``: how many rows mismatch and the file positions of (the first
    ``max_report`` of) them. ``progress(nbytes)`` is called after each block. Each block's pages are
    dropped from the page cache once checked (``POSIX_FADV_DONTNEED``; pages another process maps stay),
    so a scan of a store larger than RAM does not evict everything else.
    """
    R = sums_R.size
    step = max(1, block_bytes // row_bytes)
    buf = np.empty(step * row_bytes, np.uint8)
    bad, count = [], 0
    for start in range(0, R, step):
        n = min(step, R - start)
        view = memoryview(buf)[: n * row_bytes]
        got, off = 0, data_offset + start * row_bytes
        while got < len(view):
            k = os.preadv(fd, [view[got:]], off + got)
            if k <= 0:
                raise OSError(f"file ends inside row {start + got // row_bytes}")
            got += k
        c, first = mismatches(buf[: n * row_bytes].reshape(n, row_bytes), sums_R[start:start + n],
                              max_report=max(0, max_report - len(bad)))
        count += c
        bad.extend((first + start).tolist())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, off, n * row_bytes, os.POSIX_FADV_DONTNEED)
        if progress is not None:
            progress(n * row_bytes)
    return count, np.asarray(bad, dtype=np.int64)
