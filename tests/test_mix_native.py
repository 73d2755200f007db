"""The C kernels of the Engram mixing (engram.model.native_mix) against FusedMix's torch code and float64."""

# Shapes: B batch, T time, E gathered row width, M residual branches, D width, N = B*T, C = M*D,
# k conv taps, P = (k-1)*dilation conv history.

from __future__ import annotations

import pytest
import torch

from engram.model import mix, native_mix
from engram.native import NativeLibrary

needs_native = pytest.mark.skipif(not native_mix.available(),
                                  reason=f"no native mix: {native_mix.unavailable_reason()}")

# (B, T, M, D, E, k, dilation, with_state): M in {1, 3}, k in {1, 2, 4}, dilation, T < P, widths that are
# no multiple of the kernels' 8 lanes.
SHAPES = [
    (2, 9, 1, 16, 12, 4, 1, False),
    (2, 9, 3, 20, 12, 4, 3, True),
    (3, 2, 3, 13, 9, 4, 3, True),  # T < P: the state reaches past the whole chunk
    (2, 5, 1, 8, 8, 2, 2, True),
    (1, 6, 3, 24, 16, 1, 1, False),  # k = 1: no history at all
    (2, 1, 1, 8, 8, 4, 1, True),  # one decode step
    (2, 17, 3, 5, 7, 2, 4, False),
]


def _inputs(B, T, M, D, E, k, dilation, with_state, seed=0, dtype=torch.float32):
    """``FusedMix.apply``'s tensor arguments (weights near their trained scale) and the conv state."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).requires_grad_(True)

    C, P = M * D, (k - 1) * dilation
    tensors = [r(B, T, E), r(B, T, M, D), r(C, E, scale=E ** -0.5), r(C, scale=0.1), r(D, E, scale=E ** -0.5),
               r(D, scale=0.1), r(M, D, scale=0.1, shift=1.0), r(M, D, scale=0.1, shift=1.0),
               r(M, D, scale=0.1, shift=1.0), r(C, 1, k, scale=0.5)]
    state = r(B, P, C) if with_state else None
    return tensors, state


def _run(fn, tensors, state, dilation, seed=1):
    """Output, gate, new state and the gradients of a random projection of the output."""
    for x in [*tensors, state]:
        if x is not None:
            x.grad = None
    out, gate, new_state = fn(*tensors, dilation, 1e-5, state)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * w).sum().backward()
    grads = [x.grad for x in tensors] + ([state.grad] if state is not None else [])
    return [out.detach(), gate, new_state, *grads]


def _torch_path(monkeypatch):
    monkeypatch.setattr(native_mix, "applies", lambda *a: False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_close(got, want, tol, what=""):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, (what, i)
        assert _rel(a, b) <= tol, f"{what} result {i}: relative error {_rel(a, b):.2e} > {tol:.0e}"


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_torch_path(shape, monkeypatch):
    tensors, state = _inputs(*shape)
    dilation = shape[6]
    got = _run(mix.FusedMix.apply, tensors, state, dilation)
    _torch_path(monkeypatch)
    want = _run(mix.FusedMix.apply, tensors, state, dilation)
    _assert_close(got[:3], want[:3], 1e-6, "forward")
    _assert_close(got[3:], want[3:], 1e-4, "gradient")


@needs_native
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_native_gradients_against_float64(shape, monkeypatch):
    """Gradcheck-style: the float32 kernels' gradients against autograd through the composed float64 math,
    and no less accurate than FusedMix's torch code (with slack for rounding luck)."""
    tensors, state = _inputs(*shape)
    t64, s64 = _inputs(*shape, dtype=torch.float64)
    dilation = shape[6]
    ref = _run(mix.engram_mix, t64, s64, dilation)
    got = _run(mix.FusedMix.apply, tensors, state, dilation)
    _torch_path(monkeypatch)
    base = _run(mix.FusedMix.apply, tensors, state, dilation)
    for i, (a, b, r) in enumerate(zip(got, base, ref, strict=True)):
        assert _rel(a, r) <= max(1e-5, 3 * _rel(b, r)), f"result {i}: {_rel(a, r):.2e} vs torch {_rel(b, r):.2e}"


@needs_native
def test_inference_equals_training_forward():
    tensors, state = _inputs(2, 9, 3, 20, 12, 4, 3, True)
    with torch.no_grad():
        inf = mix.FusedMix.apply(*tensors, 3, 1e-5, state)
    train = mix.FusedMix.apply(*tensors, 3, 1e-5, state)
    for a, b in zip(inf, train, strict=True):
        assert torch.equal(a, b.detach())


@needs_native
@pytest.mark.parametrize("chunk", [1, 2, 5, None])
def test_threads_and_time_chunks(chunk, monkeypatch):
    """Several threads, and time chunks shorter than the conv history (each recomputes P rows of dy)."""
    shape = (2, 33, 3, 24, 16, 4, 2, True)
    tensors, state = _inputs(*shape)
    n = torch.get_num_threads()
    try:
        # torch's own matmuls (the key and value projections) run on 3 threads in both calls: some BLAS
        # builds split a GEMM differently by thread count, which is not what this test is about.
        torch.set_num_threads(3)
        monkeypatch.setattr(native_mix, "MAX_THREADS", 1)
        want = _run(mix.FusedMix.apply, tensors, state, 2)
        monkeypatch.undo()
        monkeypatch.setattr(native_mix, "MIN_ELEMENTS_PER_THREAD", 1)
        monkeypatch.setattr(native_mix, "ROWS_PER_ITEM", 5)
        if chunk is not None:
            monkeypatch.setattr(native_mix, "_chunk", lambda B, T, P, threads: chunk)
        got = _run(mix.FusedMix.apply, tensors, state, 2)
    finally:
        torch.set_num_threads(n)
    _assert_close(got[:3], want[:3], 0.0, "forward")  # rows are independent: bit for bit
    _assert_close(got[3:], want[3:], 1e-6, "gradient")  # sums over rows run in another order


def _saved(shape):
    """A forward on the kernels and what :func:`native_mix.backward` takes after it."""
    B, T, M, D, E, k, dilation, with_state = shape
    tensors, state = _inputs(*shape)
    e, h, key_w, key_b, value_w, value_b, wk, wq, wc, conv_w = (x.detach() for x in tensors)
    N, C = B * T, M * D
    kr = torch.addmm(key_b, e.reshape(N, E), key_w.t())
    v = torch.addmm(value_b, e.reshape(N, E), value_w.t())
    h_NC, wkq = h.reshape(N, C), (wk * wq).reshape(C)
    g, c, aux = native_mix.gate_forward(kr, h_NC, wkq, v, M, torch.finfo(torch.float32).eps, 1e-5)
    w_kC = conv_w[:, 0, :].t().contiguous()
    we_kC = w_kC * wc.reshape(C)
    st = None if state is None else state.detach()
    return (v, c, g, aux, kr, h_NC, wkq, we_kC, w_kC, st, dilation, 1e-5)


@needs_native
@pytest.mark.parametrize("layout", ["expanded", "permuted", "strided"])
def test_backward_any_dout_strides(layout):
    shape = (2, 9, 3, 20, 12, 4, 1, True)
    B, T, M, D = shape[:4]
    saved = _saved(shape)
    if layout == "expanded":  # what out.sum() hands the backward: one value, all strides 0
        dout = torch.ones(()).expand(B, T, M, D)
    elif layout == "permuted":
        dout = torch.randn(T, B, D, M).permute(1, 0, 3, 2)
    else:
        dout = torch.randn(B, T, M, 2 * D)[..., ::2]
    got = native_mix.backward(dout, *saved)
    want = native_mix.backward(dout.contiguous(), *saved)
    for name, x in want.items():
        assert torch.equal(got[name], x), name


@needs_native
def test_backward_without_dh():
    saved = _saved((2, 9, 3, 20, 12, 4, 1, True))
    dout = torch.randn(2, 9, 3, 20)
    full = native_mix.backward(dout, *saved)
    part = native_mix.backward(dout, *saved, need_dh=False)
    assert part["dh_NC"] is None
    for name, x in full.items():
        if name != "dh_NC":
            assert torch.equal(part[name], x), name


@needs_native
@pytest.mark.parametrize("k, dilation", [(4, 3), (2, 1), (1, 1)])
def test_incremental_decode_equals_full_forward(k, dilation):
    """Chunks of 1, 2 and 5 steps carrying the conv state give the full forward's output and final state."""
    shape = (2, 12, 3, 16, 12, k, dilation, False)
    tensors, _ = _inputs(*shape)
    tensors = [x.detach() for x in tensors]
    e, h = tensors[:2]
    with torch.no_grad():
        full, gate, full_state = mix.FusedMix.apply(*tensors, dilation, 1e-5, None)
        outs, state, t = [], None, 0
        for step in (1, 2, 5, 1, 3):
            out, _, state = mix.FusedMix.apply(e[:, t:t + step], h[:, t:t + step], *tensors[2:], dilation, 1e-5,
                                               state)
            outs.append(out)
            t += step
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, full_state, rtol=1e-5, atol=1e-6)


@needs_native
def test_silu_accuracy():
    """With one tap of weight 1, c = 1 and g = 0 the conv kernel returns silu(v): its exp is within a few ulp."""
    v = torch.linspace(-90, 90, 4096 * 8).reshape(-1, 8)
    N = v.shape[0]
    ones_N1, ones_18 = torch.ones(N, 1), torch.ones(1, 8)
    out = native_mix.conv_forward(v, ones_N1, torch.zeros(N, 1), ones_18, ones_18, None, 1, N, 1)
    want = torch.nn.functional.silu(v.double())
    err = ((out.double() - want).abs() / want.abs().clamp_min(1e-30))[want.abs() > 1e-30]
    assert err.max().item() < 4 * torch.finfo(torch.float32).eps


@needs_native
def test_generic_build_matches(monkeypatch):
    """The portable build (no AVX2/FMA clone) computes the same to float rounding."""
    shape = (2, 9, 3, 20, 12, 4, 3, True)
    tensors, state = _inputs(*shape)
    want = _run(mix.FusedMix.apply, tensors, state, 3)
    generic = NativeLibrary("#define ENGRAM_MIX_GENERIC_ONLY 1\n" + native_mix._SOURCE, "engram_mix_generic",
                            env_switch="ENGRAM_NATIVE_MIX", configure=native_mix._configure)
    assert generic.load() is not None, generic.error
    monkeypatch.setattr(native_mix, "_native", generic)
    got = _run(mix.FusedMix.apply, tensors, state, 3)
    _assert_close(got[:3], want[:3], 1e-6, "forward")
    _assert_close(got[3:], want[3:], 1e-5, "gradient")


def test_env_switch_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("ENGRAM_NATIVE_MIX", "0")
    off = NativeLibrary(native_mix._SOURCE, "engram_mix", env_switch="ENGRAM_NATIVE_MIX",
                        configure=native_mix._configure)
    monkeypatch.setattr(native_mix, "_native", off)
    assert not native_mix.available()
    assert "ENGRAM_NATIVE_MIX" in native_mix.unavailable_reason()
    shape = (2, 9, 3, 20, 12, 4, 3, True)
    tensors, state = _inputs(*shape)
    got = _run(mix.FusedMix.apply, tensors, state, 3)
    _torch_path(monkeypatch)
    want = _run(mix.FusedMix.apply, tensors, state, 3)
    _assert_close(got, want, 0.0, "disabled kernels")
    with pytest.raises(RuntimeError, match="ENGRAM_NATIVE_MIX"):
        native_mix.gate_forward(*(torch.zeros(1, 8),) * 2, torch.zeros(8), torch.zeros(1, 8), 1, 1e-6, 1e-5)
