"""Tests for engram.optim: SparseRowAdam, the sparse-aware clip_grad_norm_ and TorchSparseAdam."""

# Shapes: R table rows, d row width, U touched rows.

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from engram.optim import SparseRowAdam, clip_grad_norm_
from engram.optim.sparse_adam import coalesce_, sparse_rows

R, D = 40, 4
CONFIGS = [
    dict(bias_correction=bc, catch_up=cu, rowwise=rw)
    for bc in ("row", "global", "none") for cu in ("ahead", "deferred", "none") for rw in (False, True)
]


def _ids(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def _sparse_grad(p, idx, seed, dup=True):
    """Backward through F.embedding(sparse=True): an uncoalesced grad (duplicates when idx repeats)."""
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(idx.shape[0], *p.shape[1:], generator=g)
    (F.embedding(idx, p, sparse=True).float() * tgt).sum().backward()


def _touch(step, n=6, seed=0):
    g = torch.Generator().manual_seed(1000 + step + seed)
    return torch.randint(0, R, (n,), generator=g)


def _table(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(R, D, generator=g).to(dtype))


# ------------------------------------------------------------------ equality with dense Adam
@pytest.mark.parametrize("catch_up", ["none", "deferred"])
@pytest.mark.parametrize("bias_correction", ["row", "global"])
@pytest.mark.parametrize("betas,wd", [((0.9, 0.95), 0.0), ((0.9, 0.999), 0.0), ((0.8, 0.99), 0.1)])
def test_every_row_every_step_equals_torch_adam(catch_up, bias_correction, betas, wd):
    a, b = _table(), _table()
    oa = SparseRowAdam([a], lr=1e-2, betas=betas, weight_decay=wd, bias_correction=bias_correction,
                       catch_up=catch_up)
    ob = torch.optim.AdamW([b], lr=1e-2, betas=betas, weight_decay=wd, foreach=False)
    for s in range(25):
        idx = torch.cat([torch.randperm(R), _touch(s)])  # every row, some twice
        _sparse_grad(a, idx, s)
        b.grad = coalesce_(a).to_dense()
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
        assert torch.equal(a, b), f"step {s}: max diff {(a - b).abs().max()}"
    st = oa.state[a]
    assert torch.equal(st["exp_avg"], ob.state[b]["exp_avg"])
    assert torch.equal(st["exp_avg_sq"], ob.state[b]["exp_avg_sq"])


def test_default_config_equals_torch_adam_up_to_the_settled_tail():
    """With every row touched every step the default ("ahead") differs from Adam only by the tail."""
    a, b = _table(), _table()
    oa = SparseRowAdam([a], lr=1e-2, betas=(0.9, 0.95))
    ob = torch.optim.Adam([b], lr=1e-2, betas=(0.9, 0.95))
    for s in range(10):
        _sparse_grad(a, torch.randperm(R), s)
        b.grad = a.grad.to_dense()
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
    _assert_settled(a, b, ob, lr=1e-2)


def _assert_settled(a, b, ob, lr, atol=2e-5):
    """`a` equals where dense Adam (`b`, `ob`) ends up if it gets only zero gradients from now on."""
    c = torch.nn.Parameter(b.detach().clone())
    oc = torch.optim.Adam([c], lr=lr, betas=ob.param_groups[0]["betas"])
    oc.load_state_dict(ob.state_dict())
    for _ in range(1500):
        c.grad = torch.zeros_like(c)
        oc.step()
    torch.testing.assert_close(a.detach(), c.detach(), atol=atol, rtol=0)


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
@pytest.mark.parametrize("bias_correction", ["global", "row"])
def test_deferred_catch_up_replays_dense_adam_on_skipped_steps(betas, bias_correction):
    """Partially touched rows: deferred catch-up == dense Adam, after every row's last catch-up."""
    a, b = _table(), _table()
    oa = SparseRowAdam([a], lr=1e-2, betas=betas, bias_correction=bias_correction, catch_up="deferred")
    ob = torch.optim.Adam([b], lr=1e-2, betas=betas)
    for s in range(200):
        # "row" == "global" when every row's clock starts at step 1, so touch all rows first.
        idx = torch.arange(R) if s in (0, 199) else _touch(s, n=4)
        _sparse_grad(a, idx, s)
        b.grad = coalesce_(a).to_dense()
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
    assert (b.detach() - _table()).abs().max() > 0.1  # rows really moved
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(oa.state[a]["exp_avg"], ob.state[b]["exp_avg"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(oa.state[a]["exp_avg_sq"], ob.state[b]["exp_avg_sq"], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
@pytest.mark.parametrize("bias_correction", ["global", "row"])
def test_ahead_sits_where_dense_adam_settles(betas, bias_correction):
    a, b = _table(), _table()
    oa = SparseRowAdam([a], lr=1e-2, betas=betas, bias_correction=bias_correction, catch_up="ahead")
    ob = torch.optim.Adam([b], lr=1e-2, betas=betas)
    for s in range(80):
        idx = torch.arange(R) if s == 0 else _touch(s, n=4)
        _sparse_grad(a, idx, s)
        b.grad = coalesce_(a).to_dense()
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
    assert (a - b).abs().max() > 1e-2  # the tail is real
    _assert_settled(a, b, ob, lr=1e-2)


@pytest.mark.parametrize("catch_up", ["deferred", "ahead"])
def test_catch_up_without_bias_correction_matches_a_dense_reference(catch_up):
    """bias_correction="none": plain EMA Adam, written densely here, with every skipped step taken."""
    lr, b1, b2, eps, steps = 1e-2, 0.9, 0.95, 1e-8, 60
    a = _table()
    opt = SparseRowAdam([a], lr=lr, betas=(b1, b2), eps=eps, bias_correction="none", catch_up=catch_up)
    w, m, v = _table().detach().double(), torch.zeros(R, D, dtype=torch.float64), torch.zeros(R, D, dtype=torch.float64)
    for s in range(steps + (300 if catch_up == "ahead" else 0)):
        if s < steps:
            idx = torch.arange(R) if s == steps - 1 and catch_up == "deferred" else _touch(s, n=4)
            _sparse_grad(a, idx, s)
            g = a.grad.coalesce().to_dense().double()
            opt.step()
            opt.zero_grad()
        else:  # "ahead" == the dense run continued with zero gradients until it settles
            g = torch.zeros_like(w)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * m / (v.sqrt() + eps)
    torch.testing.assert_close(a.detach().double(), w, atol=2e-5, rtol=0)


def test_lazy_global_matches_torch_sparse_adam_closely():
    """catch_up="none", bias_correction="global" is torch's SparseAdam (eps placement aside)."""
    a, b = _table(), _table()
    oa = SparseRowAdam([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-12, bias_correction="global", catch_up="none")
    ob = torch.optim.SparseAdam([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-12)
    for s in range(30):
        idx = _touch(s)
        _sparse_grad(a, idx, s)
        _sparse_grad(b, idx, s)
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ sparsity
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_untouched_rows_and_their_state_do_not_change(cfg):
    p = _table()
    opt = SparseRowAdam([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **cfg)
    for s in range(5):
        _sparse_grad(p, _touch(s), s)
        opt.step()
        opt.zero_grad()
    before_w = p.detach().clone()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    idx = torch.tensor([3, 7, 7, 11])
    _sparse_grad(p, idx, 99)
    opt.step()
    touched = torch.zeros(R, dtype=torch.bool)
    touched[idx] = True
    assert torch.equal(p.detach()[~touched], before_w[~touched])
    assert not torch.equal(p.detach()[touched], before_w[touched])
    for k, v in opt.state[p].items():
        if k == "step":
            assert int(v) == int(before[k]) + 1
        else:
            assert torch.equal(v[~touched], before[k][~touched]), k
            assert v.dtype == (torch.float32 if v.is_floating_point() else torch.int32)


def test_state_layout():
    p = _table()
    opt = SparseRowAdam([p], lr=1e-2, rowwise=True, bias_correction="row", catch_up="ahead")
    _sparse_grad(p, _touch(0), 0)
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].shape == (R, D) and st["exp_avg_sq"].shape == (R,)
    assert st["row_step"].dtype == torch.int32 and st["last_step"].dtype == torch.int32
    opt2 = SparseRowAdam([q := _table()], lr=1e-2, bias_correction="global", catch_up="none")
    _sparse_grad(q, _touch(0), 0)
    opt2.step()
    assert set(opt2.state[q]) == {"step", "exp_avg", "exp_avg_sq"}


def test_per_row_step_counts():
    p = _table()
    lazy = SparseRowAdam([p], lr=1e-2, catch_up="none", bias_correction="row")
    q = _table()
    ahead = SparseRowAdam([q], lr=1e-2, catch_up="ahead", bias_correction="row")
    plan = {1: [0, 1], 2: [1], 3: [], 4: [1, 2], 5: [0]}
    for rows in plan.values():
        for t, o in ((p, lazy), (q, ahead)):
            t.grad = torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.int64), torch.ones(len(rows), D),
                                             (R, D))
            o.step()
    # lazy: touches; catch-up: age since the first touch (skipped steps count); last_step: last touch.
    assert lazy.state[p]["row_step"][:4].tolist() == [2, 3, 1, 0]
    assert ahead.state[q]["row_step"][:4].tolist() == [5, 4, 1, 0]
    assert ahead.state[q]["last_step"][:4].tolist() == [5, 4, 4, 0]
    assert int(ahead.state[q]["step"]) == 5


def test_first_touch_is_bias_corrected_per_row():
    """A row first touched at step 50 takes an lr-sized first step (row), not (1-b1)/sqrt(1-b2) lr (global)."""
    lr, b1, b2 = 1e-2, 0.9, 0.999
    out = {}
    for bc in ("row", "global"):
        p = _table()
        opt = SparseRowAdam([p], lr=lr, betas=(b1, b2), eps=1e-12, bias_correction=bc, catch_up="none")
        for _ in range(49):
            p.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, D), (R, D))
            opt.step()
        w = p.detach()[5].clone()
        p.grad = torch.sparse_coo_tensor(torch.tensor([[5]]), torch.ones(1, D), (R, D))
        opt.step()
        out[bc] = float((w - p.detach()[5]).mean())
    assert out["row"] == pytest.approx(lr, rel=1e-5)
    bc1, bc2 = 1 - b1**50, 1 - b2**50
    assert out["global"] == pytest.approx(lr * (1 - b1) / bc1 / ((1 - b2) ** 0.5 / bc2**0.5), rel=1e-5)


def test_duplicates_in_sparse_grad_are_summed():
    a, b = _table(), _table()
    oa, ob = SparseRowAdam([a], lr=1e-2), SparseRowAdam([b], lr=1e-2)
    idx = torch.tensor([[2, 5, 2, 2, 9]])
    vals = torch.randn(5, D)
    a.grad = torch.sparse_coo_tensor(idx, vals, (R, D))
    assert not a.grad.is_coalesced()
    summed = torch.zeros(R, D).index_add_(0, idx[0], vals)
    rows = torch.tensor([2, 5, 9])
    b.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), summed[rows], (R, D)).coalesce()
    got_rows, got_vals = sparse_rows(a.grad)
    assert got_rows.tolist() == [2, 5, 9]
    torch.testing.assert_close(got_vals, summed[rows])
    oa.step()
    ob.step()
    assert torch.equal(a, b)
    assert oa.state[a]["row_step"].tolist().count(1) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coalesce_matches_torch_coalesce(dtype):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 1000, (5000,), generator=g)
    vals = torch.randn(5000, 3, 2, generator=g).to(dtype)
    p = torch.nn.Parameter(torch.zeros(1000, 3, 2, dtype=dtype))
    p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, (1000, 3, 2))
    ref = p.grad.float().coalesce()
    got = coalesce_(p)
    assert got is p.grad and got.is_coalesced() and got.dtype == dtype and got.shape == (1000, 3, 2)
    assert torch.equal(got._indices(), ref._indices())
    tol = dict(atol=0.05, rtol=0.01) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got._values().float(), ref._values(), **tol)
    assert coalesce_(p) is got  # already coalesced: untouched


@pytest.mark.parametrize("catch_up", ["ahead", "none"])
def test_dense_grad_updates_rows_with_nonzero_grad(catch_up):
    a, b = _table(), _table()
    oa = SparseRowAdam([a], lr=1e-2, catch_up=catch_up)
    ob = SparseRowAdam([b], lr=1e-2, catch_up=catch_up)
    for s in range(4):
        _sparse_grad(a, _touch(s), s)
        b.grad = coalesce_(a).to_dense()
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
    assert torch.equal(a, b)
    for k in oa.state[a]:
        assert torch.equal(oa.state[a][k], ob.state[b][k])


def test_empty_grad_counts_a_step_only():
    p = _table()
    opt = SparseRowAdam([p], lr=1e-2)
    w = p.detach().clone()
    p.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, D), (R, D))
    opt.step()
    assert torch.equal(p.detach(), w) and int(opt.state[p]["step"]) == 1


class _FullTableSpy(TorchDispatchMode):
    """Records every aten op that reads or writes a dense tensor with the table's row count."""

    ALLOWED = {"index_select", "index_copy_", "index_copy", "index_fill_", "index_fill", "view", "alias", "detach",
               "_reshape_alias", "index_add_", "index_put_", "_index_put_impl_", "index"}

    def __init__(self, rows):
        super().__init__()
        self.rows, self.bad, self.seen = rows, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        big = [t for t in flat if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dim() >= 1
               and t.shape[0] >= self.rows]
        if big:
            self.seen.append(name)
            if name not in self.ALLOWED:
                self.bad.append((name, [tuple(t.shape) for t in big]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_step_never_touches_the_whole_table(cfg):
    """Step time independent of table size: after the state exists, only index ops see full-size tensors."""
    rows = 100_003
    p = torch.nn.Parameter(torch.randn(rows, 8))
    opt = SparseRowAdam([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, native=False, **cfg)
    idx = torch.randint(0, rows, (64,))
    _sparse_grad(p, idx, 0)
    opt.step()  # allocates the state: the only O(rows) work
    opt.zero_grad()
    _sparse_grad(p, torch.cat([idx[:10], torch.randint(0, rows, (50,))]), 1)
    with _FullTableSpy(rows) as spy:
        opt.step()
    assert spy.bad == [], spy.bad
    assert "index_select" in spy.seen and "index_copy_" in spy.seen


def test_clip_grad_norm_never_touches_the_whole_table():
    rows = 100_003
    p = torch.nn.Parameter(torch.randn(rows, 8))
    _sparse_grad(p, torch.randint(0, rows, (64,)), 0)
    with _FullTableSpy(rows) as spy:
        clip_grad_norm_([p], 0.1)
    assert spy.bad == [], spy.bad


# ------------------------------------------------------------------ schedules, dtypes, checkpoints
def test_lr_scheduler_drives_the_step():
    p, q = _table(), _table()
    o1 = SparseRowAdam([p], lr=1e-2, catch_up="none")
    o2 = SparseRowAdam([q], lr=2e-2, catch_up="none")
    sched = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 0.5)
    assert o2.param_groups[0]["lr"] == pytest.approx(1e-2)
    for s in range(3):
        for t, o in ((p, o1), (q, o2)):
            _sparse_grad(t, _touch(s), s)
            o.step()
            o.zero_grad()
        sched.step()
    assert torch.equal(p, q)


def _run(p, opt, steps, start=0):
    for s in range(start, start + steps):
        _sparse_grad(p, _touch(s, n=8), s)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(), dict(rowwise=True, catch_up="deferred"),
                                 dict(bias_correction="global", catch_up="none"),
                                 dict(stochastic_rounding=True)], ids=str)
def test_state_dict_round_trip_is_bit_exact(dtype, cfg):
    p = _table(dtype)
    opt = SparseRowAdam([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, **cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    for s in range(6):
        _run(p, opt, 1, start=s)
        sched.step()
    buf = io.BytesIO()
    torch.save({"w": p.detach().clone(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    for s in range(6, 12):
        _run(p, opt, 1, start=s)
        sched.step()

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    q = torch.nn.Parameter(ck["w"].clone())
    opt2 = SparseRowAdam([q], lr=123.0)  # hyper-parameters come from the state dict
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.7)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.state[q]["exp_avg"].dtype == torch.float32  # not cast to the table's dtype
    for s in range(6, 12):
        _run(q, opt2, 1, start=s)
        sched2.step()
    assert torch.equal(p, q)
    for k, v in opt.state[p].items():
        assert torch.equal(v, opt2.state[q][k]), k
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_is_a_copy():
    p = _table()
    opt = SparseRowAdam([p], lr=1e-2)
    _run(p, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = SparseRowAdam([q := _table()], lr=1e-2)
    opt2.load_state_dict(sd)
    opt2.state[q]["exp_avg"].add_(1.0)
    assert not torch.equal(opt2.state[q]["exp_avg"], sd["state"][0]["exp_avg"])


@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_bf16_table(stochastic_rounding):
    a, b = _table(torch.float32), _table(torch.bfloat16)
    oa = SparseRowAdam([a], lr=1e-2, betas=(0.9, 0.95))
    ob = SparseRowAdam([b], lr=1e-2, betas=(0.9, 0.95), stochastic_rounding=stochastic_rounding)
    for s in range(20):
        idx = _touch(s)
        _sparse_grad(a, idx, s)
        _sparse_grad(b, idx, s)
        assert b.grad.dtype == torch.bfloat16
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()
    assert b.dtype == torch.bfloat16
    assert all(v.dtype in (torch.float32, torch.int32, torch.int64) for v in ob.state[b].values())
    # Same trajectory up to bf16 storage (grads are bf16 too, so moments differ slightly).
    torch.testing.assert_close(b.detach().float(), a.detach(), atol=0.05, rtol=0.02)


def test_stochastic_rounding_keeps_small_updates_and_is_deterministic():
    """Updates below half a bf16 ulp vanish with round-to-nearest; stochastic rounding keeps them on average."""
    rows = 2000
    results = {}
    for sr in (False, True, True):
        p = torch.nn.Parameter(torch.ones(rows, 8, dtype=torch.bfloat16))
        opt = SparseRowAdam([p], lr=1e-4, catch_up="none", stochastic_rounding=sr)  # ulp(1.0) = 2**-7
        for _ in range(20):
            p.grad = torch.sparse_coo_tensor(torch.arange(rows).unsqueeze(0),
                                             torch.ones(rows, 8, dtype=torch.bfloat16), (rows, 8))
            opt.step()
        moved = 1.0 - float(p.detach().float().mean())
        if sr in results:
            assert torch.equal(p.detach(), results[sr][1])
        results[sr] = (moved, p.detach().clone())
    assert results[False][0] == 0.0
    assert results[True][0] == pytest.approx(20 * 1e-4, rel=0.1)


# ------------------------------------------------------------------ clipping
def _two_param_grads(seed):
    """A sparse-grad table and a dense linear layer; returns (params_sparse, params_dense)."""
    torch.manual_seed(seed)
    emb = torch.nn.Parameter(torch.randn(R, D))
    lin = torch.nn.Linear(D, 3)
    idx = torch.randint(0, R, (30,))
    (lin(F.embedding(idx, emb, sparse=True)) ** 2).sum().backward()
    emb_d = torch.nn.Parameter(emb.detach().clone())
    emb_d.grad = emb.grad.coalesce().to_dense()
    lin_d = [torch.nn.Parameter(q.detach().clone()) for q in lin.parameters()]
    for q, src in zip(lin_d, lin.parameters(), strict=True):
        q.grad = src.grad.clone()
    return [emb, *lin.parameters()], [emb_d, *lin_d]


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_matches_torch_on_dense_equivalent(max_norm, norm_type):
    ps, pd = _two_param_grads(0)
    assert not ps[0].grad.is_coalesced()
    total = clip_grad_norm_(ps, max_norm, norm_type=norm_type)
    ref = torch.nn.utils.clip_grad_norm_(pd, max_norm, norm_type=norm_type)
    torch.testing.assert_close(total, ref)
    assert ps[0].grad.is_sparse and ps[0].grad.is_coalesced()  # coalesced in place
    torch.testing.assert_close(ps[0].grad.to_dense(), pd[0].grad)
    for a, b in zip(ps[1:], pd[1:], strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    if max_norm < 1:
        clipped = torch.linalg.vector_norm(torch.cat([p.grad.to_dense().reshape(-1) for p in ps]), norm_type)
        assert float(clipped) == pytest.approx(max_norm, rel=1e-4)


def test_clip_grad_norm_edge_cases():
    assert float(clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)) == 0.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError):
        clip_grad_norm_(p, 1.0, error_if_nonfinite=True)


def test_validation():
    p = _table()
    with pytest.raises(ValueError, match="b1\\*\\*2 < b2"):
        SparseRowAdam([p], betas=(0.99, 0.95))
    SparseRowAdam([p], betas=(0.99, 0.95), catch_up="none")  # fine for lazy Adam
    with pytest.raises(ValueError, match="bias_correction"):
        SparseRowAdam([p], bias_correction="rows")
    with pytest.raises(ValueError, match="catch_up"):
        SparseRowAdam([p], catch_up="eager")
    with pytest.raises(ValueError):
        SparseRowAdam([p], lr=-1.0)
    with pytest.raises(ValueError):
        SparseRowAdam([torch.nn.Parameter(torch.tensor(1.0))])


# ------------------------------------------------------------------ the native kernel
native_adam = pytest.importorskip("engram.optim.native_adam")
needs_native = pytest.mark.skipif(not native_adam.available(), reason="no C compiler for the native kernel")


@needs_native
@pytest.mark.parametrize("betas,wd", [((0.9, 0.95), 0.0), ((0.9, 0.999), 0.1), ((0.3, 0.95), 0.01),
                                      ((0.1, 0.2), 0.0)])  # the last: power tables end at e=28 < 40 steps
def test_native_update_equals_torch_path(betas, wd):
    """Rows touched at irregular intervals (catch-up over k skipped steps, per-row bias clocks), a
    changing lr, weight decay: the one-pass kernel tracks the torch form to float32 rounding, and its
    counters exactly."""
    a, b = _table(seed=3), _table(seed=3)
    oa = SparseRowAdam([a], lr=1e-2, betas=betas, weight_decay=wd, native=True)
    ob = SparseRowAdam([b], lr=1e-2, betas=betas, weight_decay=wd, native=False)
    assert native_adam.supports(a.view(R, D), oa._init_state(a, oa.param_groups[0]), oa.param_groups[0])
    oa.state.clear()
    for s in range(40):
        idx = _touch(s, n=1 + s % 7, seed=11)  # few rows per step: most rows skip many steps
        for t, o in ((a, oa), (b, ob)):
            for g in o.param_groups:
                g["lr"] = 1e-2 * (1 + (s % 5)) / 5
            _sparse_grad(t, idx, s)
            o.step()
            o.zero_grad()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-6)
    sa, sb = oa.state[a], ob.state[b]
    assert int(sa["step"]) == int(sb["step"]) == 40
    assert torch.equal(sa["row_step"], sb["row_step"]) and torch.equal(sa["last_step"], sb["last_step"])
    torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert not torch.equal(a.detach(), _table(seed=3).detach())  # it did train


@needs_native
def test_native_update_leaves_untouched_rows_alone():
    rows = 100_003
    p = torch.nn.Parameter(torch.randn(rows, 8))
    opt = SparseRowAdam([p], lr=1e-2, weight_decay=0.01)
    _sparse_grad(p, torch.randint(0, rows, (64,)), 0)
    opt.step()
    opt.zero_grad()
    before = p.detach().clone()
    m_before = opt.state[p]["exp_avg"].clone()
    idx = torch.randint(0, rows, (50,))
    _sparse_grad(p, idx, 1)
    opt.step()
    touched = torch.zeros(rows, dtype=torch.bool)
    touched[idx] = True
    assert torch.equal(p.detach()[~touched], before[~touched])
    assert torch.equal(opt.state[p]["exp_avg"][~touched], m_before[~touched])
    assert not torch.equal(p.detach()[touched], before[touched])


@needs_native
@pytest.mark.parametrize("kw", [dict(rowwise=True), dict(catch_up="deferred"), dict(bias_correction="global")])
def test_native_kernel_only_where_it_applies(kw):
    p = _table()
    opt = SparseRowAdam([p], lr=1e-2, **kw)
    state = opt._init_state(p, opt.param_groups[0])
    assert not native_adam.supports(p.view(R, D), state, opt.param_groups[0])
    bf = _table(torch.bfloat16)
    opt = SparseRowAdam([bf], lr=1e-2)
    assert not native_adam.supports(bf.view(R, D), opt._init_state(bf, opt.param_groups[0]), opt.param_groups[0])


@needs_native
def test_native_update_rejects_out_of_range_rows():
    p = _table()
    opt = SparseRowAdam([p], lr=1e-2)
    state = opt._init_state(p, opt.param_groups[0])
    tail = opt._tail(0.9, 0.999, "row", p.device)
    with pytest.raises(IndexError, match="row ids must lie in"):
        native_adam.sparse_adam_update(p.detach().view(R, D), state, torch.tensor([0, R]), torch.zeros(2, D), 1,
                                       1e-2, (0.9, 0.999), 1e-8, 0.0, tail)


# ------------------------------------------------------------------ TorchSparseAdam (train.engram_optimizer)

@given(seed=st.integers(0, 2**16), steps=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@settings(max_examples=25)
def test_torch_sparse_adam_takes_dense_rows_as_their_sparse_gradient(seed, steps, dtype):
    """A table built with dense gradients (sparse=False) steps exactly like the same table with sparse
    ones under torch's SparseAdam: untouched rows and their state stay where they were."""
    from engram.optim import TorchSparseAdam

    dense, sparse = _table(dtype, seed), _table(dtype, seed)
    opt_d = TorchSparseAdam([dense], lr=1e-2, betas=(0.9, 0.95))
    opt_s = torch.optim.SparseAdam([sparse], lr=1e-2, betas=(0.9, 0.95))
    touched = torch.zeros(R, dtype=torch.bool)
    for step in range(steps):
        idx = _touch(step, seed=seed)
        touched[idx] = True
        g = torch.Generator().manual_seed(seed + step)
        tgt_Ud = torch.randn(idx.shape[0], D, generator=g)
        (F.embedding(idx, dense, sparse=False).float() * tgt_Ud).sum().backward()
        (F.embedding(idx, sparse, sparse=True).float() * tgt_Ud).sum().backward()
        assert not dense.grad.is_sparse
        opt_d.step()
        opt_s.step()
        dense.grad = sparse.grad = None
    assert torch.equal(dense, sparse)
    assert torch.equal(dense[~touched], _table(dtype, seed)[~touched])
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_d.state[dense][k], opt_s.state[sparse][k])
    # torch's state dict: a checkpoint of one loads into the other
    opt_s.load_state_dict(copy.deepcopy(opt_d.state_dict()))
