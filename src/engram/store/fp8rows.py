"""fp8 rows in a store: packed e4m3 values + E8M0 scales on disk and in caches, dequantised on lookup.

A packed row is the row's ``d`` float8_e4m3fn bytes followed by its ``d / 32`` E8M0 bytes (byte ``b``
stands for the scale ``2 ** (b - 127)``), so one read fetches a row and everything needed to decode it,
and its CRC32C covers both. Stores and caches move packed rows as opaque bytes (a cache budget then
holds four times the rows of float32); :class:`Fp8Rows` sits at the front of such a chain and turns
each gather into float rows: ``value * 2 ** k`` per 32-channel block, computed in float32 (exact: a
power-of-two product only moves the exponent) and then cast to the requested dtype. That is the same
arithmetic as :func:`engram.v41.dequantize_fp8_rows`, so a served row equals the in-memory dequantised
row bit for bit (a test checks it).
"""

# Shapes: N rows gathered, d channels per row, S = d / 32 scale bytes per row, W = d + S packed bytes.

from __future__ import annotations

import os

import torch

from engram.store.base import RowStore, Then
from engram.store.format import FP8, FP8_BLOCK

__all__ = ["Fp8Rows", "dequantize_packed", "open_rows", "pack_fp8_rows"]

_E8M0_BIAS = 127
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack_fp8_rows(q_Nd: torch.Tensor, scale_NS: torch.Tensor) -> torch.Tensor:
    """Packed uint8 rows ``[N, W]`` of e4m3 values and their E8M0 scales (or the scales' uint8 bytes)."""
    if q_Nd.dtype != FP8:
        raise ValueError(f"values must be float8_e4m3fn, got {q_Nd.dtype}")
    if scale_NS.element_size() != 1 or scale_NS.shape != (q_Nd.shape[0], q_Nd.shape[1] // FP8_BLOCK):
        raise ValueError(f"scales must be 1-byte [N, d/{FP8_BLOCK}] for values {list(q_Nd.shape)}, got "
                         f"{scale_NS.dtype} {list(scale_NS.shape)}")
    return torch.cat([q_Nd.view(torch.uint8), scale_NS.view(torch.uint8)], dim=1)


def dequantize_packed(packed_NW: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32,
                      out_Nd: torch.Tensor | None = None) -> torch.Tensor:
    """Float rows ``[N, d]`` of packed uint8 rows ``[N, d + d/32]`` (into ``out_Nd`` when given)."""
    values = packed_NW[:, :dim].view(FP8).float().unflatten(-1, (dim // FP8_BLOCK, FP8_BLOCK))
    k_NS = packed_NW[:, dim:].to(torch.int32) - _E8M0_BIAS
    rows = (values * torch.exp2(k_NS.float()).unsqueeze(-1)).flatten(-2)
    if out_Nd is None:
        return rows.to(dtype)
    out_Nd.copy_(rows)  # the same rounding as .to(dtype)
    return out_Nd


class Fp8Rows(RowStore):
    """Dequantised rows of a store (or cache) that serves packed fp8 rows.

    Args:
        packed: a RowStore of ``uint8`` rows ``[R, d + d/32]`` (an fp8 :class:`DiskStore`, a
            :class:`CachedStore` or :class:`RamStore` of such rows).
        dim: ``d``, the channels of a row (a multiple of 32).
        dtype: what gathers return: float32 (default), bfloat16 or float16.
        own: :meth:`close` also closes ``packed``.

    ``stats()`` are the packed store's (their bytes are stored bytes: 264 per 256-wide row), and
    ``row_bytes`` is the stored row size, so cache budgets and offload figures count what is read.
    """

    def __init__(self, packed: RowStore, dim: int, dtype: torch.dtype = torch.float32, *, own: bool = True) -> None:
        super().__init__()
        if not isinstance(packed, RowStore) or packed.dtype != torch.uint8:
            raise ValueError(f"packed must be a RowStore of uint8 rows, got {packed!r}")
        if dim % FP8_BLOCK or packed.dim != dim + dim // FP8_BLOCK:
            raise ValueError(f"packed rows of {packed.dim} bytes do not hold {dim} fp8 channels and their scales")
        if dtype not in OUT_DTYPES:
            raise ValueError(f"fp8 rows dequantise to float32, bfloat16 or float16, not {dtype}")
        self.packed, self._dim, self._dtype, self.own = packed, int(dim), dtype, own
        self.tier = packed.tier

    num_rows = property(lambda self: self.packed.num_rows)
    dim = property(lambda self: self._dim)
    dtype = property(lambda self: self._dtype)
    row_bytes = property(lambda self: self.packed.row_bytes)
    backing = property(lambda self: getattr(self.packed, "backing", self.packed))

    def gather(self, rows_N, out_Nd: torch.Tensor | None = None) -> torch.Tensor:
        return self.gather_start(rows_N, out_Nd).result()

    def gather_start(self, rows_N, out_Nd: torch.Tensor | None = None):
        rows_N, out_Nd = self._prepare(rows_N, out_Nd, check_range=False)
        inner = self.packed.gather_start(rows_N)  # checks the ids' range
        return Then(inner, lambda: dequantize_packed(inner.result(), self._dim, self._dtype, out_Nd))

    def stats(self) -> dict[str, dict]:
        return self.packed.stats()

    def reset_stats(self) -> None:
        self.packed.reset_stats()

    def drop_page_cache(self) -> None:
        store = self.backing
        if hasattr(store, "drop_page_cache"):
            store.drop_page_cache()

    def close(self) -> None:
        if self.own:
            self.packed.close()

    def __repr__(self) -> str:
        return f"Fp8Rows({self.packed!r}, dim={self._dim}, dtype={self._dtype})"


def open_rows(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs) -> RowStore:
    """Open a store file for serving float rows: a :class:`DiskStore`, or for an fp8 store an
    :class:`Fp8Rows` over one that dequantises to ``dtype``. ``kwargs`` go to :class:`DiskStore`."""
    from engram.store.disk import DiskStore

    store = DiskStore(path, **kwargs)
    if store.header.dtype != FP8:
        return store
    try:
        return Fp8Rows(store, store.header.dim, dtype)
    except BaseException:
        store.close()
        raise

