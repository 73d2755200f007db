"""Co-access layout: the row permutation, store files written in layout order, their checks, and serving."""

# Shapes: R table rows, P placed rows, d row width, N requested ids.

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.serve import open_memory
from engram.serve.export import co_access_layouts, export_tables, layer_file
from engram.store import layout, native_io
from engram.store.cache import CachedStore
from engram.store.checksum import row_crcs
from engram.store.disk import DiskStore, StoreFormatError
from engram.store.format import read_header, write_store
from engram.store.layout import RowLayout, co_access_order, write_store_with_layout

pytestmark = pytest.mark.usefixtures("one_thread")
IOS = ["mmap"] + (["direct"] if native_io.available() else [])


@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 300), data=st.data())
def test_layout_is_a_bijection_with_placed_rows_first_then_the_rest_ascending(R, data):
    placed = data.draw(st.lists(st.integers(0, R - 1), unique=True, max_size=R))
    lo = RowLayout(np.array(placed, dtype=np.int64), R)
    pos_R = lo.physical(np.arange(R))
    assert np.array_equal(np.sort(pos_R), np.arange(R))  # a permutation
    assert np.array_equal(pos_R[placed], np.arange(len(placed)))  # placed rows first, in their order
    rest = np.setdiff1d(np.arange(R), placed)
    assert np.array_equal(pos_R[rest], len(placed) + np.arange(rest.size))  # then the others, ascending
    assert np.array_equal(lo.logical(pos_R), np.arange(R))
    piece = data.draw(st.integers(1, 64))
    assert np.array_equal(np.concatenate(list(lo.file_order(piece))), lo.logical(np.arange(R)))
    assert all(p.size <= piece for p in lo.file_order(piece))


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        RowLayout(np.array([3, 1, 3]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        RowLayout(np.array([3, 10]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        RowLayout(np.array([-1]), 10)
    with pytest.raises(ValueError, match="places 4 rows"):
        RowLayout(np.arange(4), 3)


def test_co_access_order_puts_frequent_groups_first_and_each_row_once(monkeypatch):
    a = np.array([[1, 2], [5, 6], [5, 6], [7, 2]])
    b = np.array([[5, 6], [7, 2], [9, 9]])
    placed = co_access_order([a, b], 10)
    # (5,6) x3 first; (7,2) x2 next; then (1,2) and (9,9) once each, row 2 already placed
    assert placed[:4].tolist() == [5, 6, 7, 2]
    assert sorted(placed[4:].tolist()) == [1, 9]
    assert np.unique(placed).size == placed.size
    assert np.array_equal(co_access_order([b, a], 10), placed)  # counts, not arrival order
    assert co_access_order([a], 10, max_groups=1).tolist() == [5, 6]
    assert co_access_order([], 10).size == 0
    monkeypatch.setattr(layout, "_MERGE_EVERY", 1)  # counts folded after every piece: same order
    assert np.array_equal(co_access_order([a, b], 10), placed)
    with pytest.raises(ValueError, match="same width"):
        co_access_order([a, np.zeros((1, 3), np.int64)], 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        co_access_order([a + 5], 10)


def _table(R=500, d=8, dtype=torch.float32):
    return torch.randn(R, d, generator=torch.Generator().manual_seed(0)).to(dtype)


def _laid_out(tmp_path, table, placed, name="t.engram", **kw):
    lo = RowLayout(placed, table.shape[0])
    return write_store_with_layout(tmp_path / name, lambda i: table[torch.from_numpy(i)], lo, dim=table.shape[1],
                                   dtype=table.dtype, piece_rows=37, **kw), lo


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_laid_out_store_serves_the_same_rows(tmp_path, io, dtype):
    table = _table(dtype=dtype)
    placed = np.random.default_rng(1).permutation(500)[:120]
    path, lo = _laid_out(tmp_path, table, placed)
    raw = read_header(path)
    assert raw.meta["layout"]["placed"] == 120
    with DiskStore(path, io=io, verify="full") as s:
        assert s.layout == lo
        for seed in range(4):
            rows = torch.from_numpy(np.random.default_rng(seed).integers(0, 500, size=64))
            assert torch.equal(s.gather(rows), table[rows])
            assert torch.equal(s.gather_start(rows).result(), table[rows])
        assert torch.equal(s.gather(torch.arange(500)), table)
        assert torch.equal(s.gather(torch.tensor([], dtype=torch.int64)), table[:0])
        # the file really is permuted: position p holds logical row lo.logical(p)
        first = path.read_bytes()[raw.data_offset:raw.data_offset + s.row_bytes]
        assert first == table[int(placed[0])].view(torch.uint8).numpy().tobytes()
        # checksums sit in file order beside their rows; row_sums() gives them in logical order
        assert s.row_sums().tolist() == row_crcs(table.view(torch.uint8).numpy()).tolist()
        for policy in ("lru", "lfu", "static"):
            prof = np.bincount(placed[:40], minlength=500) if policy == "static" else None
            cache = CachedStore(s, 60 * table.shape[1] * table.element_size(), policy, profile=prof)
            for seed in range(5):
                rows = torch.from_numpy(np.random.default_rng(seed).integers(0, 500, size=90))
                assert torch.equal(cache.gather(rows), table[rows])
                assert torch.equal(cache.gather_start(rows).result(), table[rows])


@pytest.mark.skipif(not native_io.available(), reason="direct I/O unavailable here")
def test_a_group_placed_together_costs_one_direct_read(tmp_path):
    table = _table(R=20000, d=64)  # 256-byte rows: the 8 rows of a group span 2 KiB
    group = np.random.default_rng(2).choice(20000, size=8, replace=False)
    plain = tmp_path / "plain.engram"
    write_store(plain, table)
    laid, _ = _laid_out(tmp_path, table, group)
    for path, reads in ((plain, 8), (laid, 1)):
        with DiskStore(path, io="direct") as s:
            rows = torch.from_numpy(group)
            assert torch.equal(s.gather(rows), table[rows])
            assert s.direct_counts()["reads"] == reads


def test_missing_or_damaged_layout_files_are_clear_errors(tmp_path):
    table = _table()
    path, _ = _laid_out(tmp_path, table, np.arange(100, 0, -1))
    side = tmp_path / read_header(path).meta["layout"]["file"]
    good = side.read_bytes()
    side.write_bytes(good[:-8] + bytes(8))
    with pytest.raises(StoreFormatError, match="layout checksum mismatch"):
        DiskStore(path)
    side.write_bytes(good[:-8])
    with pytest.raises(StoreFormatError, match="not a readable layout file"):
        DiskStore(path)
    side.unlink()
    with pytest.raises(StoreFormatError, match="layout file .* is missing"):
        DiskStore(path)


def test_an_interrupted_rewrite_keeps_the_previous_store_and_its_layout(tmp_path):
    table = _table()
    path, old = _laid_out(tmp_path, table, np.arange(50, 0, -1))
    old_side = read_header(path).meta["layout"]["file"]

    def failing(i):
        if i.min() > 300:
            raise RuntimeError("disk pulled")
        return table[torch.from_numpy(i)]

    with pytest.raises(RuntimeError, match="disk pulled"):
        write_store_with_layout(path, failing, RowLayout(np.arange(200), 500), dim=8, dtype=torch.float32,
                                piece_rows=37)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, old_side])  # no leftovers
    with DiskStore(path) as s:
        assert s.layout == old and torch.equal(s.gather(torch.arange(500)), table)
    path, new = _laid_out(tmp_path, table, np.arange(7))  # a finished rewrite drops the old sidecar
    assert not (tmp_path / old_side).exists()
    with DiskStore(path) as s:
        assert s.layout == new and torch.equal(s.gather(torch.arange(500)), table)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    return tiny.Saved(tmp_path_factory.mktemp("layout"), "float32")


@pytest.mark.parametrize("source", ["model", "model_dir"])
def test_export_with_co_access_layouts_serves_bit_identical_outputs(saved, tmp_path, source, tiny):
    layouts = co_access_layouts(saved.model, saved.profile_batches)
    assert sorted(layouts) == [0, 2] and all(lo.num_placed > 0 for lo in layouts.values())
    for lay, lo in layouts.items():  # the most frequent n-gram group's K head rows open the file
        eng = saved.model.blocks[lay].engram
        K = eng.n_head_per_ngram
        groups = Counter()
        for x in saved.profile_batches:
            g = eng.flat_rows(saved.model.engram_rows(x)[lay]).reshape(-1, eng.max_ngram_size - 1, K)
            groups.update(tuple(r) for r in g.reshape(-1, K).tolist())
        top = max(groups.values())
        assert tuple(lo.placed_P[:K].tolist()) in {k for k, c in groups.items() if c == top}
        assert set(lo.placed_P.tolist()) == {r for k in groups for r in k}  # every profiled row, once
    out = export_tables(saved.model if source == "model" else saved.model_dir, tmp_path / "store", layouts=layouts)
    assert len(list(out.glob("*.npy"))) == 2  # one sidecar per layer, no leftovers
    assert read_header(out / layer_file(0)).meta["layout"]["placed"] == layouts[0].num_placed
    for cache in (0, 2000):
        with open_memory(saved.model_dir, "disk", out, cache_bytes=cache, sync_rows=0) as lm:
            assert torch.equal(lm(saved.idx).logits, saved.logits)
            assert torch.equal(lm.generate(saved.prompt, 8, temperature=0), saved.greedy)
    export_tables(saved.model_dir, out)  # re-export without layouts: old sidecars go
    assert not list(out.glob("*.npy"))
    with open_memory(saved.model_dir, "disk", out) as lm:
        assert torch.equal(lm(tiny.ids()).logits, saved.logits)
