"""fp8 table rows: float8_e4m3fn values with one power-of-two (E8M0) scale per 32 channels.

This is how the released checkpoint stores its Engram tables (a quarter of fp32's bytes).
A row block is divided by a power of two chosen so its largest magnitude fits e4m3's range
(448), then cast; lookup multiplies back. Power-of-two scales make the division exact, so
the only error is e4m3's own rounding (3 mantissa bits), and a row that is already
representable survives a round trip bit for bit.

Legend: R rows, D channels per row, S = D / 32 scale blocks per row.
"""

from __future__ import annotations

import torch

from .config import FP8_BLOCK

E4M3_MAX = 448.0
E8M0 = getattr(torch, "float8_e8m0fnu", None)  # absent from older torch: scales stay uint8 exponents
E4M3 = getattr(torch, "float8_e4m3fn", None)
_E8M0_BIAS = 127  # an E8M0 byte b stands for 2**(b - 127); 255 is NaN


def fp8_supported() -> bool:
    """Whether this torch has the e4m3 dtype the fp8 tables need."""
    return E4M3 is not None


def is_fp8(t: torch.Tensor) -> bool:
    return E4M3 is not None and t.dtype == E4M3


def scale_exponents(scale: torch.Tensor) -> torch.Tensor:
    """The unbiased int32 exponent k of each scale 2**k, from an E8M0 tensor or its uint8 bytes."""
    raw = scale.view(torch.uint8) if E8M0 is not None and scale.dtype == E8M0 else scale
    if raw.dtype != torch.uint8:
        # a float scale (e.g. a table loaded in a wider dtype): take its exponent exactly
        _, exp = torch.frexp(raw.float())
        return (exp - 1).to(torch.int32)
    return raw.to(torch.int32) - _E8M0_BIAS


def quantize_fp8_rows(rows_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows to (q_RD float8_e4m3fn, scale_RS float8_e8m0fnu).

    Each block's scale is the smallest power of two with amax / scale <= 448, so nothing
    saturates; an all-zero block gets the smallest scale. Where torch lacks float8_e8m0fnu
    the scales come back as their uint8 E8M0 bytes (same bits).
    """
    if E4M3 is None:
        raise RuntimeError("this torch has no float8_e4m3fn; fp8 tables need torch >= 2.1")
    R, D = rows_RD.shape
    if D % FP8_BLOCK:
        raise ValueError(f"row width {D} is not a multiple of the fp8 block ({FP8_BLOCK})")
    blocks = rows_RD.detach().float().reshape(R, D // FP8_BLOCK, FP8_BLOCK)
    amax_RS = blocks.abs().amax(-1)
    # ceil(log2(amax / 448)), from frexp so it is exact at powers of two: amax/448 = m * 2**e
    # with m in [0.5, 1), so the ceiling is e, or e - 1 when m is exactly 0.5
    mant, exp = torch.frexp(amax_RS / E4M3_MAX)
    k_RS = torch.where(mant == 0.5, exp - 1, exp)
    k_RS = torch.where(amax_RS > 0, k_RS, torch.full_like(k_RS, -_E8M0_BIAS))
    k_RS = k_RS.clamp(-_E8M0_BIAS, _E8M0_BIAS)
    scaled = blocks * torch.exp2(-k_RS.float()).unsqueeze(-1)
    q_RD = scaled.clamp(-E4M3_MAX, E4M3_MAX).reshape(R, D).to(E4M3)
    bytes_RS = (k_RS + _E8M0_BIAS).to(torch.uint8)
    return q_RD, (bytes_RS.view(E8M0) if E8M0 is not None else bytes_RS)


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows back in `dtype`: q [..., D] times 2**k per 32-channel block (scale [..., D/32])."""
    D = q.shape[-1]
    k = scale_exponents(scale)
    if k.shape[-1] * FP8_BLOCK != D:
        raise ValueError(f"{k.shape[-1]} scales per row do not cover {D} channels in blocks of {FP8_BLOCK}")
    blocks = q.float().unflatten(-1, (D // FP8_BLOCK, FP8_BLOCK))
    # ldexp-style scaling: multiplying by an exact power of two adds to the exponent only
    out = blocks * torch.exp2(k.float()).unsqueeze(-1)
    return out.flatten(-2).to(dtype)
