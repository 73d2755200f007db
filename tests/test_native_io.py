"""Direct (O_DIRECT + io_uring) row reads: bit-identical to the mapping for any row width and id set, the
fallbacks, and the errors (a file truncated under the store, a closed store, a refused io mode)."""

# Shapes: N requested row ids, U distinct sorted ids, R rows in the table, d row width.

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.store import native_io
from engram.store.base import DiskStore, write_store
from engram.store.cache import CachedStore

pytestmark = pytest.mark.skipif(not native_io.available(),
                                reason=f"direct I/O unavailable here: {native_io.unavailable_reason()}")


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def random_table(rows, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**15), 2**15 - 1, (rows, dim * (dtype.itemsize // 2)), dtype=torch.int16, generator=g)
    return raw.view(dtype)  # arbitrary bit patterns, NaN payloads included


@pytest.fixture(scope="module", params=[(3001, 6, torch.float32), (700, 64, torch.float32), (517, 96, torch.bfloat16)],
                ids=["24B-rows", "256B-rows", "192B-bf16-rows"])
def stores(request, tmp_path_factory):
    """(table, direct DiskStore, mmap DiskStore) over the same file; 24-byte rows straddle 512-byte blocks."""
    rows, dim, dtype = request.param
    table = random_table(rows, dim, dtype)
    path = write_store(tmp_path_factory.mktemp("dio") / "t.rows", table)
    direct = DiskStore.open(path, io="direct")
    mapped = DiskStore.open(path, io="mmap")
    assert direct.io == "direct" and mapped.io == "mmap"
    yield table, direct, mapped
    direct.close()
    mapped.close()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_direct_gather_equals_the_table_bit_for_bit(stores, data):
    table, direct, mapped = stores
    R = table.shape[0]
    ids = data.draw(st.lists(st.integers(0, R - 1), min_size=1, max_size=300)
                    | st.builds(lambda a, n: list(range(a, min(R, a + n))), st.integers(0, R - 1), st.integers(1, 600)))
    rows = torch.tensor(ids, dtype=torch.int64)
    got = direct.gather(rows)
    assert torch.equal(bits(got), bits(table[rows]))
    assert torch.equal(bits(got), bits(mapped.gather(rows)))


def test_whole_table_first_and_last_rows(stores):
    table, direct, _ = stores
    R = table.shape[0]
    assert torch.equal(bits(direct.gather(torch.arange(R))), bits(table))  # long merged reads, up to a slot each
    assert torch.equal(bits(direct.gather(torch.tensor([R - 1, 0, R - 1]))), bits(table[[R - 1, 0, R - 1]]))


def test_direct_reads_are_counted_per_aligned_block(tmp_path):
    table = random_table(4096, 64)  # 256-byte rows: two per 512-byte block
    with DiskStore.open(write_store(tmp_path / "t", table), io="direct") as store:
        before = store.direct_counts()
        store.gather(torch.tensor([0, 1, 2, 3, 1000, 3000]))  # rows 0-3 share one read of two blocks
        after = store.direct_counts()
        assert after["reads"] - before["reads"] == 3
        assert after["bytes"] - before["bytes"] == {512: 1024 + 512 + 512, 4096: 3 * 4096}[store._block]
        s = store.stats()["disk"]
        assert s["unique"] == 6 and s["bytes_read"] == 6 * 256


def test_concurrent_gathers_on_one_store(tmp_path):
    table = random_table(20000, 16)
    with DiskStore.open(write_store(tmp_path / "t", table), io="direct") as store:
        errors, rng = [], np.random.default_rng(0)
        id_sets = [torch.from_numpy(rng.integers(0, 20000, 5000)) for _ in range(8)]

        def work(rows):
            try:
                for _ in range(5):
                    assert torch.equal(bits(store.gather(rows)), bits(table[rows]))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(r,)) for r in id_sets]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)


def test_cache_over_a_direct_store_is_bit_identical(tmp_path):
    table = random_table(5000, 8)
    rng = np.random.default_rng(1)
    with DiskStore.open(write_store(tmp_path / "t", table), io="direct") as store:
        for policy in ("lru", "lfu"):
            with CachedStore(store, 32 * 300, policy) as cache:
                for _ in range(20):
                    rows = torch.from_numpy(rng.zipf(1.3, 400) % 5000)
                    assert torch.equal(bits(cache.gather(rows)), bits(table[rows]))


def test_a_file_truncated_under_the_store_raises_naming_it(tmp_path):
    table = random_table(4096, 64)
    path = write_store(tmp_path / "t", table)
    with DiskStore.open(path, io="direct") as store:
        os.truncate(path, os.path.getsize(path) - 3000)  # the last ~12 rows are gone
        assert torch.equal(bits(store.gather(torch.tensor([5, 4000]))), bits(table[[5, 4000]]))
        with pytest.raises(OSError, match=r"t.*direct read"):
            store.gather(torch.tensor([5, 4095]))
        # the store still works for rows that exist (the ring went back to the pool intact)
        assert torch.equal(bits(store.gather(torch.tensor([7]))), bits(table[[7]]))


def test_started_gathers_equal_gather_and_overlap(tmp_path):
    """gather_start: several requests in flight on one store at once (one ring each), results and
    statistics equal to gather's; a static cache over it starts only its misses."""
    table = random_table(30000, 64)
    rng = np.random.default_rng(3)
    with DiskStore.open(write_store(tmp_path / "t", table), io="direct") as store, \
            DiskStore.open(tmp_path / "t", io="direct") as twin:
        reqs = [torch.from_numpy(rng.integers(0, 30000, n)) for n in (1, 7, 300, 2000)]
        reqs.append(torch.arange(100, 140))  # distinct ascending: read straight into the result
        handles = [store.gather_start(r) for r in reqs]  # all submitted before any is collected
        assert len(store._rings._idle) == 0  # each in-flight request holds its own ring
        for r, h in zip(reversed(reqs), reversed(handles), strict=True):  # collected in another order
            assert torch.equal(bits(h.result()), bits(table[r]))
            assert h.result() is h.result() and h.done  # idempotent
        for r in reqs:
            twin.gather(r)
        assert store.stats() == twin.stats() and store.direct_counts() == twin.direct_counts()
        assert store.gather_start(torch.empty(0, dtype=torch.int64)).result().shape == (0, 64)
        store.gather_start(reqs[2])  # dropped without result(): its ring still comes back
        import gc
        gc.collect()
        assert all(r._pending is None for r in store._rings._idle)
        with pytest.raises(ValueError, match="out of range"):
            store.gather_start(torch.tensor([30000]))
        profile = np.bincount(rng.zipf(1.2, 50000) % 30000, minlength=30000)
        store.reset_stats()
        twin.reset_stats()
        with CachedStore(store, 256 * 3000, "static", profile=profile) as cache, \
                CachedStore(twin, 256 * 3000, "static", profile=profile) as ref:
            for _ in range(5):
                rows = torch.from_numpy(rng.zipf(1.2, 500) % 30000)
                h = cache.gather_start(rows)
                assert torch.equal(bits(h.result()), bits(table[rows]))
                assert torch.equal(bits(ref.gather(rows)), bits(table[rows]))
            hot = torch.from_numpy(cache.resident_rows()[:50])
            assert cache.gather_start(hot).done  # all hits: nothing to wait for
            ref.gather(hot)
            assert cache.stats() == ref.stats()


def test_a_started_gather_reports_read_errors_when_collected(tmp_path):
    table = random_table(4096, 64)
    path = write_store(tmp_path / "t", table)
    with DiskStore.open(path, io="direct") as store:
        os.truncate(path, os.path.getsize(path) - 3000)
        h = store.gather_start(torch.tensor([5, 4095]))
        for _ in range(2):  # the same error each time it is asked
            with pytest.raises(OSError, match=r"t.*direct read"):
                h.result()
        assert torch.equal(bits(store.gather_start(torch.tensor([7, 6])).result()), bits(table[[7, 6]]))


def test_closed_direct_store_says_closed(tmp_path):
    store = DiskStore.open(write_store(tmp_path / "t", torch.randn(10, 4)), io="direct")
    store.close()
    store.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        store.gather(torch.tensor([1]))


def test_io_mode_is_checked_and_auto_falls_back(tmp_path, monkeypatch):
    table = random_table(10, 4)
    path = write_store(tmp_path / "t", table)
    with pytest.raises(ValueError, match="io must be"):
        DiskStore.open(path, io="uring")
    monkeypatch.setattr(native_io, "open_direct", lambda *a, **k: None)
    with DiskStore.open(path) as store:
        assert store.io == "mmap"
        assert torch.equal(bits(store.gather(torch.tensor([3, 1]))), bits(table[[3, 1]]))
    with pytest.raises(ValueError, match="io='direct' unavailable"):
        DiskStore.open(path, io="direct")


def test_read_rows_checks_its_buffer_and_ring(tmp_path):
    table = random_table(100, 8)
    with DiskStore.open(write_store(tmp_path / "t", table), io="direct") as store:
        ring = native_io.Ring(fd=store._dfd)
        try:
            with pytest.raises(ValueError, match="C-contiguous"):
                native_io.read_rows(ring, store._dfd, np.array([1, 2]), 32, store.header.data_offset, store._block,
                                    np.empty((3, 8), np.float32))
            with pytest.raises(ValueError, match="file descriptor"):
                native_io.read_rows(ring, store._dfd + 1000, np.array([1]), 32, store.header.data_offset,
                                    store._block, np.empty((1, 8), np.float32))
            out = np.empty((2, 8), np.float32)
            native_io.read_rows(ring, store._dfd, np.array([4, 9]), 32, store.header.data_offset, store._block, out)
            assert torch.equal(bits(torch.from_numpy(out)), bits(table[[4, 9]]))
        finally:
            ring.close()
        with pytest.raises(ValueError, match="closed"):
            native_io.read_rows(ring, store._dfd, np.array([1]), 32, store.header.data_offset, store._block,
                                np.empty((1, 8), np.float32))


def test_env_switch_disables_direct_io():
    code = ("from engram.store import native_io, base as store; import torch, tempfile, pathlib;"
            "d = pathlib.Path(tempfile.mkdtemp()); p = store.write_store(d / 't', torch.ones(4, 4));"
            "s = store.DiskStore.open(p); print(native_io.available(), native_io.unavailable_reason(), s.io)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ENGRAM_DIRECT_IO": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "disabled", "by", "ENGRAM_DIRECT_IO=0", "mmap"]
