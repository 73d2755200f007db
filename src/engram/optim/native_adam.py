"""A C kernel for :class:`engram.optim.sparse_adam.SparseRowAdam`'s default update, built on first use.

Why: the torch form of the update is ~30 separate passes over the touched rows (five gathers, the
catch-up, the Adam step, the momentum tail, five scatters), each allocating a ``[U, d]`` temporary.
With ~37k touched rows of 16 floats per step (the training benchmark) that took 16-22 ms of a step
whose whole Engram layer costs ~90 ms. This kernel does one pass per touched row: read its moments,
counters and weights once, apply the same closed-form catch-up, Adam step and momentum tail, write
them back.

Covered: fp32 contiguous tables on the CPU, per-element second moments, ``bias_correction="row"``
and ``catch_up="ahead"`` (the defaults). Anything else takes the torch path. Per-row scalars
(bias corrections, tail factors) are computed in double, elementwise math in float in the same
order as the torch path, so results agree with it to a few float32 ulps (not bit for bit; a run
and its resume use the same path, so resumed runs stay bit-identical).

Where no C compiler works, or with ``ENGRAM_NATIVE_ADAM=0``, :func:`available` is False.
"""

# Shapes: U touched rows, d row width, R table rows.

from __future__ import annotations

import ctypes
import math

import torch

from engram.native import NativeLibrary, native_source

_SOURCE = native_source("sparse_adam.c")


def _configure(lib: ctypes.CDLL) -> None:
    fn = lib.engram_sparse_adam
    fn.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_double] * 5
                   + [ctypes.c_void_p, ctypes.c_int64] * 2)
    fn.restype = None


_native = NativeLibrary(_SOURCE, "sparse_adam", env_switch="ENGRAM_NATIVE_ADAM", configure=_configure)


def available() -> bool:
    """True if the kernel is compiled and loaded (builds it on the first call)."""
    return _native.load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _native.error


def supports(table: torch.Tensor, state: dict, group: dict) -> bool:
    """Whether this update can run natively: fp32 contiguous CPU tables and state, the default modes."""
    return (table.device.type == "cpu" and table.dtype == torch.float32 and table.is_contiguous()
            and not group["rowwise"] and group["bias_correction"] == "row" and group["catch_up"] == "ahead"
            and all(state[k].is_contiguous() for k in ("exp_avg", "exp_avg_sq", "row_step", "last_step"))
            and available())


_POWERS: dict[tuple[float, float, int], torch.Tensor] = {}


def _pow_len(b1: float, b2: float) -> int:
    """Table length: the first exponent where every base**e < 1e-18 (capped at 2**20)."""
    top = max(b1, b2, b1 / math.sqrt(b2))
    if top <= 0.0:
        return 1
    return int(min(1 << 20, max(1, math.ceil(math.log(1e-18) / math.log(top)))))


def _powers(b1: float, b2: float, n: int) -> torch.Tensor:
    """float64 ``[3, n+1]``: ``b1**e``, ``b2**e``, ``(b1/sqrt(b2))**e`` for e = 0..n (cached)."""
    key = (b1, b2, n)
    tab = _POWERS.get(key)
    if tab is None:
        e = torch.arange(n + 1, dtype=torch.float64)
        bases = torch.tensor([b1, b2, b1 / b2**0.5], dtype=torch.float64).unsqueeze(1)
        tab = _POWERS[key] = torch.pow(bases, e).contiguous()
    return tab


def sparse_adam_update(table_Rd: torch.Tensor, state: dict, rows_U: torch.Tensor, g_Ud: torch.Tensor, t: int,
                       lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                       tail: torch.Tensor) -> None:
    """Apply one step to the rows ``rows_U`` (int64, unique) of ``table_Rd`` in place (see the module docstring).

    The caller checked :func:`supports`; ``g_Ud`` is converted to contiguous fp32 here.
    """
    lib = _native.load()
    if lib is None:
        raise RuntimeError(f"native sparse Adam unavailable: {_native.error}")
    rows_U = rows_U.to(torch.int64).contiguous()
    g_Ud = g_Ud.to(torch.float32).contiguous()
    tail = tail.to(torch.float64).contiguous()
    b1, b2 = float(betas[0]), float(betas[1])
    powers = _powers(b1, b2, _pow_len(b1, b2))
    U, d = g_Ud.shape
    if rows_U.numel() != U or table_Rd.shape[1] != d:
        raise ValueError(f"rows [{rows_U.numel()}] / gradient {tuple(g_Ud.shape)} do not match table "
                         f"{tuple(table_Rd.shape)}")
    if U and not (0 <= int(rows_U.min()) and int(rows_U.max()) < table_Rd.shape[0]):
        raise IndexError(f"row ids must lie in [0, {table_Rd.shape[0]}), got [{int(rows_U.min())}, "
                         f"{int(rows_U.max())}]")
    n_pow = powers.shape[1] - 1
    lib.engram_sparse_adam(table_Rd.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                           state["row_step"].data_ptr(), state["last_step"].data_ptr(), rows_U.data_ptr(),
                           g_Ud.data_ptr(), U, d, int(t), float(lr), float(betas[0]), float(betas[1]), float(eps),
                           float(weight_decay), tail.data_ptr(), tail.numel(), powers.data_ptr(), n_pow)
