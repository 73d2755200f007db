"""The block device under a store file: its I/O scheduler, read from and (as root) set through sysfs.

Why it matters: a cold row read with ``O_DIRECT`` is one small random request, and on a machine whose
cores also run the model its cost is the CPU the kernel spends per request. An I/O scheduler (Linux's
``mq-deadline``, ``kyber``, ``bfq``) sorts and merges requests, which helps seeking disks, but random
512-byte reads gain nothing from it and pay its locking and bookkeeping on every request. NVMe devices
default to ``none``; virtual disks (virtio-blk) often default to ``mq-deadline``. Measured on this
project's 2-core virtio VM (5,000 random 512-byte direct reads through io_uring,
``benchmarks/bench_disk_reads.py --io-schedulers mq-deadline none``): 4.2 us of CPU per row under
``mq-deadline``, 3.2 us under ``none``.

Nothing here runs on the read path. :func:`io_scheduler` is informational (the CLI prints it with the
tier statistics); :func:`set_io_scheduler` changes a machine-wide setting, so only benchmarks and users
who ask for it call it (root only), and :func:`scheduler_set` puts the previous one back.

Off Linux, or for files on devices without a request queue (tmpfs, overlay, network file systems)
these return None.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["io_scheduler", "parse_scheduler", "queue_dir", "scheduler_set", "set_io_scheduler"]

SYSFS = Path("/sys/dev/block")  # tests point this at a fake tree


def _write(file: Path, name: str) -> None:  # sysfs: writing a name selects it (tests emulate this)
    file.write_text(name)


def queue_dir(path: str | os.PathLike) -> Path | None:
    """The sysfs ``queue`` directory of the block device holding ``path`` (a partition's: its disk's),
    or None where there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    dev = SYSFS / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for d in (dev / "queue", dev / ".." / "queue"):  # a partition has no queue of its own
        if (d / "scheduler").is_file():
            return d.resolve()
    return None


def parse_scheduler(text: str) -> tuple[str, list[str]]:
    """``(active, available)`` from a sysfs ``scheduler`` file, e.g. ``"none [mq-deadline] kyber"``."""
    names = text.split()
    active = [n[1:-1] for n in names if n.startswith("[") and n.endswith("]")]
    if len(active) != 1:
        raise ValueError(f"cannot tell the active I/O scheduler from {text.strip()!r}")
    return active[0], [n.strip("[]") for n in names]


def io_scheduler(path: str | os.PathLike) -> dict | None:
    """``{"device", "active", "available"}`` for the device holding ``path``, or None (see module)."""
    q = queue_dir(path)
    return None if q is None else _read(q)


def _read(q: Path) -> dict | None:
    try:
        active, avail = parse_scheduler((q / "scheduler").read_text())
    except (OSError, ValueError):
        return None
    return {"device": q.parent.name, "active": active, "available": avail}


def set_io_scheduler(path: str | os.PathLike, name: str) -> str:
    """Make ``name`` the I/O scheduler of the device holding ``path``; returns the previous one.

    Raises ValueError where the device has no scheduler setting or does not offer ``name``, and
    PermissionError (with what to do) where the process may not change it.
    """
    q = queue_dir(path)
    info = None if q is None else _read(q)
    if info is None:
        raise ValueError(f"{path}: not on a block device with an I/O scheduler setting")
    if name not in info["available"]:
        raise ValueError(f"device {info['device']} offers the I/O schedulers {info['available']}, not {name!r}")
    if info["active"] != name:
        try:
            _write(q / "scheduler", name)
        except PermissionError as e:
            raise PermissionError(e.errno, f"setting the I/O scheduler of {info['device']} needs root "
                                           f"(or: echo {name} | sudo tee {q / 'scheduler'})") from e
    return info["active"]


@contextlib.contextmanager
def scheduler_set(path: str | os.PathLike, name: str | None) -> Iterator[dict | None]:
    """Within the block, the device holding ``path`` uses I/O scheduler ``name`` (None: leave it); the
    previous scheduler is restored on exit, also after an error. Yields ``{"device", "before", "during"}``."""
    info = io_scheduler(path)
    if name is None:
        yield None if info is None else {"device": info["device"], "before": info["active"],
                                         "during": info["active"]}
        return
    before = set_io_scheduler(path, name)
    try:
        yield {"device": info["device"], "before": before, "during": name}
    finally:
        if before != name:
            set_io_scheduler(path, before)
