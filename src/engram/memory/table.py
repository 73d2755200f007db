"""One flat embedding table per Engram layer, holding every hash head side by side."""

# Shapes: B batch, T time, H hash heads, d row width (``dim``); "..." is any leading shape.

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engram.memory import native_gather
from engram.memory.hugepages import advise_hugepages

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


class MultiHeadTable(nn.Module):
    """All hash heads of one Engram layer in a single ``[sum(head_sizes), dim]`` table.

    Head ``h`` owns rows ``[offsets[h], offsets[h] + head_sizes[h])``. Callers pass per-head
    row ids (what the hash produces, in ``[0, head_sizes[h])``) and the table adds the
    offsets, so hashing code never needs to know how heads are packed.

    One flat table (instead of H separate ``nn.Embedding``) means one gather kernel and one
    sparse gradient per layer, whatever the number of heads.

    Args:
        head_sizes: rows per hash head (primes in Engram, but any size >= 1 works).
        dim: row width ``d``.
        dtype: storage dtype, ``torch.float32`` or ``torch.bfloat16``.
        sparse: if True the weight gradient is a sparse COO tensor holding only touched rows.
        init_std: rows are initialised from ``N(0, init_std**2)``.
        device: where to allocate the table.
    """

    def __init__(
        self,
        head_sizes: Sequence[int],
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        sparse: bool = True,
        init_std: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in head_sizes]
        if len(sizes) == 0:
            raise ValueError("head_sizes must be non-empty (one size per hash head)")
        for h, s in enumerate(sizes):
            if s < 1:
                raise ValueError(f"head_sizes[{h}] must be >= 1, got {s}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"table dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")

        self._head_sizes = tuple(sizes)
        self._dim = int(dim)
        self.sparse = bool(sparse)
        self.init_std = float(init_std)

        sizes_H = torch.tensor(sizes, dtype=torch.int64, device=device)
        offsets_H = torch.cumsum(sizes_H, 0) - sizes_H
        # Non-persistent: both are derived from the constructor arguments, so checkpoints hold
        # only the weight (a head-size mismatch then shows up as a weight shape mismatch).
        self.register_buffer("offsets", offsets_H, persistent=False)
        self.register_buffer("head_sizes", sizes_H, persistent=False)

        weight = torch.empty(sum(sizes), self._dim, dtype=dtype, device=device)
        # Before the first touch: huge pages only back pages faulted in after the advice.
        self.hugepage_bytes = advise_hugepages(weight)
        self.weight = nn.Parameter(weight)
        # Reused by gather_into(); a plain attribute (not a buffer) so it never lands in
        # state_dict and is simply reallocated if the device or shape changes.
        self._idx_buf: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every row from ``N(0, init_std**2)``."""
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    # ------------------------------------------------------------------ properties
    @property
    def num_rows(self) -> int:
        """Total rows over all heads, ``sum(head_sizes)``."""
        return self.weight.shape[0]

    @property
    def num_heads(self) -> int:
        """Number of hash heads ``H``."""
        return len(self._head_sizes)

    @property
    def dim(self) -> int:
        """Row width ``d``."""
        return self._dim

    @property
    def nbytes(self) -> int:
        """Bytes held by the weight (buffers are negligible)."""
        return self.weight.numel() * self.weight.element_size()

    # ------------------------------------------------------------------ validation
    def check_rows(self, rows: torch.Tensor) -> None:
        """Raise if ``rows`` is not a valid ``[..., H]`` tensor of per-head row ids.

        Raises:
            TypeError: ``rows`` is not an integer tensor.
            ValueError: wrong last dimension, or an id outside ``[0, head_sizes[h])``.
        """
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"row ids must be an integer tensor, got {type(rows).__name__}")
        if not _is_integer_dtype(rows.dtype):
            raise TypeError(f"row ids must be an integer tensor, got {rows.dtype}")
        H = self.num_heads
        if rows.dim() == 0 or rows.shape[-1] != H:
            raise ValueError(
                f"row ids must have last dimension H={H} (one id per hash head), "
                f"got shape {tuple(rows.shape)}"
            )
        if rows.numel() == 0:
            return
        lo_H, hi_H = torch.aminmax(rows.reshape(-1, H), dim=0)
        sizes_H = self.head_sizes.to(rows.device)
        bad_H = (lo_H < 0) | (hi_H.to(torch.int64) >= sizes_H)
        if rows.device.type != "cpu":
            # No host sync on an accelerator: the device raises when the kernel runs.
            torch._assert_async(~bad_H.any(), "row id out of range for its hash head (check_rows on the CPU names it)")
            return
        if bool(bad_H.any()):
            h = int(torch.nonzero(bad_H)[0, 0])
            value = int(lo_H[h]) if int(lo_H[h]) < 0 else int(hi_H[h])
            raise ValueError(
                f"row id out of range for head {h}: got {value}, allowed range is "
                f"[0, {self._head_sizes[h]})"
            )

    # ------------------------------------------------------------------ lookup
    def forward(self, rows_BTH: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Gather one row per head: ``[..., H]`` per-head ids -> ``[..., H, d]`` embeddings.

        Differentiable; with ``sparse=True`` the weight gradient is sparse. Where no gradient is needed
        and the native kernel applies (CPU, contiguous int64 ids) it gathers with that kernel, which
        checks every id against its head as it copies. ``validate=False`` skips :meth:`check_rows` for
        trusted ids (e.g. the hasher's); on an accelerator the check never syncs with the host.
        """
        if not (torch.is_grad_enabled() and self.weight.requires_grad) and self._native_applies(rows_BTH):
            out_BTHd = torch.empty((*rows_BTH.shape, self._dim), dtype=self.weight.dtype)
            return self._native_gather(rows_BTH, out_BTHd)
        if validate:
            self.check_rows(rows_BTH)
        idx_BTH = rows_BTH.to(torch.int64) + self.offsets
        return F.embedding(idx_BTH, self.weight, sparse=self.sparse)

    def _native_applies(self, rows_BTH: torch.Tensor) -> bool:
        return (
            self.weight.device.type == "cpu"
            and isinstance(rows_BTH, torch.Tensor)
            and rows_BTH.device.type == "cpu"
            and rows_BTH.dtype == torch.int64
            and rows_BTH.dim() > 0
            and rows_BTH.shape[-1] == self.num_heads
            and rows_BTH.is_contiguous()
            and self.weight.is_contiguous()
            and native_gather.available()
        )

    def _native_gather(self, rows_BTH: torch.Tensor, out_BTHd: torch.Tensor) -> torch.Tensor:
        bad = native_gather.gather(self.weight.detach(), rows_BTH, self.offsets, self.head_sizes, out_BTHd)
        if bad >= 0:
            self.check_rows(rows_BTH)  # raises with the head and value
            raise RuntimeError(f"native gather stopped at id position {bad}, which check_rows accepts")
        return out_BTHd

    @torch.no_grad()
    def gather_into(
        self, rows_BTH: torch.Tensor, out_BTHd: torch.Tensor, *, validate: bool = False
    ) -> torch.Tensor:
        """Allocation-free gather into a preallocated ``out_BTHd`` (inference/benchmarks only).

        No autograd, nothing allocated in steady state. On the CPU with contiguous int64 ids
        this runs :mod:`engram.memory.native_gather` (prefetching C kernel over
        ``torch.get_num_threads()`` threads, 1.5-2x ``index_select`` for 128-byte rows); it
        checks each id against its head's size for free and raises ``ValueError`` on a bad one.
        Otherwise (other devices or id dtypes, no C compiler) it adds the offsets into a reused
        int64 index buffer and calls ``index_select(out=)``; validation is then off by default
        (the hot path), and an id past its head silently reads a neighbouring head's row.
        Both paths equal ``weight[rows + offsets]`` bit for bit. Returns ``out_BTHd``.
        """
        if validate:
            self.check_rows(rows_BTH)
        expected = (*rows_BTH.shape, self._dim)
        if tuple(out_BTHd.shape) != expected:
            raise ValueError(f"out must have shape {expected}, got {tuple(out_BTHd.shape)}")
        if out_BTHd.dtype != self.weight.dtype:
            raise ValueError(f"out must have the table dtype {self.weight.dtype}, got {out_BTHd.dtype}")
        if not out_BTHd.is_contiguous():
            raise ValueError("out must be contiguous (it is written through a flat view)")

        weight = self.weight
        if out_BTHd.device.type == "cpu" and self._native_applies(rows_BTH):
            return self._native_gather(rows_BTH, out_BTHd)

        buf = self._idx_buf
        n = rows_BTH.numel()
        if buf is None or buf.numel() != n or buf.device != weight.device:
            buf = torch.empty(n, dtype=torch.int64, device=weight.device)
            self._idx_buf = buf
        idx_BTH = buf.view(rows_BTH.shape)
        torch.add(rows_BTH, self.offsets, out=idx_BTH)
        torch.index_select(weight, 0, buf, out=out_BTHd.view(-1, self._dim))
        return out_BTHd

    def extra_repr(self) -> str:
        sizes = self._head_sizes
        shown = ", ".join(str(s) for s in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        return (
            f"heads={self.num_heads}, head_sizes=[{shown}], rows={self.num_rows}, dim={self._dim}, "
            f"dtype={self.weight.dtype}, sparse={self.sparse}"
        )
