"""Build small C kernels on first use with the system C compiler, cached per source, and load them.

The project's native pieces (gather, sparse-row Adam, static-cache bookkeeping, direct I/O; their
wrappers are listed in :mod:`engram.native`) are single C files shipped beside this module: no build
step at install time, nothing to ship per platform. The first call compiles one into a shared library
under ``$XDG_CACHE_HOME/engram`` (default ``~/.cache/engram``), named by a hash of the source, compiler
and platform, and loads it with ctypes; later processes load the cached file. Where no C compiler
works, callers fall back to pure-Python/torch paths (each module says which).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["NativeLibrary", "build_and_load", "compiler"]


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, Python's configured CC, or cc/gcc/clang on PATH (None if none)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    cmd = shlex.split(cc)
    if cmd and shutil.which(cmd[0]):
        return cmd
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "engram"


def _build(cc: list[str], source: str, target: Path) -> None:
    """Compile ``source`` to ``target`` atomically (temp file + rename: safe if processes race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        so = Path(tmp) / target.name
        cmd = [*cc, "-O3", "-shared", "-fPIC", "-pthread", "-o", str(so), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[:500]}")
        os.replace(so, target)


def build_and_load(source: str, stem: str) -> ctypes.CDLL:
    """Compile ``source`` (cached) and load it; raises RuntimeError/OSError when that is impossible."""
    if sys.platform.startswith("win"):
        raise RuntimeError("native kernels are not built on Windows")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    key = hashlib.sha256("\0".join([source, *cc, sys.platform, platform.machine()]).encode()).hexdigest()
    name = f"{stem}_{key[:16]}.so"
    target = _cache_dir() / name
    if not target.exists():
        try:
            _build(cc, source, target)
        except OSError:  # cache not writable: build into a private temp dir instead
            target = Path(tempfile.mkdtemp(prefix="engram-")) / name
            _build(cc, source, target)
    return ctypes.CDLL(str(target))


class NativeLibrary:
    """One kernel, built and loaded at most once per process (thread-safe), or the reason it is unavailable.

    Args:
        source, stem: see :func:`build_and_load`.
        env_switch: environment variable that disables the kernel when set to ``"0"``.
        configure: sets the loaded library's ``argtypes``/``restype``.
        unsupported: a reason string when the platform cannot run the kernel at all (then nothing is built).
        check: called once with the loaded library; an OSError it raises makes the kernel unavailable
            (e.g. the OS refuses a system call the kernel needs).
    """

    def __init__(self, source: str, stem: str, *, env_switch: str, configure: Callable[[ctypes.CDLL], None],
                 unsupported: str | None = None, check: Callable[[ctypes.CDLL], None] | None = None) -> None:
        self.source, self.stem, self.env_switch = source, stem, env_switch
        self.configure, self.unsupported, self.check = configure, unsupported, check
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None  # why ``lib`` is None, once ``load`` has run
        self._tried = False
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        """The loaded library (building it on the first call), or None with :attr:`error` saying why."""
        with self._lock:
            if self._tried:
                return self.lib
            self._tried = True
            if os.environ.get(self.env_switch, "1") == "0":
                self.error = f"disabled by {self.env_switch}=0"
                return None
            if self.unsupported:
                self.error = self.unsupported
                return None
            try:
                lib = build_and_load(self.source, self.stem)
                self.configure(lib)
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                self.error = f"{type(e).__name__}: {e}"
                return None
            self.lib = lib
        if self.check is not None:
            try:
                self.check(lib)
            except OSError as e:
                with self._lock:
                    self.lib, self.error = None, f"refused: {e}"
        return self.lib
