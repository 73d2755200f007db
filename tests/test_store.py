"""Row stores: RAM and disk gathers are bit-identical to indexing the table; the file format fails loudly."""

# Shapes: N requested row ids, R rows in the table, d row width.

import gc
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import warnings
import weakref
from types import SimpleNamespace

import google_crc32c
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.store import format as disk_format
from engram.store.base import DiskStore, RamStore, StoreFormatError, TierStats, write_store
from engram.store.format import ALIGN, MAGIC, StoreChecksumError, read_header

R, D = 203, 6
RAW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = list(RAW)


def random_bits_table(dtype, rows=R, dim=D, seed=0):
    """A table of arbitrary bit patterns: NaNs with payloads, infinities, -0.0 and subnormals included."""
    raw = RAW[dtype]
    info = torch.iinfo(raw)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max, (rows, dim), dtype=raw, generator=g).view(dtype)


def bits(t):
    return t.view(RAW[t.dtype])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{dtype: (table, RamStore, DiskStore)}, the disk file written in uneven pieces."""
    out = {}
    d = tmp_path_factory.mktemp("stores")
    for dtype in DTYPES:
        table = random_bits_table(dtype)
        pieces = (table[i : i + 11] for i in range(0, R, 11))
        path = write_store(d / f"{dtype}.rows", pieces, num_rows=R, dim=D, dtype=dtype)
        out[dtype] = (table, RamStore(table), DiskStore.open(path, verify="full"))
    yield out
    for _, ram, disk in out.values():
        ram.close()
        disk.close()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.lists(st.integers(0, R - 1), max_size=300), st.booleans())
def test_gather_is_bit_identical_to_indexing(stores, dtype, ids, use_out):
    table, ram, disk = stores[dtype]
    rows_N = torch.tensor(ids, dtype=torch.int64)
    want = bits(table)[rows_N]
    for store in (ram, disk):
        out = torch.full((len(ids), D), 7.0, dtype=dtype) if use_out else None
        got = store.gather(rows_N, out)
        assert got.shape == (len(ids), D) and got.dtype == dtype
        assert torch.equal(bits(got), want)
        if use_out:
            assert got is out


def test_gather_accepts_numpy_and_narrow_ints(stores):
    table, ram, disk = stores[torch.bfloat16]
    ids = np.array([5, 0, 5, R - 1], dtype=np.int32)
    want = bits(table)[torch.from_numpy(ids)]
    ids.setflags(write=False)
    for store in (ram, disk):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # read-only id arrays must not trip torch's non-writable warning
            assert torch.equal(bits(store.gather(ids)), want)
            assert torch.equal(bits(store.gather(ids.astype(np.int64))), want)
        assert torch.equal(bits(store.gather(torch.tensor([5, 0, 5, R - 1], dtype=torch.int16))), want)
        assert store.gather(torch.empty(0, dtype=torch.int64)).shape == (0, D)


@pytest.mark.parametrize("bad, msg", [
    (torch.tensor([0.0, 1.0]), "integer dtype"),
    (torch.tensor([True]), "integer dtype"),
    (np.array([1.5]), "integer dtype"),
    (torch.zeros(2, 3, dtype=torch.int64), "1-D"),
    (torch.tensor([0, R]), f"row id {R} at position 1 is out of range"),
    (np.array([3, -1]), "row id -1 at position 1 is out of range"),
    ([1, 2], "torch.Tensor or numpy array"),
])
def test_bad_row_ids_raise_clear_errors(stores, bad, msg):
    _, ram, disk = stores[torch.float32]
    for store in (ram, disk):
        with pytest.raises(ValueError, match=msg):
            store.gather(bad)


def test_bad_out_raises(stores):
    _, ram, disk = stores[torch.float32]
    rows = torch.tensor([1, 2])
    for store in (ram, disk):
        for out in (torch.empty(2, D + 1), torch.empty(2, D, dtype=torch.bfloat16), torch.empty(D, 2).t()):
            with pytest.raises(ValueError, match="out_Nd"):
                store.gather(rows, out)


def test_stats_count_requested_unique_and_bytes(tmp_path):
    table = torch.randn(50, 4)
    with RamStore(table) as ram, DiskStore.open(write_store(tmp_path / "s", table)) as disk:
        for store in (ram, disk):
            store.gather(torch.tensor([1, 1, 2, 5, 5, 5]))
            store.gather(torch.tensor([7]))
        rb = 4 * 4
        assert disk.stats() == {"disk": {"requested": 7, "unique": 4, "hits": 4, "misses": 0, "bytes_read": 4 * rb}}
        assert ram.stats() == {"ram": {"requested": 7, "unique": 4, "hits": 4, "misses": 0, "bytes_read": 7 * rb}}
        disk.reset_stats()
        assert disk.stats()["disk"] == TierStats().as_dict()
    assert RamStore(table, count_unique=False).gather(torch.tensor([3, 3])) is not None


def test_ram_store_wraps_without_copy_and_pins_only_with_cuda():
    table = torch.nn.Parameter(torch.randn(10, 3))
    store = RamStore(table, pin=True)
    assert store.pinned == torch.cuda.is_available()
    if not store.pinned:
        assert store.table.data_ptr() == table.data_ptr()
    with pytest.raises(ValueError, match="dtype"):
        RamStore(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_rows, dim"):
        RamStore(torch.zeros(3))


def test_layout_rows_are_contiguous_at_aligned_offset(tmp_path):
    table = random_bits_table(torch.bfloat16, rows=30, dim=5)
    path = write_store(tmp_path / "t", table, meta={"layer": 3, "head_sizes": [11, 19]})
    h = read_header(path)
    assert (h.num_rows, h.dim, h.dtype, h.layer) == (30, 5, torch.bfloat16, 3)
    assert h.meta == {"layer": 3, "head_sizes": [11, 19]}
    assert h.data_offset % ALIGN == 0 and path.stat().st_size == h.data_offset + 30 * 10
    assert h.sums_offset % ALIGN == 0 and h.sums_offset + 4 * 30 <= h.data_offset
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    r = 17  # one row is one contiguous run of bytes
    assert raw[h.data_offset + r * 10 : h.data_offset + (r + 1) * 10] == bits(table)[r].numpy().tobytes()
    # beside it, in the checksum array, that row's CRC32C
    want = google_crc32c.value(bits(table)[r].numpy().tobytes())
    assert struct.unpack_from("<I", raw, h.sums_offset + 4 * r)[0] == want


def test_streaming_writer_checksums_every_row_of_uneven_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_format, "_WRITEBACK_BYTES", 64)  # exercise the periodic sync/drop path too
    sizes, refs = [5, 13, 0, 1, 30, 2, 9], []

    def pieces():
        for i, n in enumerate(sizes):
            if i:
                gc.collect()
                assert refs[i - 1]() is None, "the writer kept a reference to an earlier piece"
            t = torch.arange(sum(sizes[:i]) * 3, sum(sizes[: i + 1]) * 3, dtype=torch.float32).reshape(n, 3)
            refs.append(weakref.ref(t))
            yield t
            del t

    total = sum(sizes)
    path = write_store(tmp_path / "c", pieces(), num_rows=total, dim=3, dtype="float32")
    with DiskStore.open(path, verify="full", expect={"num_rows": total, "dim": 3, "dtype": torch.float32}) as s:
        want = [google_crc32c.value(np.arange(3 * r, 3 * r + 3, dtype=np.float32).tobytes()) for r in range(total)]
        assert s.row_sums().tolist() == want
        assert torch.equal(s.gather(torch.arange(total)), torch.arange(total * 3.0).reshape(total, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("sizes, msg", [([4, 4], "hold 8 rows, expected num_rows=10"),
                                        ([6, 6], "more than num_rows=10")])
def test_wrong_row_count_leaves_nothing(tmp_path, sizes, msg):
    pieces = (torch.zeros(n, 2) for n in sizes)
    with pytest.raises(ValueError, match=msg):
        write_store(tmp_path / "w", pieces, num_rows=10, dim=2, dtype=torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_wrong_piece_shape_or_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"piece 1: expected shape \[n, 2\]"):
        write_store(tmp_path / "w", [torch.zeros(2, 2), torch.zeros(2, 3)], num_rows=4, dim=2, dtype="float32")
    with pytest.raises(ValueError, match="never casts"):
        write_store(tmp_path / "w", [torch.zeros(2, 2)], num_rows=2, dim=2, dtype="bfloat16")
    with pytest.raises(ValueError, match="required"):
        write_store(tmp_path / "w", [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        write_store(tmp_path / "w", torch.zeros(2, 2), meta={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_format.shutil, "disk_usage", lambda _: SimpleNamespace(free=100))
    with pytest.raises(OSError, match=r"not enough disk space.*needs 8\d+ bytes, 100 free"):
        write_store(tmp_path / "w", torch.zeros(2, 2))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good_file(tmp_path):
    table = torch.randn(100, 8)
    return write_store(tmp_path / "g.rows", table), table


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_flipped_data_byte_is_caught_by_reads_and_full_verify(good_file):
    path, table = good_file
    h = read_header(path)
    target = h.data_offset + 43 * h.row_bytes + 5
    _patch(path, target, bytes([path.read_bytes()[target] ^ 0x01]))
    with DiskStore.open(path) as s:  # header-only verify does not read the data; reads check what they read
        assert torch.equal(s.gather(torch.tensor([0, 42, 44, 99])), table[[0, 42, 44, 99]])
        with pytest.raises(StoreChecksumError, match=r"checksum mismatch in a store of no recorded layer, row 43 "):
            s.gather(torch.tensor([0, 43]))
        assert s.scan()[0] == 1 and s.scan()[1].tolist() == [43]
    with pytest.raises(StoreChecksumError, match=rf"{path.name}.*row 43 \(1 of 100 rows read\)"):
        DiskStore.open(path, verify="full")


@pytest.mark.parametrize("kind, msg", [
    ("truncate", "file is truncated: expected"),
    ("append", "longer than its header says"),
    ("tiny", "file is truncated: 10 bytes"),
    ("empty", "truncated: 0 bytes"),
    ("magic", "bad magic"),
    ("version", "unsupported format version 9"),
    ("version1", "version 1 has no per-row checksums.*export the store again"),
    ("header_byte", "header checksum mismatch"),
    ("lengths", "implausible JSON length"),
    ("sums_crc", "header checksum mismatch"),
    ("sums", "row checksum array is corrupted"),
])
def test_damaged_files_fail_to_open_with_the_reason(good_file, kind, msg):
    path, _ = good_file
    size = path.stat().st_size
    if kind == "truncate":
        os.truncate(path, size - 1)
    elif kind == "append":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif kind in ("tiny", "empty"):
        os.truncate(path, 10 if kind == "tiny" else 0)
    elif kind == "magic":
        _patch(path, 0, b"NOTASTOR")
    elif kind in ("version", "version1"):
        _patch(path, 8, struct.pack("<I", 9 if kind == "version" else 1))
    elif kind == "sums_crc":
        _patch(path, 16, b"\xff")
    elif kind == "sums":
        _patch(path, read_header(path).sums_offset + 4 * 7, b"\x00\x01")
    elif kind == "header_byte":
        _patch(path, 30, b"#")
    elif kind == "lengths":
        _patch(path, 12, struct.pack("<I", 1 << 30))
    with pytest.raises(StoreFormatError, match=msg) as e:
        DiskStore.open(path)
    assert str(path) in str(e.value)


def test_expect_mismatch_lists_every_difference(good_file):
    path, _ = good_file
    expect = {"num_rows": 100, "dim": 16, "dtype": torch.bfloat16, "meta": {"layer": 1}}
    with pytest.raises(StoreFormatError, match=r"dim is 8, expected 16; dtype is float32, expected bfloat16; "
                                               r"meta\['layer'\] is '<missing>', expected 1"):
        DiskStore.open(path, expect=expect)
    with pytest.raises(ValueError, match="unknown keys"):
        DiskStore.open(path, expect={"rows": 100})
    DiskStore.open(path, expect={"num_rows": 100, "dim": 8, "dtype": "float32"}).close()


def test_interrupted_iterator_keeps_existing_file(good_file):
    path, table = good_file
    before = path.read_bytes()

    def pieces():
        yield torch.ones(10, 8)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_store(path, pieces(), num_rows=100, dim=8, dtype=torch.float32)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]
    with DiskStore.open(path, verify="full") as s:
        assert torch.equal(s.gather(torch.arange(100)), table)


_KILLED_WRITER = """
import sys, time, torch
from engram.store.base import write_store
def pieces():
    for i in range(100):
        if i == 3:
            print("ready", flush=True)
            time.sleep(120)
        yield torch.full((10, 8), float(i))
write_store(sys.argv[1], pieces(), num_rows=1000, dim=8, dtype=torch.float32)
"""


def test_sigkilled_writer_leaves_no_valid_file_and_keeps_the_old_one(good_file):
    path, table = good_file
    before = path.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == b"ready", "writer subprocess did not start"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stdout.close()
    tmp = path.with_name(f"{path.name}.tmp-{proc.pid}")
    assert tmp.exists() and tmp.stat().st_size > 0  # the torn write is there, under its temp name only
    with pytest.raises(StoreFormatError, match="bad magic"):
        DiskStore.open(tmp)
    assert path.read_bytes() == before
    with DiskStore.open(path, verify="full") as s:
        assert torch.equal(s.gather(torch.arange(100)), table)


def test_drop_page_cache_and_reads_stay_correct(good_file):
    path, table = good_file
    with DiskStore.open(path) as s:
        s.gather(torch.arange(100))
        warm = s.page_cache_bytes()
        s.drop_page_cache()
        cold = s.page_cache_bytes()
        if warm is not None:
            assert cold <= warm
        assert torch.equal(s.gather(torch.tensor([99, 0, 42])), table[[99, 0, 42]])


def test_closed_store_is_idempotent_and_refuses_gathers(good_file):
    path, _ = good_file
    s = DiskStore.open(path)
    s.close()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.gather(torch.tensor([1]))


def test_concurrent_gathers_are_correct(stores):
    table, _, disk = stores[torch.float32]
    disk.reset_stats()
    errors, n_threads, n_calls = [], 4, 40

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(n_calls):
                rows = torch.randint(0, R, (64,), generator=g)
                if not torch.equal(bits(disk.gather(rows)), bits(table)[rows]):
                    errors.append(seed)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert disk.stats()["disk"]["requested"] == n_threads * n_calls * 64
