"""Batched read-ahead of a disk store: the advised pages cover exactly the rows, reads stay bit-exact, the
fallback without posix_fadvise works, and read-path errors surface in the caller."""

# Shapes: N requested row ids, U distinct ids, K page runs, R rows in the table, d row width.

import errno
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.store import readahead
from engram.store.base import DiskStore, write_store
from engram.store.cache import CachedStore
from engram.store.prefetch import Prefetcher
from engram.store.readahead import PAGE, SeenPages, page_runs

# 6 fp32 = 24-byte rows do not divide a page: rows 170, 341, ... straddle page boundaries.
R, D = 2000, 6
STRADDLING = [r for r in range(R - 1) if (r * 24) // PAGE != ((r + 1) * 24 - 1) // PAGE]


def bits(t):
    return t.view(torch.int32)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """(table, DiskStore) of a [2000, 6] fp32 table of arbitrary bit patterns (12 data pages)."""
    g = torch.Generator().manual_seed(3)
    table = torch.randint(-(2**31), 2**31 - 1, (R, D), dtype=torch.int32, generator=g).view(torch.float32)
    path = write_store(tmp_path_factory.mktemp("ra") / "t.rows", table)
    with DiskStore.open(path, io="mmap") as store:
        yield table, store


def pages_of(rows, row_bytes, base, page=PAGE):
    return sorted({p for r in rows for p in range((base + r * row_bytes) // page,
                                                  (base + (r + 1) * row_bytes - 1) // page + 1)})


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=60), st.sampled_from([4, 24, 256, 4096, 5000, 9000]),
       st.sampled_from([0, 4096, 100]), st.sampled_from([4096, 512]))
def test_page_runs_cover_exactly_the_rows_pages_in_maximal_runs(rows, row_bytes, base, page):
    rows_U = np.unique(np.array(rows, dtype=np.int64))
    first_K, count_K = page_runs(rows_U, row_bytes, base, page)
    got = [p for f, c in zip(first_K.tolist(), count_K.tolist(), strict=True) for p in range(f, f + c)]
    assert got == pages_of(rows_U.tolist(), row_bytes, base, page)
    assert (count_K >= 1).all()
    assert (first_K[1:] > first_K[:-1] + count_K[:-1]).all()  # disjoint, and never adjacent: merged


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=40), st.lists(st.integers(0, 300), max_size=40),
       st.sampled_from([1, 3]))
def test_seen_pages_yields_each_page_once_until_cleared(a, b, width):
    seen = SeenPages(301 * PAGE * 3)

    def runs(rows):
        return page_runs(np.unique(np.array(rows, dtype=np.int64)), width * PAGE, 0)

    def pages(fk):
        return {p for f, c in zip(*(x.tolist() for x in fk), strict=True) for p in range(f, f + c)}

    first = pages(seen.unseen(*runs(a)))
    assert first == pages(runs(a))
    assert pages(seen.unseen(*runs(a))) == first  # not marked yet: still unseen
    seen.mark(*seen.unseen(*runs(a)))
    second = pages(seen.unseen(*runs(b)))
    assert second == pages(runs(b)) - first
    seen.mark(*seen.unseen(*runs(b)))
    assert pages(seen.unseen(*runs(a + b))) == set()
    seen.clear()
    assert pages(seen.unseen(*runs(b))) == pages(runs(b))


def test_readahead_gathers_equal_indexing_for_awkward_id_sets(disk):
    table, store = disk
    rng = np.random.default_rng(0)
    cases = [[0], [R - 1], [R - 1, 0, R - 1, 0], STRADDLING, STRADDLING[::-1] + [STRADDLING[0]] * 3,
             [s + 1 for s in STRADDLING], list(range(R))[::-1], rng.integers(0, R, 500).tolist(),
             rng.permutation(R)[:700].tolist()]
    for ids in cases:
        store.drop_page_cache()  # every case starts cold and advises its pages
        rows_N = torch.tensor(ids, dtype=torch.int64)
        assert torch.equal(bits(store.gather(rows_N)), bits(table)[rows_N])
        store.readahead = False
        try:
            assert torch.equal(bits(store.gather(rows_N)), bits(table)[rows_N])  # the plain fault path
        finally:
            store.readahead = True


def test_advice_covers_the_rows_bytes_once_and_again_after_a_drop(disk, monkeypatch):
    _, store = disk
    calls = []
    monkeypatch.setattr(readahead, "_fadvise", lambda fd, off, n, adv: calls.append((fd, off, n, adv)))
    store.drop_page_cache()
    before = store.readahead_counts()
    ids = [5, 170, 171, 1999, 5, 900]
    store.gather(torch.tensor(ids))
    want = pages_of(sorted(set(ids)), 24, store.header.data_offset)
    got = [p for _, off, n, _ in calls for p in range(off // PAGE, (off + n) // PAGE)]
    assert got == want
    assert all(fd == store._fd and adv == os.POSIX_FADV_WILLNEED and off % PAGE == 0 for fd, off, _, adv in calls)
    after = store.readahead_counts()
    assert after["runs"] - before["runs"] == len(calls) and after["pages"] - before["pages"] == len(want)
    calls.clear()
    store.gather(torch.tensor(ids))
    assert calls == []  # already advised: warm pages cost no system call
    store.drop_page_cache()
    store.gather(torch.tensor(ids))
    assert [p for _, off, n, _ in calls for p in range(off // PAGE, (off + n) // PAGE)] == want


def test_without_posix_fadvise_reads_fall_back_to_page_faults(disk, monkeypatch):
    table, store = disk
    monkeypatch.setattr(readahead, "_fadvise", None)
    assert not readahead.available()
    store.drop_page_cache()
    before = store.readahead_counts()
    rows_N = torch.tensor([R - 1, 0, *STRADDLING, 0])
    assert torch.equal(bits(store.gather(rows_N)), bits(table)[rows_N])
    assert store.readahead_counts() == before


def test_rows_wider_than_a_page_are_advised_and_exact(tmp_path):
    table = torch.randn(40, 1500)  # 6000-byte rows: each spans two or three pages
    with DiskStore.open(write_store(tmp_path / "wide", table), io="mmap") as store:
        store.drop_page_cache()
        rows_N = torch.tensor([39, 0, 7, 7, 8, 20])
        assert torch.equal(store.gather(rows_N), table[rows_N])
        assert store.readahead_counts()["pages"] == len(pages_of([0, 7, 8, 20, 39], 6000, store.header.data_offset))


def test_tier_stats_count_logical_rows_with_readahead(disk):
    _, store = disk
    store.drop_page_cache()
    store.reset_stats()
    store.gather(torch.tensor([3, 3, 170, 171, 3]))
    store.gather(torch.tensor([3]))
    assert store.stats()["disk"] == {"requested": 6, "unique": 4, "hits": 4, "misses": 0, "bytes_read": 4 * 24}
    with CachedStore(store, 24 * 10, "lru") as cache:
        store.reset_stats()
        cache.gather(torch.tensor([1, 2, 2, 1999]))
        cache.gather(torch.tensor([2, 1999, 5]))
        s = cache.stats()
        assert s["cache"] == {"requested": 7, "unique": 6, "hits": 2, "misses": 4, "bytes_read": 2 * 24}
        assert s["disk"] == {"requested": 4, "unique": 4, "hits": 4, "misses": 0, "bytes_read": 4 * 24}


def test_read_ahead_errors_surface_in_the_caller_and_count_nothing(disk, monkeypatch):
    table, store = disk

    def broken(fd, off, n, adv):
        raise OSError(errno.EIO, "injected read-ahead failure")

    monkeypatch.setattr(readahead, "_fadvise", broken)
    store.drop_page_cache()
    store.reset_stats()
    with pytest.raises(OSError, match="injected"):
        store.gather(torch.tensor([1, 2, 3]))
    assert store.stats()["disk"]["requested"] == 0
    with CachedStore(store, 24 * 10, "lru") as cache:
        with pytest.raises(OSError, match="injected"):
            cache.gather(torch.tensor([4, 5]))
        assert cache.resident == 0  # nothing admitted from a failed read
        with Prefetcher({1: cache}, workers=1, join_timeout=5) as pf:
            handle = pf.submit({1: torch.tensor([[6, 7]])})[1]
            with pytest.raises(OSError, match="injected") as info:
                handle.result(timeout=30)
            assert any("layer 1" in n for n in getattr(info.value, "__notes__", []))
    calls = []
    monkeypatch.setattr(readahead, "_fadvise", lambda *a: calls.append(a))
    assert torch.equal(bits(store.gather(torch.tensor([1, 6]))), bits(table)[[1, 6]])
    assert calls  # a failed advice is not remembered: the pages are advised again


def test_closed_store_reports_closed_not_a_bad_descriptor(tmp_path):
    store = DiskStore.open(write_store(tmp_path / "c", torch.randn(10, 4)), io="mmap")
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.gather(torch.tensor([1]))
