"""Tests for engram.memory.table.MultiHeadTable."""

# Shapes: B batch, T time, H hash heads, d row width.

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.memory import MultiHeadTable, native_gather

SIZES = (5, 7, 11)


def _rows(sizes, *lead, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, s, (*lead, 1), generator=g) for s in sizes]
    return torch.cat(cols, dim=-1)


def _manual(table, rows_BTH):
    """Row by row: head h's id r lives at weight[sum(head_sizes[:h]) + r]."""
    sizes = table.head_sizes.tolist()
    out = torch.empty(*rows_BTH.shape, table.dim, dtype=table.weight.dtype)
    for idx in itertools.product(*[range(n) for n in rows_BTH.shape]):
        h = idx[-1]
        out[idx] = table.weight[sum(sizes[:h]) + int(rows_BTH[idx])]
    return out


def test_offsets_and_properties():
    t = MultiHeadTable(SIZES, 4)
    assert t.offsets.tolist() == [0, 5, 12]
    assert t.offsets.dtype == torch.int64
    assert t.head_sizes.tolist() == list(SIZES)
    assert (t.num_rows, t.num_heads, t.dim) == (23, 3, 4)
    assert t.weight.shape == (23, 4)
    assert t.nbytes == 23 * 4 * 4
    assert "heads=3" in repr(t)
    # Only the weight is checkpointed; offsets are derived from the config.
    assert list(t.state_dict()) == ["weight"]


def test_init_std():
    torch.manual_seed(0)
    t = MultiHeadTable([4001], 64, init_std=0.5)
    assert abs(t.weight.std().item() - 0.5) < 0.01


def test_gather_matches_manual_indexing():
    t = MultiHeadTable(SIZES, 4)
    rows = _rows(SIZES, 2, 3)
    out = t(rows)
    assert out.shape == (2, 3, 3, 4)
    assert torch.equal(out, _manual(t, rows))
    # Any leading shape works, and int32 ids are accepted.
    assert torch.equal(t(rows[0, 0].int()), out[0, 0])


def test_sparse_grad_matches_dense_reference():
    torch.manual_seed(0)
    t = MultiHeadTable(SIZES, 4, sparse=True)
    rows = torch.tensor([[[0, 0, 10], [4, 0, 10]], [[0, 6, 3], [0, 0, 10]]])  # repeats on purpose
    upstream = torch.randn(2, 2, 3, 4)
    (t(rows) * upstream).sum().backward()
    g = t.weight.grad
    assert g.is_sparse

    ref_w = t.weight.detach().clone().requires_grad_(True)
    offsets = torch.tensor([0, 5, 12])
    (ref_w[rows + offsets] * upstream).sum().backward()
    g = g.coalesce()
    touched = sorted(set((rows + offsets).flatten().tolist()))
    assert g.indices()[0].tolist() == touched
    torch.testing.assert_close(g.to_dense(), ref_w.grad)


def test_dense_grad_when_not_sparse():
    t = MultiHeadTable(SIZES, 4, sparse=False)
    t(_rows(SIZES, 2, 3)).sum().backward()
    assert not t.weight.grad.is_sparse


def test_bf16_storage():
    t = MultiHeadTable(SIZES, 4, dtype=torch.bfloat16)
    assert t.weight.dtype == torch.bfloat16
    assert t.nbytes == 23 * 4 * 2
    rows = _rows(SIZES, 2, 3)
    out = t(rows)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _manual(t, rows))
    out.float().sum().backward()
    assert t.weight.grad.is_sparse and t.weight.grad.dtype == torch.bfloat16


@pytest.fixture(params=["native", "index_select"])
def gather_path(request, monkeypatch):
    """Run a test through both gather_into paths (the C kernel, if it builds here, and torch)."""
    if request.param == "native":
        if not native_gather.available():
            pytest.skip(f"native gather unavailable: {native_gather.unavailable_reason()}")
    else:
        monkeypatch.setattr(native_gather, "available", lambda: False)
    return request.param


def test_gather_into_matches_forward_and_reuses_buffers(gather_path):
    t = MultiHeadTable(SIZES, 4)
    out = torch.empty(2, 3, 3, 4)
    ptr = out.data_ptr()
    for seed in range(3):
        rows = _rows(SIZES, 2, 3, seed=seed)
        res = t.gather_into(rows, out)
        assert res is out and out.data_ptr() == ptr
        assert torch.equal(out, t(rows))
        if gather_path == "native":
            assert t._idx_buf is None  # the kernel adds the offsets itself: no index buffer
            continue
        if seed == 0:
            idx_ptr = t._idx_buf.data_ptr()
        assert t._idx_buf.data_ptr() == idx_ptr  # index buffer reused, nothing reallocated
    assert not out.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 3, 8, 32, 64, 128, 256, 257])  # 128/256/512-byte rows and odd ones
def test_gather_into_bit_exact(gather_path, dtype, dim):
    sizes = (97, 5, 1, 131)  # includes a one-row head
    t = MultiHeadTable(sizes, dim, dtype=dtype)
    rows = _rows(sizes, 7, 33, seed=dim)
    rows[0, :5] = rows[0, 0]  # duplicates within a head, across tokens
    rows[1, 1] = torch.tensor(sizes) - 1  # last row of every head
    rows[1, 2] = 0  # first row of every head
    out = torch.full((7, 33, 4, dim), float("nan"), dtype=dtype)
    t.gather_into(rows, out)
    offsets = torch.tensor([sum(sizes[:h]) for h in range(len(sizes))])
    ref = t.weight.detach()[rows + offsets]
    assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_gather_into_non_contiguous_and_int32_rows(gather_path):
    t = MultiHeadTable(SIZES, 4)
    rows = _rows(SIZES, 6, 5)
    ref = t(rows)
    for r in (rows.int(), rows.transpose(0, 1).contiguous().transpose(0, 1)):
        assert torch.equal(t.gather_into(r, torch.empty(6, 5, 3, 4)), ref)


@pytest.mark.skipif(not native_gather.available(), reason="native gather unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("n_tokens", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64, 2048])
def test_native_gather_any_thread_split(monkeypatch, dtype, threads, n_tokens, chunk_rows):
    monkeypatch.setattr(native_gather, "MIN_ROWS_PER_THREAD", 1)  # split even tiny inputs
    monkeypatch.setattr(native_gather, "CHUNK_ROWS", chunk_rows)
    sizes = (13, 2, 29)
    t = MultiHeadTable(sizes, 64, dtype=dtype)  # 256 (fp32) or 128 (bf16) bytes per row
    g = torch.Generator().manual_seed(threads * 1000 + n_tokens)
    rows = torch.stack([torch.randint(0, s, (n_tokens,), generator=g) for s in sizes], dim=-1)
    out = torch.empty(n_tokens * len(sizes), 64, dtype=dtype)
    w = t.weight.detach()
    assert native_gather.gather(w, rows, t.offsets, t.head_sizes, out, threads=threads) == -1
    assert torch.equal(out.view(n_tokens, len(sizes), 64), w[rows + t.offsets])


@pytest.mark.skipif(not native_gather.available(), reason="native gather unavailable")
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_native_gather_reports_out_of_range_ids(monkeypatch, threads):
    monkeypatch.setattr(native_gather, "MIN_ROWS_PER_THREAD", 1)
    monkeypatch.setattr(native_gather, "CHUNK_ROWS", 16)
    t = MultiHeadTable(SIZES, 4)
    w, out = t.weight.detach(), torch.empty(60 * 3, 4)
    for pos, value in ((0, 5), (100, 7), (179, 11), (91, -1), (150, 2**62)):
        rows = _rows(SIZES, 60)
        rows.view(-1)[pos] = value  # pos % 3 is the head; each value is just past its head
        assert native_gather.gather(w, rows, t.offsets, t.head_sizes, out, threads=threads) == pos
    # gather_into turns it into check_rows' error even with validate=False.
    with pytest.raises(ValueError, match=r"head 1: got 7, allowed range is \[0, 7\)"):
        t.gather_into(torch.tensor([[0, 7, 0]]), torch.empty(1, 3, 4))


def test_gather_into_rejects_bad_out():
    t = MultiHeadTable(SIZES, 4)
    rows = _rows(SIZES, 2, 3)
    with pytest.raises(ValueError, match="out must have shape"):
        t.gather_into(rows, torch.empty(2, 3, 3, 5))
    with pytest.raises(ValueError, match="table dtype"):
        t.gather_into(rows, torch.empty(2, 3, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        t.gather_into(rows, torch.empty(4, 3, 3, 2).transpose(0, 3))
    with pytest.raises(ValueError, match="head 1"):
        t.gather_into(torch.tensor([[0, 7, 0]]), torch.empty(1, 3, 4), validate=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(head_sizes=[], dim=4), "non-empty"),
        (dict(head_sizes=[5, 0, 3], dim=4), r"head_sizes\[1\] must be >= 1, got 0"),
        (dict(head_sizes=[5], dim=0), "dim must be >= 1, got 0"),
        (dict(head_sizes=[5], dim=4, dtype=torch.float16), "torch.float16"),
        (dict(head_sizes=[5], dim=4, init_std=-1.0), "init_std"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadTable(**kwargs)


def test_bad_rows():
    t = MultiHeadTable(SIZES, 4)
    with pytest.raises(TypeError, match=r"row ids must be an integer tensor, got torch.float32"):
        t(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="torch.bool"):
        t(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"last dimension H=3.*\(2, 4\)"):
        t(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"head 2: got 11, allowed range is \[0, 11\)"):
        t(torch.tensor([[0, 0, 3], [0, 6, 11]]))
    with pytest.raises(ValueError, match=r"head 0: got -1, allowed range is \[0, 5\)"):
        t(torch.tensor([[-1, 0, 3]], dtype=torch.int32))
    # The check can be skipped for trusted ids; an id valid for the flat table then reads
    # into the next head, which is exactly why validation is on by default.
    assert torch.equal(t(torch.tensor([[5, 0, 0]]), validate=False)[0, 0], t.weight[5])


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 13), min_size=1, max_size=5),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    dim=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_gather_equals_manual(sizes, lead, dim, seed):
    t = MultiHeadTable(sizes, dim)
    rows = _rows(sizes, *lead, seed=seed)
    out = t(rows)
    offsets = torch.tensor([sum(sizes[:h]) for h in range(len(sizes))])
    assert torch.equal(out, t.weight[rows + offsets])
    buf = torch.empty_like(out)
    assert torch.equal(t.gather_into(rows, buf), out)
