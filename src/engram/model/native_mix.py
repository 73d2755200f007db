"""C kernels for :class:`~engram.model.mix.FusedMix` on CPU: the elementwise math around the projections.

Why: past its two projections the Engram mixing is a chain of cheap elementwise steps over ``[N, M, D]``.
As torch ops each step is one more pass over memory and usually a freshly allocated full-size temporary,
and on CPU a fresh multi-MB tensor costs about as much in page faults as the arithmetic done on it. The
kernels (``engram_mix.c``) make one pass each and allocate nothing full-size beyond what autograd keeps or
returns:

* :func:`gate_forward`: the gate's dot product and both norms in one read of ``kr`` and ``h``, then the
  per-``(n, m)`` scalars (gate ``g``, conv scale ``c``, and those the backward reuses);
* :func:`conv_forward`: ``out = silu(conv(z)) + g v`` with ``z = c v`` formed on the fly, so neither
  ``z`` nor the conv output is stored (the backward recomputes ``y`` from ``c`` and ``v``: ``k`` taps);
* :func:`backward`: from ``d out`` (any strides, e.g. the zero strides of ``out.sum()``'s gradient) to
  ``dv``, ``dkr``, ``dh`` and every weight gradient in one backwards walk over time per sequence, with
  a ring of the last ``P + 1`` rows of ``dy``.

Work is split over ``torch.get_num_threads()`` POSIX threads (rows forward; sequence and time chunks
backward, each chunk recomputing the ``P`` rows of ``dy`` past its end). The results match the torch
path of :class:`~engram.model.mix.FusedMix` to float32 rounding (sums run in a different order, and
``exp`` is the kernel's own, within ~1 ulp).

The compiled library is cached by :mod:`engram.native.build`. Where no C compiler works, or with
``ENGRAM_NATIVE_MIX=0`` in the environment, :func:`available` is False and ``FusedMix`` runs its torch
code.
"""

# Shapes: B batch, T time, N = B*T rows, M residual branches, D width, C = M*D conv channels, k conv taps,
# P = (k-1)*dilation conv history.

from __future__ import annotations

import ctypes
import math

import torch

from engram.native import NativeLibrary, native_source

__all__ = ["MAX_TAPS", "applies", "available", "backward", "conv_forward", "gate_forward", "unavailable_reason"]

MAX_THREADS = 64
MAX_TAPS = 64  # conv taps the kernels take (stack arrays); longer convs use the torch path
MIN_ELEMENTS_PER_THREAD = 1 << 16  # below this a thread costs more than it saves
ROWS_PER_ITEM = 32  # forward work item (rows); threads take items until none is left
ITEMS_PER_THREAD = 4  # backward: time chunks aimed at per thread, for balance on a busy machine

_SOURCE = f"#define MAX_THREADS {MAX_THREADS}\n#define MAX_TAPS {MAX_TAPS}\n" + native_source("engram_mix.c")

_P, _I, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


def _configure(lib: ctypes.CDLL) -> None:
    lib.engram_mix_gate_fwd.argtypes = [_P] * 4 + [_I] * 3 + [_F64] * 2 + [_P] * 3 + [_I] * 2
    lib.engram_mix_gate_fwd.restype = _I
    lib.engram_mix_conv_fwd.argtypes = [_P] * 6 + [_I] * 6 + [_P] + [_I] * 2
    lib.engram_mix_conv_fwd.restype = _I
    lib.engram_mix_bwd.argtypes = ([_P] + [_I] * 4 + [_P] * 10 + [_I] * 6 + [_F64] + [_P] * 9 + [_I] * 2)
    lib.engram_mix_bwd.restype = _I


_native = NativeLibrary(_SOURCE, "engram_mix", env_switch="ENGRAM_NATIVE_MIX", configure=_configure)


def available() -> bool:
    """True if the kernels are compiled and loaded (builds them on the first call)."""
    return _native.load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _native.error


def applies(h_BTMD: torch.Tensor, kernel_size: int) -> bool:
    """Whether the kernels compute this :class:`~engram.model.mix.FusedMix` call: CPU tensors, at most
    :data:`MAX_TAPS` taps, at least one row, and the library available."""
    return (h_BTMD.device.type == "cpu" and 1 <= kernel_size <= MAX_TAPS and h_BTMD.numel() > 0
            and available())


def _lib() -> ctypes.CDLL:
    lib = _native.load()
    if lib is None:
        raise RuntimeError(f"native Engram mixing unavailable: {_native.error}")
    return lib


def _threads(elements: int) -> int:
    return max(1, min(torch.get_num_threads(), MAX_THREADS, elements // MIN_ELEMENTS_PER_THREAD))


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous float32 CPU tensor (no copy when it already is one)."""
    return x.to(torch.float32).contiguous()


def gate_forward(kr_NC: torch.Tensor, h_NC: torch.Tensor, wkq_C: torch.Tensor, v_ND: torch.Tensor, M: int,
                 eps_kq: float, eps_c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate and conv scale per row and branch: ``(g_NM, c_NM, aux_NM6)``.

    ``g = sigmoid(sign(s) sqrt(max(|s|, 1e-6)))`` with ``s = rk rq <kr, h wkq> / sqrt(D)``,
    ``rk = rsqrt(mean(kr^2) + eps_kq)``, ``rq`` likewise from ``h``; ``c = g rc`` with
    ``rc = rsqrt(g^2 mean(v^2) + eps_c)``. ``aux`` holds ``(rc, rk, rq, <kr, h wkq>, s, sqrt(max(|s|,
    1e-6)))`` for :func:`backward`. Tensors are float32 CPU; ``[N, C]`` ones are made contiguous.
    """
    kr_NC, h_NC, wkq_C, v_ND = _f32(kr_NC), _f32(h_NC), _f32(wkq_C), _f32(v_ND)
    N, D = v_ND.shape
    g_NM, c_NM = kr_NC.new_empty(N, M), kr_NC.new_empty(N, M)
    aux_NM6 = kr_NC.new_empty(N, M, 6)
    _lib().engram_mix_gate_fwd(kr_NC.data_ptr(), h_NC.data_ptr(), wkq_C.data_ptr(), v_ND.data_ptr(), N, M, D,
                               float(eps_kq), float(eps_c), g_NM.data_ptr(), c_NM.data_ptr(), aux_NM6.data_ptr(),
                               ROWS_PER_ITEM, _threads(N * M * D))
    return g_NM, c_NM, aux_NM6


def conv_forward(v_ND: torch.Tensor, c_NM: torch.Tensor, g_NM: torch.Tensor, we_kC: torch.Tensor,
                 w_kC: torch.Tensor, state_BPC: torch.Tensor | None, B: int, T: int, dilation: int) -> torch.Tensor:
    """``out_NC = silu(y) + g v`` with ``y`` the causal depthwise conv (taps ``we``) of ``z = c v``.

    Steps before the sequence read ``state_BPC`` (in the conv input's units, weighed by the plain taps
    ``w``) or zeros without one. ``we_kC``/``w_kC``: tap ``k-1`` multiplies the current step.
    """
    v_ND, c_NM, g_NM, we_kC, w_kC = _f32(v_ND), _f32(c_NM), _f32(g_NM), _f32(we_kC), _f32(w_kC)
    state_BPC = None if state_BPC is None else _f32(state_BPC)
    N, D = v_ND.shape
    M, k = c_NM.shape[1], we_kC.shape[0]
    out_NC = v_ND.new_empty(N, M * D)
    rc = _lib().engram_mix_conv_fwd(v_ND.data_ptr(), c_NM.data_ptr(), g_NM.data_ptr(), we_kC.data_ptr(),
                                    w_kC.data_ptr(), _ptr(state_BPC), B, T, M, D, k, dilation, out_NC.data_ptr(),
                                    ROWS_PER_ITEM, _threads(N * M * D))
    if rc != 0:
        raise ValueError(f"native conv takes 1..{MAX_TAPS} taps, got {k}")
    return out_NC


def _chunk(B: int, T: int, P: int, threads: int) -> int:
    """Time steps per backward work item: whole sequences on one thread (no recomputed halo), else enough
    items for balance but chunks of at least 4P steps, so the P recomputed rows stay a small share."""
    if threads == 1:
        return max(T, 1)
    per_seq = math.ceil(ITEMS_PER_THREAD * threads / B)
    return min(max(math.ceil(T / per_seq), 4 * P, 16), max(T, 1))


def backward(dout_BTMD: torch.Tensor, v_ND: torch.Tensor, c_NM: torch.Tensor, g_NM: torch.Tensor,
             aux_NM6: torch.Tensor, kr_NC: torch.Tensor, h_NC: torch.Tensor, wkq_C: torch.Tensor,
             we_kC: torch.Tensor, w_kC: torch.Tensor, state_BPC: torch.Tensor | None, dilation: int,
             eps_c: float, need_dh: bool = True) -> dict[str, torch.Tensor | None]:
    """Gradients of ``out = silu(conv(c v)) + g v`` (with ``g``, ``c`` from :func:`gate_forward`).

    ``dout_BTMD`` may have any strides. Returns a dict: ``dv_ND``, ``dkr_NC``, ``dh_NC`` (the value, the
    key projection output and ``h``; ``dh_NC`` is None unless ``need_dh``), ``dwe_kC`` (taps ``we``),
    ``dsw_kC`` and ``dstate_BPC`` (state taps ``w`` and the state; None without a state), ``dwkq_C`` (of
    ``wk * wq``), ``dbk_C`` (the sum of ``dkr`` over rows) and ``dbv_D`` (that of ``dv``).
    """
    B, T, M, D = dout_BTMD.shape
    N, C, k = B * T, M * D, we_kC.shape[0]
    P = (k - 1) * dilation
    if dout_BTMD.dtype != torch.float32 or dout_BTMD.device.type != "cpu":
        dout_BTMD = dout_BTMD.to(torch.float32)
    tensors = [_f32(x) for x in (v_ND, c_NM, g_NM, aux_NM6, kr_NC, h_NC, wkq_C, we_kC, w_kC)]
    state_BPC = None if state_BPC is None else _f32(state_BPC)
    new = v_ND.new_empty
    dv_ND, dkr_NC, dh_NC = new(N, D), new(N, C), new(N, C) if need_dh else None
    dwe_kC, dwkq_C, dbk_C, dbv_D = new(k, C), new(C), new(C), new(D)
    dsw_kC = dstate_BPC = None
    if state_BPC is not None:
        dsw_kC, dstate_BPC = new(k, C), v_ND.new_zeros(B, P, C)
    threads = _threads(N * C)
    rc = _lib().engram_mix_bwd(
        dout_BTMD.data_ptr(), *dout_BTMD.stride(), *(x.data_ptr() for x in tensors), _ptr(state_BPC),
        B, T, M, D, k, dilation, float(eps_c), dv_ND.data_ptr(), dkr_NC.data_ptr(), _ptr(dh_NC),
        dwe_kC.data_ptr(), _ptr(dsw_kC), dwkq_C.data_ptr(), dbk_C.data_ptr(), dbv_D.data_ptr(), _ptr(dstate_BPC),
        _chunk(B, T, P, threads), threads)
    if rc == -1:
        raise ValueError(f"native conv takes 1..{MAX_TAPS} taps, got {k}")
    if rc != 0:
        raise MemoryError("native Engram mixing backward: out of memory for its scratch buffers")
    return {"dv_ND": dv_ND, "dkr_NC": dkr_NC, "dh_NC": dh_NC, "dwe_kC": dwe_kC, "dsw_kC": dsw_kC,
            "dstate_BPC": dstate_BPC, "dwkq_C": dwkq_C, "dbk_C": dbk_C, "dbv_D": dbv_D}
