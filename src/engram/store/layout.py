"""Co-access file layout: write the rows one n-gram looks up next to each other in a store file.

Why: an n-gram's K hash heads land on K unrelated rows of the flat table, so a cold n-gram costs K
separate disk reads (measured: when an n-gram misses the static cache, 6-8 of its 8 head rows miss).
Each direct read costs ~4-5 us of CPU here, taken from the model's compute. If the rows of the n-grams
a corpus uses are stored side by side, the reader merges them into one read (rows in adjacent blocks
share a read, see :mod:`engram.store.native_io`).

A :class:`RowLayout` says where each logical row (the id the hashing computes) sits in the file: the
``placed`` rows first, in the given order, then every other row in ascending id order. It is a bijection,
so a store reads the same rows whatever the layout; only the number of reads changes. Stored as a
sidecar ``.npy`` of the placed ids (int64) whose name, length and crc32 the store file's header records
(``meta["layout"]``); the sidecar is written before the store file that names it, under a name of its
own, so an interrupted write never pairs a store with the wrong layout.

:func:`co_access_order` builds the placed order from the row groups of a profile corpus (one group =
the K head rows of one n-gram order at one position): distinct groups, most frequent first, each row at
its first (most frequent) group. Rows the static cache keeps in RAM need no skipping: they sit inside
their group's span, and the reader merges rows in the same or adjacent 512-byte blocks anyway
(simulated on the benchmark's batches: skipping them changes the read count by < 0.5%).
"""

# Shapes: R rows in the table, P placed rows, N requested ids, G groups, K rows per group.

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_write
from engram.store import native_cache
from engram.store.format import StoreFormatError, read_header, write_store

__all__ = ["CoAccessCounter", "RowLayout", "co_access_order", "read_layout_file", "remove_stale_layouts",
           "write_layout_file", "write_store_with_layout"]


class RowLayout:
    """Logical row id <-> position in a store file: ``placed_P`` first (in order), then the rest ascending.

    Args:
        placed_P: distinct row ids in ``[0, num_rows)`` (int64), in the order they are written.
        num_rows: rows of the table.
    """

    def __init__(self, placed_P, num_rows: int) -> None:
        placed = np.ascontiguousarray(placed_P, dtype=np.int64).reshape(-1)
        self.num_rows = int(num_rows)
        if placed.size > self.num_rows:
            raise ValueError(f"layout places {placed.size} rows but the table has {self.num_rows}")
        order = np.argsort(placed, kind="stable")
        sorted_P = placed[order]
        if sorted_P.size and (sorted_P[0] < 0 or sorted_P[-1] >= self.num_rows):
            raise ValueError(f"layout row ids must lie in [0, {self.num_rows}), got "
                             f"[{sorted_P[0]}, {sorted_P[-1]}]")
        if sorted_P.size > 1 and not (sorted_P[1:] > sorted_P[:-1]).all():
            raise ValueError("layout row ids must be distinct")
        # Kept only sorted + where each sits, in 32 bits when the table allows: a store holds this in RAM
        # for as long as it is open (8 bytes per placed row instead of 24).
        self._idx = np.dtype(np.int32) if self.num_rows < 2**31 else np.dtype(np.int64)
        self._sorted_P = sorted_P.astype(self._idx)
        self._slot_P = order.astype(self._idx)  # file position of _sorted_P[i]
        # Rank index (a bitmap of placed rows + placed rows before each 64-row word, 0.19 bytes per row):
        # physical() is then O(1) per row. A binary search of _sorted_P costs ~0.8 us per row here (a cache
        # miss per level), as much as the disk reads the layout saves.
        n_words = -(-self.num_rows // 64)
        mask = np.zeros(n_words * 64, dtype=bool)
        mask[sorted_P] = True
        self._bits_W = np.packbits(mask, bitorder="little").view("<u8")
        del mask
        counts = np.bitwise_count(self._bits_W)
        self._before_W = np.zeros(n_words, dtype=self._idx)
        np.cumsum(counts[:-1], out=self._before_W[1:])

    @property
    def num_placed(self) -> int:
        return int(self._sorted_P.size)

    @property
    def nbytes(self) -> int:
        """RAM this layout holds."""
        return self._sorted_P.nbytes + self._slot_P.nbytes + self._bits_W.nbytes + self._before_W.nbytes

    @property
    def placed_P(self) -> np.ndarray:
        """The placed row ids in file order (int64; rebuilt on each call)."""
        out = np.empty(self.num_placed, dtype=np.int64)
        out[self._slot_P] = self._sorted_P
        return out

    def physical(self, rows_N: np.ndarray) -> np.ndarray:
        """File positions (int64) of logical rows (any shape, int64, already range-checked)."""
        P = self._sorted_P.size
        if P == 0:
            return rows_N
        if native_cache.available():  # one pass instead of ~10 array operations
            return native_cache.physical(rows_N, self._bits_W, self._before_W, self._slot_P, P)
        return self._physical_numpy(rows_N)

    def _physical_numpy(self, rows_N: np.ndarray) -> np.ndarray:
        P = self._sorted_P.size
        x = np.asarray(rows_N, dtype=np.int64)
        w = x >> 6
        word = self._bits_W[w]
        bit = (x & 63).astype(np.uint64)
        hit = ((word >> bit) & np.uint64(1)).astype(bool)
        rank = self._before_W[w] + np.bitwise_count(word & ((np.uint64(1) << bit) - np.uint64(1)))
        # a placed row sits where it was written; an unplaced row x comes after all placed rows, behind
        # the `rank` placed rows with smaller ids
        out = P + x - rank
        out[hit] = self._slot_P[rank[hit]]
        return out

    def logical(self, pos_N: np.ndarray) -> np.ndarray:
        """Logical rows at file positions ``pos_N`` (the inverse of :meth:`physical`)."""
        pos = np.asarray(pos_N, dtype=np.int64)
        P, s = self.num_placed, self._sorted_P.astype(np.int64)
        out = np.empty_like(pos)
        head = pos < P
        out[head] = self.placed_P[pos[head]]
        q = pos[~head] - P  # the q-th unplaced row is x = q + (placed rows below x)
        gaps = s - np.arange(P)  # unplaced rows below s[j] (non-decreasing)
        j = np.searchsorted(gaps, q, side="right")  # placed rows below x: those with gaps[j] <= q
        out[~head] = q + j
        return out

    def file_order(self, piece_rows: int = 1 << 16) -> Iterator[np.ndarray]:
        """Logical row ids in file order, in pieces of at most ``piece_rows`` (to write a store)."""
        placed = self.placed_P
        for a in range(0, self.num_placed, piece_rows):
            yield placed[a:a + piece_rows]
        del placed
        s = self._sorted_P
        for a in range(0, self.num_rows, piece_rows):
            b = min(a + piece_rows, self.num_rows)
            ids = np.arange(a, b, dtype=np.int64)
            lo, hi = np.searchsorted(s, np.array([a, b], dtype=s.dtype))  # s's dtype: no copy of s
            if hi > lo:
                keep = np.ones(b - a, dtype=bool)
                keep[s[lo:hi] - a] = False
                ids = ids[keep]
            if ids.size:
                yield ids

    def __eq__(self, other) -> bool:
        return (isinstance(other, RowLayout) and other.num_rows == self.num_rows
                and np.array_equal(other._sorted_P, self._sorted_P) and np.array_equal(other._slot_P, self._slot_P))

    def __repr__(self) -> str:
        return f"RowLayout(num_rows={self.num_rows}, placed={self.num_placed})"


class CoAccessCounter:
    """Counts row groups (``[G, K]`` arrays: one n-gram occurrence's K head rows per row) as they stream in.

    Memory stays proportional to the distinct groups seen, not to the occurrences: the counts are folded
    every ~4M new entries. :meth:`order` gives the placed row order (see :func:`co_access_order`).
    """

    def __init__(self, num_rows: int) -> None:
        self.num_rows = int(num_rows)
        self._keys: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._width: int | None = None
        self._pending = 0

    def add(self, groups_GK) -> None:
        g = np.ascontiguousarray(groups_GK, dtype=np.int64)
        if g.ndim != 2:
            raise ValueError(f"groups must be [G, K] arrays, got shape {list(g.shape)}")
        if self._width is None:
            self._width = g.shape[1]
        elif g.shape[1] != self._width:
            raise ValueError(f"all groups must have the same width, got {self._width} and {g.shape[1]}")
        if g.size and (g.min() < 0 or g.max() >= self.num_rows):
            raise ValueError(f"group row ids must lie in [0, {self.num_rows})")
        u, c = np.unique(g.view(np.dtype((np.void, 8 * self._width))).ravel(), return_counts=True)
        self._keys.append(u)
        self._counts.append(c)
        self._pending += u.size
        if self._pending > _MERGE_EVERY:
            self._fold()

    def _fold(self) -> None:
        u, inv = np.unique(np.concatenate(self._keys), return_inverse=True)
        c = np.bincount(inv.reshape(-1), weights=np.concatenate(self._counts), minlength=u.size).astype(np.int64)
        self._keys, self._counts, self._pending = [u], [c], 0

    def order(self, max_groups: int | None = None) -> np.ndarray:
        """Placed row ids: distinct groups by descending count, each row where it first appears."""
        if not self._keys:
            return np.zeros(0, dtype=np.int64)
        self._fold()
        (u,), (c,) = self._keys, self._counts
        order = np.argsort(-c, kind="stable")[:max_groups]
        flat = np.frombuffer(u[order].tobytes(), dtype=np.int64)
        _, first = np.unique(flat, return_index=True)
        return flat[np.sort(first)]


def co_access_order(groups: Iterable[np.ndarray], num_rows: int, max_groups: int | None = None) -> np.ndarray:
    """Placed row order from row groups: distinct groups by descending count, each row where it first appears.

    ``groups`` yields ``[G, K]`` int arrays (one row per n-gram occurrence: its K head rows), e.g. per
    batch and n-gram order; counts are accumulated across them. Equal counts are ordered by the groups'
    bytes, so the result depends only on the multiset of groups. ``max_groups`` keeps only the most
    frequent groups.
    """
    counter = CoAccessCounter(num_rows)
    for g in groups:
        counter.add(g)
    return counter.order(max_groups)


_MERGE_EVERY = 1 << 22  # new distinct-per-piece entries between folds of the counts


def layout_file_name(store_name: str) -> str:
    """A fresh sidecar name for the store file ``store_name`` (unique, so an old store keeps its own)."""
    return f"{store_name}.layout-{uuid.uuid4().hex[:16]}.npy"


def write_layout_file(path: str | os.PathLike, layout: RowLayout) -> dict:
    """Write ``layout``'s placed ids to ``path`` durably (temp, fsync, rename, fsync dir); return header meta."""
    data = layout.placed_P.astype("<i8", copy=False)
    path = atomic_write(path, lambda f: np.save(f, data, allow_pickle=False))
    return {"file": path.name, "placed": int(data.size), "crc32": zlib.crc32(data)}


def read_layout_file(store_path: Path, meta: dict, num_rows: int) -> RowLayout:
    """The layout a store's header names (``meta`` = its ``meta["layout"]``), checked; StoreFormatError if not."""
    try:
        name, placed, crc = str(meta["file"]), int(meta["placed"]), int(meta["crc32"])
    except (KeyError, TypeError, ValueError):
        raise StoreFormatError(f"{store_path}: header's layout entry is malformed: {meta!r}") from None
    if Path(name).name != name:
        raise StoreFormatError(f"{store_path}: layout file {name!r} must be a plain file name")
    path = store_path.parent / name
    if not path.is_file():
        raise StoreFormatError(f"{store_path}: its row layout file {path} is missing (the store's rows are "
                               "permuted by it and cannot be read without it)")
    try:
        data = np.load(path, allow_pickle=False, mmap_mode=None)
    except (ValueError, OSError, EOFError) as e:
        raise StoreFormatError(f"{path}: not a readable layout file ({e})") from None
    if data.dtype != np.dtype("<i8") or data.ndim != 1 or data.size != placed:
        raise StoreFormatError(f"{path}: layout holds {data.dtype} {list(data.shape)}, the store expects "
                               f"int64 [{placed}]")
    got = zlib.crc32(np.ascontiguousarray(data))
    if got != crc:
        raise StoreFormatError(f"{path}: layout checksum mismatch (stored {crc:08x}, computed {got:08x}): "
                               "the layout file is corrupted")
    try:
        return RowLayout(data, num_rows)
    except ValueError as e:
        raise StoreFormatError(f"{path}: {e}") from None


def write_store_with_layout(path: str | os.PathLike, take: Callable[[np.ndarray], torch.Tensor], layout: RowLayout,
                            *, dim: int, dtype, meta: dict | None = None,
                            piece_rows: int = 1 << 16) -> Path:
    """Write a store file at ``path`` whose rows are in ``layout``'s file order; ``take(ids)`` gives rows.

    ``take`` maps an int64 array of logical ids to their ``[n, dim]`` rows (a table in RAM, an open store,
    ...); it is called with pieces of at most ``piece_rows`` ids. The sidecar goes down first under a new
    name, then the store (crash-safe, :func:`write_store`); only then are sidecars no longer named by the
    store removed. An interruption leaves the previous file with its own sidecar.
    """
    path = Path(path)
    side = path.parent / layout_file_name(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = write_layout_file(side, layout)
    try:
        write_store(path, (take(ids) for ids in layout.file_order(piece_rows)), num_rows=layout.num_rows, dim=dim,
                    dtype=dtype, meta={**(meta or {}), "layout": entry})
    except BaseException:
        side.unlink(missing_ok=True)
        raise
    remove_stale_layouts(path)
    return path


def remove_stale_layouts(store_path: str | os.PathLike) -> list[Path]:
    """Delete the layout sidecars of ``store_path`` its header does not name (left by earlier writes)."""
    store_path = Path(store_path)
    try:
        keep = (read_header(store_path).meta.get("layout") or {}).get("file")
    except (OSError, StoreFormatError):
        return []  # no valid store here: nothing can tell which sidecar is live
    gone = []
    for p in store_path.parent.glob(f"{store_path.name}.layout-*.npy"):
        if p.name != keep:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
