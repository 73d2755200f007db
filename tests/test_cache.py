"""Hot-row cache: gathers bit-identical to the backing store, exact LRU/LFU/static behaviour, clear errors."""

# Shapes: N requested row ids, R rows in the table, d row width, C cache slots.

import threading
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.store.base import DiskStore, RamStore, write_store
from engram.store.cache import POLICIES, CachedStore
from engram.store.profiling import access_profile, coverage_curve, simulate_hit_rate

R, D = 61, 3
RAW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def random_bits_table(dtype, rows=R, dim=D, seed=0):
    """Arbitrary bit patterns (NaN payloads, -0.0, subnormals): only a bitwise copy reproduces them."""
    info = torch.iinfo(RAW[dtype])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max, (rows, dim), dtype=RAW[dtype], generator=g).view(dtype)


def bits(t):
    return t.view(RAW[t.dtype])


# ----------------------------------------------------------------------------- reference models (plain Python)

class RefLRU:
    """Sequential LRU: a request's distinct rows are accessed in ascending order. Hits are the rows cached
    when the request arrives (a request larger than the cache may push some out before their turn)."""

    def __init__(self, capacity):
        self.capacity, self.od = capacity, OrderedDict()

    def request(self, rows):
        hits = len(set(rows) & set(self.od))
        for r in sorted(set(rows)):
            if r in self.od:
                self.od.move_to_end(r)
            else:
                self.od[r] = None
                if len(self.od) > self.capacity:
                    self.od.popitem(last=False)
        return hits

    def resident(self):
        return set(self.od)


class RefLFU:
    """LFU counting accesses while resident, ties to the least recent; a request's rows never evict each
    other, and a request larger than the cache keeps its highest (count, recency) rows."""

    def __init__(self, capacity):
        self.capacity, self.count, self.last, self.tick = capacity, {}, {}, 0

    def request(self, rows):
        uniq = sorted(set(rows))
        ticks = {r: self.tick + 1 + i for i, r in enumerate(uniq)}
        self.tick += len(uniq)
        hits = {r for r in uniq if r in self.count}
        for r in hits:
            self.count[r] += 1
            self.last[r] = ticks[r]
        if len(uniq) > self.capacity:
            rank = {r: (self.count.get(r, 1), ticks[r]) for r in uniq}
            keep = sorted(uniq, key=rank.get)[-self.capacity:]
            self.count = {r: rank[r][0] for r in keep}
            self.last = {r: ticks[r] for r in keep}
            return len(hits)
        for r in uniq:
            if r in hits:
                continue
            if len(self.count) >= self.capacity:
                others = [q for q in self.count if q not in ticks]
                victim = min(others, key=lambda q: (self.count[q], self.last[q]))
                del self.count[victim], self.last[victim]
            self.count[r], self.last[r] = 1, ticks[r]
        return len(hits)

    def resident(self):
        return set(self.count)


def ref_static(counts, capacity):
    """Rows with positive counts, highest first, ties to lower ids; at most ``capacity`` of them."""
    ranked = sorted((r for r in range(len(counts)) if counts[r] > 0), key=lambda r: (-counts[r], r))
    return set(ranked[:capacity])


def check_internal(cache):
    """The row -> slot map and the slot -> row array agree, and nothing beyond the capacity is held."""
    used = cache.resident
    assert used <= cache.capacity
    rows = cache._row_of_C[:used]
    assert np.array_equal(cache._slot_of_R[rows], np.arange(1, used + 1))
    assert np.count_nonzero(cache._slot_of_R) == used


def delta(after, before):
    return {t: {k: after[t][k] - before[t][k] for k in after[t]} for t in after}


# ----------------------------------------------------------------------------------------- property test

@st.composite
def requests_st(draw):
    """Request sequences: mostly decode-sized, some larger than the cache, ids drawn from a hot range."""
    top = draw(st.sampled_from([7, 24, R - 1]))
    ids = st.integers(0, top)
    one = st.one_of(st.lists(ids, max_size=6), st.lists(ids, max_size=45))
    return draw(st.lists(one, min_size=1, max_size=25))


@settings(max_examples=300, deadline=None)
@given(policy=st.sampled_from(POLICIES), dtype=st.sampled_from(list(RAW)),
       capacity=st.sampled_from([1, 2, 5, 16, 40, R + 9]), slack=st.integers(0, 11),
       pool_min=st.sampled_from([1, 3, 256]), use_out=st.booleans(), native=st.booleans(), requests=requests_st(),
       data=st.data())
def test_cache_matches_backing_and_reference_policy(policy, dtype, capacity, slack, pool_min, use_out, native, requests,
                                                    data):
    table = random_bits_table(dtype, seed=capacity)
    ram = RamStore(table)
    budget = capacity * ram.row_bytes + slack % ram.row_bytes  # a partial row's worth of bytes buys nothing
    profile = None
    if policy == "static":
        profile = np.array(data.draw(st.lists(st.integers(0, 4), min_size=R, max_size=R)), dtype=np.int64)
    cache = CachedStore(ram, budget, policy, profile=profile)
    cache.native = cache.native and native  # static: the native split or the numpy path
    C = min(capacity, R)
    assert cache.capacity == C
    if policy != "static":
        cache._pool_min = pool_min  # small pools exercise the reuse of eviction candidates across requests
    ref = {"lru": RefLRU, "lfu": RefLFU}.get(policy, lambda c: None)(C)
    hot = ref_static(profile, C) if policy == "static" else None
    cache.reset_stats()
    total = Counter()
    for req in requests:
        rows_N = torch.tensor(req, dtype=torch.int64)
        before = cache.stats()
        if use_out:
            out = torch.full((len(req), D), 7.0, dtype=dtype)
            assert cache.gather(rows_N, out) is out
        else:
            out = cache.gather(rows_N)
        assert out.dtype == dtype and out.shape == (len(req), D)
        assert torch.equal(bits(out), bits(table[rows_N]))
        d = delta(cache.stats(), before)
        c, b = d["cache"], d["ram"]
        assert c["requested"] == len(req) and c["unique"] == len(set(req))
        assert c["hits"] + c["misses"] == c["unique"]
        assert c["bytes_read"] == c["hits"] * ram.row_bytes
        assert b["requested"] == b["unique"] == c["misses"]  # only the distinct misses go to the backing store
        if ref is not None:
            assert c["hits"] == ref.request(req)
            assert set(cache.resident_rows().tolist()) == ref.resident()
        else:
            assert c["hits"] == len(set(req) & hot)
            assert set(cache.resident_rows().tolist()) == hot
        check_internal(cache)
        total.update(c)
    s = cache.stats()["cache"]
    assert all(s[k] == total[k] for k in s)
    cache.reset_stats()
    assert all(v == 0 for t in cache.stats().values() for v in t.values())


# ------------------------------------------------------------------------------------------ example tests

@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_long_skewed_sequences_match_reference(policy):
    """Thousands of decode-sized requests: the candidate pool is reused, rebuilt and topped up many times."""
    rng = np.random.default_rng(11)
    rows_total = 400
    table = random_bits_table(torch.bfloat16, rows=rows_total, dim=2, seed=4)
    ram = RamStore(table)
    cache = CachedStore(ram, 24 * ram.row_bytes, policy)
    cache._pool_min = 6
    ref = RefLRU(24) if policy == "lru" else RefLFU(24)
    for step in range(1500):
        n = 200 if step % 300 == 299 else int(rng.integers(1, 12))  # now and then a prefill-sized request
        req = np.minimum(rng.zipf(1.3, n) - 1, rows_total - 1)
        rows_N = torch.from_numpy(req)
        before = cache.stats()["cache"]["hits"]
        assert torch.equal(bits(cache.gather(rows_N)), bits(table[rows_N]))
        assert cache.stats()["cache"]["hits"] - before == ref.request(req.tolist())
        assert set(cache.resident_rows().tolist()) == ref.resident()
    check_internal(cache)



@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", list(RAW))
def test_disk_backed_cache_is_bit_identical(tmp_path, policy, dtype):
    table = random_bits_table(dtype, rows=500, dim=5, seed=3)
    path = write_store(tmp_path / "t.rows", table)
    g = torch.Generator().manual_seed(1)
    zipf = (torch.rand(40, 50, generator=g) ** 4 * 500).long()  # skewed: a few rows are hot
    profile = access_profile(zipf[:10], 500) if policy == "static" else None
    with DiskStore.open(path) as disk:
        cache = CachedStore(disk, 60 * disk.row_bytes, policy, profile=profile)
        cache.reset_stats()
        for rows_N in zipf:
            assert torch.equal(bits(cache.gather(rows_N)), bits(table[rows_N]))
        big = torch.randperm(500, generator=g)[:300]  # more distinct rows than the cache holds
        assert torch.equal(bits(cache.gather(big)), bits(table[big]))
        s = cache.stats()
        assert set(s) == {"cache", "disk"} and s["cache"]["hits"] > 0
        assert s["disk"]["unique"] == s["cache"]["misses"]
        cache.close()
        cache.close()
        with pytest.raises(ValueError, match="closed"):
            cache.gather(torch.tensor([1]))


def test_request_larger_than_cache_keeps_its_top_rows():
    ram = RamStore(random_bits_table(torch.float32))
    lru = CachedStore(ram, 4 * ram.row_bytes, "lru")
    lru.gather(torch.tensor([3, 50, 7]))
    assert torch.equal(lru.gather(torch.arange(R).flip(0)), ram.table.flip(0))
    assert lru.resident_rows().tolist() == [57, 58, 59, 60]  # the last ones in row order
    lfu = CachedStore(ram, 2 * ram.row_bytes, "lfu")
    lfu.gather(torch.tensor([5]))
    lfu.gather(torch.tensor([5, 9]))
    lfu.gather(torch.arange(20))  # 5 now has count 3, 9 count 2, the rest 1
    assert lfu.resident_rows().tolist() == [5, 9]
    stat = CachedStore(ram, 3 * ram.row_bytes, "static", profile=np.array([4, 1, 2], dtype=np.int64))
    assert stat.resident_rows().tolist() == [1, 2, 4]  # hot row ids, hottest first
    stat.gather(torch.arange(R))
    assert stat.resident_rows().tolist() == [1, 2, 4]


def test_lfu_prefers_frequent_rows_and_breaks_ties_by_recency():
    ram = RamStore(random_bits_table(torch.float32))
    c = CachedStore(ram, 3 * ram.row_bytes, "lfu")
    for req in ([1], [1], [2], [3], [2], [4]):
        c.gather(torch.tensor(req))
    assert c.resident_rows().tolist() == [1, 2, 4]  # 3 (count 1, older than 4) was the victim
    c.gather(torch.tensor([5]))
    assert c.resident_rows().tolist() == [1, 2, 5]  # 4 (count 1) goes, the count-2 rows stay


def test_static_holds_top_rows_with_ties_to_lower_ids():
    ram = RamStore(random_bits_table(torch.bfloat16))
    counts = np.zeros(R, dtype=np.int64)
    counts[[10, 20, 30, 40]] = [5, 3, 3, 3]
    c = CachedStore(ram, 3 * ram.row_bytes + 1, "static", profile=torch.from_numpy(counts))
    assert c.resident_rows().tolist() == [10, 20, 30]
    assert c.stats()["ram"]["unique"] == 3  # loaded once, in one read
    few = CachedStore(ram, 10 * ram.row_bytes, "static", profile=counts)
    assert few.resident_rows().tolist() == [10, 20, 30, 40]  # never-seen rows are not loaded
    assert few.memory_bytes()["slots"] == 4 * ram.row_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_concurrent_gathers_on_one_cache(policy):
    table = random_bits_table(torch.float32, rows=300, dim=4, seed=5)
    ram = RamStore(table)
    cache = CachedStore(ram, 20 * ram.row_bytes, policy)
    cache._pool_min = 4
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(150):
                rows_N = (torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g) ** 3 * 300).long()
                if not torch.equal(bits(cache.gather(rows_N)), bits(table[rows_N])):
                    errors.append("mismatch")
        except Exception as e:  # surfaced below: a failing thread must fail the test
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    s = cache.stats()["cache"]
    assert s["hits"] + s["misses"] == s["unique"] and s["hits"] > 0
    check_internal(cache)


def test_access_profile_and_coverage_curve():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, R, (2, 5, 3), generator=g) for _ in range(4)] + [np.array([0, 0, 60])]
    counts = access_profile(iter(batches), R)
    expect = np.bincount(np.concatenate([np.asarray(b).reshape(-1) for b in batches]), minlength=R)
    assert counts.dtype == np.int64 and np.array_equal(counts, expect)
    sparse = access_profile([torch.tensor([7, 7, 3])], 10**6)  # few ids in a big table: the sparse path
    assert sparse[7] == 2 and sparse[3] == 1 and sparse.sum() == 3
    with pytest.raises(ValueError, match="out of range"):
        access_profile([torch.tensor([R])], R)
    cov = coverage_curve(np.array([0, 5, 3, 2]), [0.0, 0.25, 0.5, 0.75, 1.0])
    assert np.allclose(cov, [0.0, 0.5, 0.8, 1.0, 1.0])
    assert np.array_equal(coverage_curve(np.zeros(4), [0.5]), [0.0])
    with pytest.raises(ValueError, match="fractions"):
        coverage_curve(np.ones(3), [1.5])


def test_simulate_hit_rate_runs_the_real_bookkeeping():
    g = torch.Generator().manual_seed(2)
    reqs = [(torch.rand(30, generator=g) ** 3 * R).long() for _ in range(40)]
    ram = RamStore(random_bits_table(torch.float32))
    for policy in ("lru", "lfu"):
        sim = simulate_hit_rate(reqs, R, 12, policy)
        real = CachedStore(ram, 12 * ram.row_bytes, policy)
        for r in reqs:
            real.gather(r)
        s = real.stats()["cache"]
        assert (sim["hits"], sim["misses"], sim["unique"]) == (s["hits"], s["misses"], s["unique"])
        assert 0 < sim["hit_rate"] < 1 and sim["hit_rate"] <= sim["lookup_hit_rate"]
    # LRU has the inclusion property: a bigger cache never hits less.
    hits = [simulate_hit_rate(reqs, R, c, "lru")["hits"] for c in (1, 4, 16, 64)]
    assert hits == sorted(hits) and simulate_hit_rate(reqs, R, R, "lru")["misses"] == R - sum(
        1 for r in range(R) if r not in set(torch.cat(reqs).tolist()))
    prof = access_profile(reqs, R)
    assert simulate_hit_rate(reqs, R, R, "static", prof)["misses"] == 0
    with pytest.raises(ValueError, match="capacity"):
        simulate_hit_rate(reqs, R, 0)


def test_bad_arguments_give_clear_errors():
    ram = RamStore(random_bits_table(torch.float32))
    with pytest.raises(ValueError, match=r"smaller than one row \(12 bytes"):
        CachedStore(ram, 11)
    with pytest.raises(ValueError, match="budget_bytes must be an int"):
        CachedStore(ram, 100.0)
    with pytest.raises(ValueError, match="policy must be one of"):
        CachedStore(ram, 1000, "fifo")
    with pytest.raises(ValueError, match="needs profile"):
        CachedStore(ram, 1000, "static")
    with pytest.raises(ValueError, match="only used by policy 'static'"):
        CachedStore(ram, 1000, "lru", profile=np.ones(R))
    with pytest.raises(ValueError, match=f"profile has {R + 1} entries but the table has {R} rows"):
        CachedStore(ram, 1000, "static", profile=np.ones(R + 1))
    with pytest.raises(ValueError, match="1-D"):
        CachedStore(ram, 1000, "static", profile=np.ones((R, 1)))
    with pytest.raises(ValueError, match=">= 0"):
        CachedStore(ram, 1000, "static", profile=-np.ones(R))
    with pytest.raises(ValueError, match="distinct"):
        CachedStore(ram, 1000, "static", profile=np.array([1, 1]))
    with pytest.raises(ValueError, match="out of range"):
        CachedStore(ram, 1000, "static", profile=np.array([R]))
    with pytest.raises(ValueError, match="must be integers"):
        CachedStore(ram, 1000, "static", profile=np.array([1.0]))
    with pytest.raises(ValueError, match="must be a RowStore"):
        CachedStore(ram.table, 1000)
    cache = CachedStore(ram, 500)
    with pytest.raises(ValueError, match="out of range"):
        cache.gather(torch.tensor([0, R]))
    with pytest.raises(ValueError, match="1-D"):
        cache.gather(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="out_Nd"):
        cache.gather(torch.tensor([1]), torch.empty(2, D))
    assert cache.capacity == 500 // 12 and cache.gather(torch.empty(0, dtype=torch.int64)).shape == (0, D)
