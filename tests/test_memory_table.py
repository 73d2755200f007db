"""Tests for engram.memory.table.MultiHeadTable."""

# Shapes: B batch, T time, H hash heads, d row width.

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.memory import MultiHeadTable

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


def test_gather_into_matches_forward_and_reuses_buffers():
    t = MultiHeadTable(SIZES, 4)
    out = torch.empty(2, 3, 3, 4)
    ptr = out.data_ptr()
    for seed in range(3):
        rows = _rows(SIZES, 2, 3, seed=seed)
        res = t.gather_into(rows, out)
        assert res is out and out.data_ptr() == ptr
        assert torch.equal(out, t(rows))
        if seed == 0:
            idx_ptr = t._idx_buf.data_ptr()
        assert t._idx_buf.data_ptr() == idx_ptr  # index buffer reused, nothing reallocated
    assert not out.requires_grad


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
