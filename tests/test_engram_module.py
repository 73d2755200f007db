"""Tests for engram.model.engram: the Engram block and its ShortConv."""

# Shapes: B batch, T time, H hash heads, d row width, E = H*d, M residual branches, D model width.

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.model import Engram, ShortConv

D, N, K, NE = 8, 3, 2, 6  # hidden size, max n-gram, heads per n-gram, embed per n-gram
SIZES = [5, 7, 11, 13]  # (N-1)*K heads
H, d = len(SIZES), NE // K


def make(hc_mult=2, conv_init="default", seed=0, **kw):
    torch.manual_seed(seed)
    mod = Engram(D, SIZES, max_ngram_size=N, n_head_per_ngram=K, n_embed_per_ngram=NE,
                 hc_mult=hc_mult, conv_init=conv_init, **kw)
    with torch.no_grad():  # norm weights start at ones; randomise so the test sees them
        for norm in (mod.key_norm, mod.query_norm, mod.short_conv.norm):
            norm.weight.uniform_(0.5, 1.5)
    return mod


def rand_rows(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (B, T), generator=g) for s in SIZES], dim=-1)


def rand_h(B, T, M, seed=2):
    return torch.randn(B, T, M, D, generator=torch.Generator().manual_seed(seed))


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference(mod, h_BTMD, rows_BTH):
    """The Engram equations written out branch by branch, tap by tap."""
    B, T, M, _ = h_BTMD.shape
    W = mod.table.weight.detach()
    starts = [sum(SIZES[:i]) for i in range(H)]
    e = torch.cat([W[starts[i] + rows_BTH[..., i]] for i in range(H)], dim=-1)  # [B, T, E]
    v = e @ mod.value_proj.weight.T + mod.value_proj.bias
    eps = torch.finfo(torch.float32).eps
    conv_w = mod.short_conv.weight.detach()
    ksz, dil = conv_w.shape[-1], N
    u_branches, out_branches = [], []
    for m in range(M):
        Wk = mod.key_proj.weight[m * D:(m + 1) * D]
        bk = mod.key_proj.bias[m * D:(m + 1) * D]
        k = rms(e @ Wk.T + bk, mod.key_norm.weight[m], eps)
        q = rms(h_BTMD[:, :, m], mod.query_norm.weight[m], eps)
        s = (k * q).sum(-1) / math.sqrt(D)
        gate = torch.sigmoid(torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6)))
        u = gate[..., None] * v
        x = rms(u, mod.short_conv.norm.weight[m], 1e-5)
        w = conv_w[m * D:(m + 1) * D, 0]  # [D, k]
        y = torch.zeros_like(x)
        for t in range(T):
            for j in range(ksz):
                src = t - (ksz - 1 - j) * dil
                if src >= 0:
                    y[:, t] += w[:, j] * x[:, src]
        u_branches.append(u)
        out_branches.append(u + F.silu(y))
    return torch.stack(out_branches, 2), torch.stack(u_branches, 2)


# ---------------------------------------------------------------- equations


@pytest.mark.parametrize("hc_mult", [1, 3])
def test_matches_reference(hc_mult):
    mod = make(hc_mult)
    h, rows = rand_h(2, 9, hc_mult), rand_rows(2, 9)
    with torch.no_grad():
        out = mod(h, rows)
        ref, _ = reference(mod, h, rows)
    assert out.shape == h.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_short_conv_matches_nn_conv1d():
    torch.manual_seed(0)
    sc = ShortConv(D, 2, kernel_size=3, dilation=2, conv_init="default")
    torch.manual_seed(0)
    conv = nn.Conv1d(2 * D, 2 * D, 3, groups=2 * D, dilation=2, padding=4, bias=False)
    assert torch.equal(sc.weight, conv.weight)  # same init as nn.Conv1d, same layout
    x = torch.randn(2, 7, 2, D)
    y, _ = sc(x)
    xn = F.rms_norm(x, (D,), eps=1e-5).reshape(2, 7, 2 * D)
    ref = F.silu(conv(xn.transpose(1, 2))[:, :, :7]).transpose(1, 2).reshape(2, 7, 2, D)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)


def test_zero_conv_gives_exactly_u():
    mod = make(2, conv_init="zero")
    assert torch.count_nonzero(mod.short_conv.weight) == 0
    h, rows = rand_h(2, 6, 2), rand_rows(2, 6)
    out, aux = mod(h, rows, return_gates=True)
    v = mod.value_proj(mod.table(rows).reshape(2, 6, H * d))
    u = aux["gates"].unsqueeze(-1) * v.unsqueeze(2)
    assert torch.equal(out, u)
    _, u_ref = reference(mod, h, rows)
    torch.testing.assert_close(out, u_ref.detach(), atol=1e-5, rtol=1e-5)


def test_zero_value_gives_zero_output():
    mod = make(2)
    with torch.no_grad():
        mod.value_proj.weight.zero_()
        mod.value_proj.bias.zero_()
    out = mod(rand_h(2, 6, 2), rand_rows(2, 6))
    assert torch.equal(out, torch.zeros_like(out))


def test_plain_3d_equals_single_branch():
    mod = make(1)
    h, rows = rand_h(2, 5, 1), rand_rows(2, 5)
    out3, aux = mod(h[:, :, 0], rows, return_gates=True)
    assert out3.shape == (2, 5, D) and aux["gates"].shape == (2, 5, 1)
    assert torch.equal(out3, mod(h, rows)[:, :, 0])


def test_gates_in_unit_interval():
    _, aux = make(2)(rand_h(2, 5, 2), rand_rows(2, 5), return_gates=True)
    assert aux["gates"].shape == (2, 5, 2)
    assert ((aux["gates"] > 0) & (aux["gates"] < 1)).all()


# ---------------------------------------------------------------- causality & decoding


def test_causal():
    mod = make(2)
    h, rows = rand_h(2, 10, 2), rand_rows(2, 10)
    cut = 6
    h2, rows2 = h.clone(), rows.clone()
    h2[:, cut:] = torch.randn_like(h2[:, cut:])
    rows2[:, cut:] = rand_rows(2, 10 - cut, seed=9)
    with torch.no_grad():
        a, b = mod(h, rows), mod(h2, rows2)
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("T", [1, 2])  # T = 1 and T < N
def test_short_sequences_equal_prefix(T):
    mod = make(2)
    h, rows = rand_h(2, 8, 2), rand_rows(2, 8)
    with torch.no_grad():
        full = mod(h, rows)
        short = mod(h[:, :T], rows[:, :T])
    assert short.shape == (2, T, 2, D)
    torch.testing.assert_close(short, full[:, :T], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("ksz", "dil"), [(4, 3), (1, 2), (3, 1)])
def test_short_conv_chunked_equals_full(ksz, dil):
    torch.manual_seed(0)
    sc = ShortConv(D, 2, kernel_size=ksz, dilation=dil, conv_init="default")
    x = torch.randn(2, 11, 2, D)
    full, full_state = sc(x)
    state, ys = None, []
    for lo, hi in [(0, 1), (1, 3), (3, 4), (4, 9), (9, 11)]:  # chunks shorter and longer than P
        y, state = sc(x[:, lo:hi], state)
        assert state.shape == (2, sc.state_len, 2 * D)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, full_state)


def test_engram_chunked_decode_equals_full():
    mod = make(2)
    h, rows = rand_h(2, 9, 2), rand_rows(2, 9)
    with torch.no_grad():
        full = mod(h, rows)
        outs, state = [], None
        for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 9)]:
            out, aux = mod(h[:, lo:hi], rows[:, lo:hi], conv_state=state, return_state=True)
            state = aux["conv_state"]
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-6)


def test_conv_state_shape_checked():
    sc = ShortConv(D, 2, kernel_size=4, dilation=3)
    with pytest.raises(ValueError, match="conv state must have shape"):
        sc(torch.randn(2, 3, 2, D), torch.zeros(2, 8, 2 * D))
    with pytest.raises(ValueError, match="ShortConv input must be"):
        sc(torch.randn(2, 3, 3, D))
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        ShortConv(D, 2, dilation=0)


# ---------------------------------------------------------------- inputs, dtypes, gradients


def test_emb_path_equals_rows_path():
    mod = make(2)
    h, rows = rand_h(2, 5, 2), rand_rows(2, 5)
    with torch.no_grad():
        ref = mod(h, rows)
        emb = mod.table(rows)
        assert torch.equal(mod(h, emb=emb), ref)
        assert torch.equal(mod(h, emb=emb.reshape(2, 5, H * d)), ref)


def test_bf16_table_with_fp32_hidden():
    mod = make(2, table_dtype=torch.bfloat16)
    assert mod.table.weight.dtype == torch.bfloat16
    out = mod(rand_h(2, 5, 2), rand_rows(2, 5))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert mod.table.weight.grad.is_sparse


def test_gradients_reach_everything_and_table_grad_is_sparse():
    mod = make(2)
    rows = rand_rows(2, 5)
    h = rand_h(2, 5, 2).requires_grad_(True)
    mod(h, rows).pow(2).sum().backward()
    g = mod.table.weight.grad
    assert g.is_sparse
    offsets = torch.tensor([sum(SIZES[:i]) for i in range(H)])
    assert set(g.coalesce().indices()[0].tolist()) == set((rows + offsets).flatten().tolist())
    for name, p in mod.named_parameters():
        if name != "table.weight":
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert h.grad is not None


def test_dense_table_grad_option():
    mod = make(1, sparse=False)
    mod(rand_h(2, 5, 1), rand_rows(2, 5)).sum().backward()
    assert not mod.table.weight.grad.is_sparse


def test_submodule_names():
    names = {n for n, _ in make(2).named_children()}
    assert names == {"table", "value_proj", "key_proj", "key_norm", "query_norm", "short_conv"}


BASE = dict(hidden_size=D, head_sizes=SIZES, max_ngram_size=N, n_head_per_ngram=K,
            n_embed_per_ngram=NE)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(max_ngram_size=1), "max_ngram_size must be >= 2"),
        (dict(n_head_per_ngram=0), "n_head_per_ngram must be >= 1"),
        (dict(n_embed_per_ngram=7), r"n_embed_per_ngram \(7\) must be a positive multiple"),
        (dict(head_sizes=SIZES[:3]), "len\\(head_sizes\\).*= 4, got 3"),
        (dict(head_sizes=[5, 0, 11, 13]), r"head_sizes\[1\] must be >= 1, got 0"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(hc_mult=0), "hc_mult must be >= 1"),
        (dict(kernel_size=0), "kernel_size must be >= 1"),
        (dict(conv_init="xavier"), "unknown conv_init 'xavier'"),
    ],
)
def test_config_validation(override, match):
    with pytest.raises(ValueError, match=match):
        Engram(**{**BASE, **override})


def test_input_validation():
    mod = make(2)
    h, rows = rand_h(2, 5, 2), rand_rows(2, 5)
    with pytest.raises(ValueError, match=r"h must be \[B, T, D\] or \[B, T, M, D\]"):
        mod(h[0, 0], rows)
    with pytest.raises(ValueError, match="hidden size mismatch: expected D=8, got 4"):
        mod(h[..., :4], rows)
    with pytest.raises(ValueError, match="branch count mismatch: expected M=hc_mult=2, got 3"):
        mod(rand_h(2, 5, 3), rows)
    with pytest.raises(ValueError, match="branch count mismatch: expected M=hc_mult=2, got 1"):
        mod(h[:, :, 0], rows)
    with pytest.raises(ValueError, match="empty batch"):
        mod(h[:0], rows[:0])
    with pytest.raises(ValueError, match="empty batch"):
        mod(h[:, :0], rows[:, :0])
    with pytest.raises(ValueError, match="rows_BTH must have shape"):
        mod(h, rows[:, :4])
    with pytest.raises(ValueError, match="rows_BTH must have shape"):
        mod(h, rows[:1])
    with pytest.raises(ValueError, match="emb must have shape"):
        mod(h, emb=torch.randn(2, 4, H, d))
    with pytest.raises(ValueError, match="emb must have shape"):
        mod(h, emb=torch.randn(2, 5, H * d + 1))
    with pytest.raises(ValueError, match="exactly one of rows_BTH"):
        mod(h)
    with pytest.raises(ValueError, match="exactly one of rows_BTH"):
        mod(h, rows, emb=mod.table(rows))
    with pytest.raises(TypeError, match="row ids must be an integer tensor, got torch.float32"):
        mod(h, rows.float())
    with pytest.raises(ValueError, match="row ids must have last dimension H=4"):
        mod(h, rows[..., :3])
    with pytest.raises(ValueError, match=r"head 3: got 13"):
        mod(h, torch.cat([rows[..., :3], torch.full((2, 5, 1), 13)], -1))


def _fwd_bwd(mod, h, rows):
    h = h.clone().requires_grad_(True)
    out = mod(h, rows)
    out.square().sum().backward()
    grads = {n: p.grad.to_dense().clone() for n, p in mod.named_parameters()}
    return out.detach(), h.grad, grads


@pytest.mark.slow
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_compiled_mix_matches_eager(hc_mult):
    """The torch.compile path (training) computes the same increment and gradients as eager."""
    eager, comp = make(hc_mult=hc_mult), make(hc_mult=hc_mult)
    comp.compiled_mix = True
    h, rows = rand_h(2, 9, hc_mult), rand_rows(2, 9)
    out_e, gh_e, g_e = _fwd_bwd(eager, h, rows)
    out_c, gh_c, g_c = _fwd_bwd(comp, h, rows)
    assert out_e.abs().max() > 0.1  # a live output, not a zero block
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh_c, gh_e, rtol=1e-4, atol=1e-5)
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # inference stays eager, so it is bit-identical
        assert torch.equal(comp(h, rows), eager(h, rows))


def test_compiled_mix_falls_back_to_eager(monkeypatch):
    """Where compiling fails (no C++ compiler, unsupported platform) training still runs, eagerly,
    with a warning; a genuine input error still raises."""
    import engram.model.mix as em

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(em, "_COMPILED_MIX", [])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    eager, comp = make(), make()
    comp.compiled_mix = True
    h, rows = rand_h(2, 5, 2), rand_rows(2, 5)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = comp(h.requires_grad_(True), rows)
    torch.testing.assert_close(out, eager(h, rows), rtol=1e-5, atol=1e-6)  # eager float32: the fused form
    assert em._COMPILED_MIX[0].fn is em.engram_mix
    with pytest.raises(ValueError, match="conv state"):
        comp(h, rows, conv_state=torch.zeros(2, 1, 1))
