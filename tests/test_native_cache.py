"""Native cache kernels: the static cache's split, the layout's rank index and the rank sort equal numpy."""

# Shapes: N requested ids, K miss positions, M distinct missed rows, R table rows, C cache slots, d row width.

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.store import native_cache, native_io
from engram.store.base import RamStore
from engram.store.cache import CachedStore
from engram.store.disk import DiskStore
from engram.store.layout import RowLayout, write_store_with_layout

pytestmark = pytest.mark.skipif(not native_cache.available(),
                                reason=f"native cache kernels unavailable: {native_cache.unavailable_reason()}")


@settings(max_examples=200, deadline=None)
@given(R=st.integers(1, 200), d=st.sampled_from([1, 3, 64]), data=st.data())
def test_split_copies_hits_and_lists_distinct_misses(R, d, data):
    cached = data.draw(st.lists(st.integers(0, R - 1), unique=True, max_size=R))
    slot_of_R = np.zeros(R, dtype=np.int32)
    slot_of_R[cached] = np.arange(1, len(cached) + 1, dtype=np.int32)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    slots_Cd = rng.integers(-2**31, 2**31, (len(cached), d)).astype(np.int32)
    ids_N = np.array(data.draw(st.lists(st.integers(0, R - 1), max_size=80)), dtype=np.int64)
    out_Nd = np.full((ids_N.size, d), 7, dtype=np.int32)
    sp = native_cache.split(ids_N, R, slot_of_R, slots_Cd, out_Nd)

    hit_N = slot_of_R[ids_N] > 0
    assert np.array_equal(out_Nd[hit_N], slots_Cd[slot_of_R[ids_N[hit_N]] - 1])
    assert (out_Nd[~hit_N] == 7).all()  # misses are left for the backing store
    assert sp.unique == np.unique(ids_N).size
    assert sp.hits == np.unique(ids_N[hit_N]).size
    assert np.array_equal(sp.miss_rows_M, np.unique(ids_N[~hit_N]))  # sorted and distinct
    assert np.array_equal(np.sort(sp.miss_pos_K), np.flatnonzero(~hit_N))
    assert np.array_equal(sp.miss_rows_M[sp.miss_inv_K], ids_N[sp.miss_pos_K])


@pytest.mark.parametrize("R,n", [(70, 65), (5_000_000, 20_000)])
def test_split_of_larger_requests_sorts_by_radix(R, n):
    """Over 64 ids the kernel sorts by radix (11-bit digits: 1 or 3 passes here): same answers as numpy."""
    rng = np.random.default_rng(R)
    slot_of_R = np.zeros(R, dtype=np.int32)
    cached = rng.choice(R, size=R // 10, replace=False)
    slot_of_R[cached] = np.arange(1, cached.size + 1, dtype=np.int32)
    slots_Cd = rng.integers(-2**31, 2**31, (cached.size, 4)).astype(np.int32)
    ids_N = np.concatenate([rng.choice(cached, n // 2), rng.integers(0, R, n - n // 2)])
    rng.shuffle(ids_N)
    out_Nd = np.zeros((n, 4), dtype=np.int32)
    sp = native_cache.split(ids_N, R, slot_of_R, slots_Cd, out_Nd)
    hit_N = slot_of_R[ids_N] > 0
    assert np.array_equal(out_Nd[hit_N], slots_Cd[slot_of_R[ids_N[hit_N]] - 1])
    assert (sp.unique, sp.hits) == (np.unique(ids_N).size, np.unique(ids_N[hit_N]).size)
    assert np.array_equal(sp.miss_rows_M, np.unique(ids_N[~hit_N]))
    assert np.array_equal(sp.miss_pos_K, np.flatnonzero(~hit_N)[np.argsort(ids_N[~hit_N], kind="stable")])
    assert np.array_equal(sp.miss_rows_M[sp.miss_inv_K], ids_N[sp.miss_pos_K])
    pos = rng.choice(2**40, size=n, replace=False)
    sorted_M, rank_M = native_cache.sort_rank(pos)
    assert np.array_equal(sorted_M, np.sort(pos)) and np.array_equal(sorted_M[rank_M], pos)


def test_split_rejects_an_out_of_range_id_before_writing():
    slot_of_R = np.array([1, 0, 2, 0], dtype=np.int32)
    slots_Cd = np.arange(6, dtype=np.int32).reshape(2, 3)
    for bad, pos in (([0, 2, 4, 1], 2), ([-1, 0], 0)):
        out_Nd = np.full((len(bad), 3), 7, dtype=np.int32)
        with pytest.raises(ValueError, match=rf"row id {bad[pos]} at position {pos} is out of range \[0, 4\)"):
            native_cache.split(np.array(bad, dtype=np.int64), 4, slot_of_R, slots_Cd, out_Nd)
        assert (out_Nd == 7).all()


@settings(max_examples=80, deadline=None)
@given(R=st.integers(1, 500), data=st.data())
def test_physical_and_sort_rank_equal_the_numpy_paths(R, data):
    placed = data.draw(st.lists(st.integers(0, R - 1), unique=True, max_size=R))
    lo = RowLayout(np.array(placed, dtype=np.int64), R)
    rows = np.array(data.draw(st.lists(st.integers(0, R - 1), max_size=100)), dtype=np.int64)
    want = lo._physical_numpy(rows)
    assert np.array_equal(lo.physical(rows), want)
    if placed:  # both index widths
        assert lo._before_W.dtype == np.int32
        wide = native_cache.physical(rows, lo._bits_W, lo._before_W.astype(np.int64), lo._slot_P.astype(np.int64),
                                     len(placed))
        assert np.array_equal(wide, want)
    pos = np.unique(want)
    np.random.default_rng(R).shuffle(pos)
    sorted_M, rank_M = native_cache.sort_rank(pos)
    assert np.array_equal(sorted_M, np.sort(pos))
    assert np.array_equal(sorted_M[rank_M], pos)


@pytest.mark.parametrize("backing", ["ram", "disk_layout"])
def test_native_static_cache_equals_the_numpy_path(tmp_path, backing):
    """Same rows and the same statistics with the native split on and off, decode-sized and larger requests."""
    R, d = 3000, 64
    g = torch.Generator().manual_seed(5)
    table = torch.randint(-2**31, 2**31 - 1, (R, d), dtype=torch.int32, generator=g).view(torch.float32)
    profile = np.bincount((torch.rand(20000, generator=g) ** 3 * R).long().numpy(), minlength=R)
    reqs = [(torch.rand(n, generator=g) ** 2 * R).long() for n in (1, 7, 64, 64, 300, 0, 5000)]
    stores = []
    if backing == "ram":
        stores = [RamStore(table), RamStore(table)]
    else:
        if not native_io.available():
            pytest.skip("direct reads unavailable")
        placed = np.argsort(-profile, kind="stable")[:1000]
        path = write_store_with_layout(tmp_path / "t.rows", lambda i: table[torch.from_numpy(i)], RowLayout(placed, R),
                                       dim=d, dtype=table.dtype)
        stores = [DiskStore.open(path, io="direct"), DiskStore.open(path, io="direct")]
    caches = [CachedStore(s, 400 * d * 4, "static", profile=profile) for s in stores]
    assert caches[0].native
    caches[1].native = False
    for c in caches:
        c.reset_stats()
    for rows in reqs:
        a = caches[0].gather_start(rows).result()
        b = caches[1].gather_start(rows).result()
        assert torch.equal(a.view(torch.int32), table[rows].view(torch.int32))
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert torch.equal(caches[0].gather(rows).view(torch.int32), caches[1].gather(rows).view(torch.int32))
    assert caches[0].stats() == caches[1].stats()
    with pytest.raises(ValueError, match="row id 3000 at position 1 is out of range"):
        caches[0].gather(torch.tensor([2, 3000]))
    for c, s in zip(caches, stores, strict=True):
        c.close()
        with pytest.raises(ValueError, match="closed"):
            c.gather(torch.tensor([1]))
        s.close()
