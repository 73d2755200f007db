"""Crash-safe file writes: every file the project writes goes through here.

A file is written under a temporary name in the same directory, flushed to the device, renamed over its
final name, and the directory entry is flushed too. A crash (or an exception, or a full disk) at any
point leaves either the old file or the new one under the final name, never a torn one, and no
temporary file behind when the writer raised. A write that fails for want of space or permission
raises the OSError (naming the file), whatever the writer wrapped it in.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "fsync_dir", "remove_stale_temps", "replace_dir", "write_json_atomic"]


def fsync_dir(d: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync_file: bool = True) -> Iterator[Path]:
    """Yield a temporary path ``<path>.tmp-<pid>`` beside ``path``; when the block ends without an
    exception the temporary file is flushed (unless the writer did, ``fsync_file=False``), renamed over
    ``path`` and the directory flushed. For writers that want a file name (``safetensors.save_file``,
    ``np.lib.format.open_memmap``, ``os.open``). Once the new file is in place, temporary files that
    killed writers left beside ``path`` are removed (:func:`remove_stale_temps`)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync_file:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except Exception as e:
        err = _write_error(e, path, tmp)
        if err is None or err is e:
            raise
        raise err from (e if err.__traceback__ is None else None)  # a wrapped OSError: the wrapper adds nothing
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    remove_stale_temps(path)


# A temporary file this old whose writer's pid is gone is a killed writer's. The age guard keeps a writer on
# another host of a shared file system (whose pid means nothing here) safe while it writes.
STALE_TEMP_S = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists under another user, or cannot tell: keep its file
    return True


def remove_stale_temps(path: str | os.PathLike, *, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Delete ``<path>.tmp-<pid>`` files left by writers that were killed mid-write (their pid is not
    running and the file is older than ``older_than_s``); return what was deleted. A kill -9 or a power
    cut skips the writer's own clean-up, and a large table's half-written temporary would otherwise hold
    its disk space for good."""
    path = Path(path)
    removed, now = [], time.time()
    try:
        candidates = list(path.parent.glob(f"{glob.escape(path.name)}.tmp-*"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            if now - tmp.lstat().st_mtime < older_than_s:
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone already (another writer cleaned it) or not ours to delete
            continue
    return removed



_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def _write_error(e: Exception, path: Path, tmp: Path) -> OSError | None:
    """The OSError behind a failed write of ``path``, naming ``path`` where it named no file (or
    the temporary one).

    Writers report a full disk or a denied write in their own ways: ``open``/``write`` raise an
    OSError without the file name, ``torch.save`` raises a RuntimeError whose context is that
    OSError, Rust writers (safetensors) a message ending ``(os error 28)``. All become the OSError
    itself, so a caller can tell "disk full" from a bug and name the file.
    """
    err = e
    for _ in range(4):  # the chain of causes a wrapping writer leaves
        if isinstance(err, OSError) or err is None:
            break
        err = err.__cause__ or err.__context__
    if not isinstance(err, OSError) or err.errno is None:
        m = _RUST_IO_ERROR.search(str(e))
        if not m:
            return None
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    if err.filename is None or os.fspath(err.filename) == os.fspath(tmp):
        err.filename = str(path)
    return err


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable, mode: str = "wb") -> Path:
    """Write ``data`` (bytes, text, or a callable ``write(f)`` given the open file) to ``path`` crash-safely.

    ``mode`` is ``"wb"`` or ``"w"`` for a callable; bytes and str pick their own. Returns ``path``.
    """
    path = Path(path)
    if isinstance(data, bytes | bytearray | memoryview):
        mode, payload = "wb", data
        data = lambda f: f.write(payload)  # noqa: E731
    elif isinstance(data, str):
        mode, payload = "w", data
        data = lambda f: f.write(payload)  # noqa: E731
    with atomic_path(path, fsync_file=False) as tmp:
        with open(tmp, mode) as f:
            data(f)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 2) -> Path:
    """``obj`` as JSON (``default=str`` for paths and the like) at ``path``, crash-safely."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one atomic step


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` with renameat2(RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the file system or kernel cannot swap
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete directory ``staged`` at ``final``, replacing what is there, crash-safely.

    Where the kernel can swap two paths atomically (Linux renameat2), ``final`` holds either the old
    directory or the new one at every instant; elsewhere the old one is renamed aside first, so a crash
    in between leaves it intact under ``.NAME.old-PID`` next to ``final``. The old directory is deleted
    once the new one is in place and the parent directory is flushed.
    """
    import shutil

    staged, final = Path(staged), Path(final)
    if not final.exists():
        os.replace(staged, final)
        fsync_dir(final.parent)
        return
    if _exchange(staged, final):
        old = staged  # the swap left the old directory under the staging name
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
