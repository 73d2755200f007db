"""Hyper-connections (Zhu et al. 2024): M learned residual branches instead of one residual stream."""

# Shapes: B batch, T time, M residual branches, D model width.

from __future__ import annotations

import torch
from torch import nn

from engram.model.layers import RMSNorm


class HyperConnection(nn.Module):
    """Mixes a sublayer into an ``[B, T, M, D]`` residual state.

    For sublayer ``f`` (norm + attention or MLP)::

        x   = sum_m a_m h_m                       # width connection: the sublayer's input
        y   = f(x)
        h'_m = sum_n R_mn h_n + b_m y             # depth connection

    Static form (always on): ``a`` starts one-hot at branch ``layer_index % M``, ``R`` at the
    identity and ``b`` at ones, so with ``M = 1`` the block is exactly ``h + f(h)``, a plain
    pre-norm residual block. The optional dynamic part adds input-dependent terms
    ``s * tanh(RMSNorm(h_n) @ W)`` with ``W`` zero-initialised (so it starts as the static form)
    and ``s`` the paper's small scales (0.01).

    The mixing runs in the residual state's dtype with autocast off: the residual stream is
    kept in full precision even when the sublayers run in bf16.

    Use: ``x, coeffs = hc.width(h)``; ``y = f(x)``; ``h = hc.depth(h, y, coeffs)``.

    Args:
        dim: ``D``.
        n_branches: ``M``.
        layer_index: which sublayer this is (counting attention and MLP sublayers separately);
            picks the branch ``a`` starts on, so consecutive sublayers read different branches.
        dynamic: add the input-dependent part.
        eps: epsilon of the dynamic part's RMSNorm.
    """

    def __init__(self, dim: int, n_branches: int, layer_index: int, *, dynamic: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if n_branches < 1:
            raise ValueError(f"n_branches must be >= 1, got {n_branches}")
        M = n_branches
        self.dim, self.n_branches, self.layer_index, self.dynamic = dim, M, layer_index, dynamic
        a_M = torch.zeros(M)
        a_M[layer_index % M] = 1.0
        self.static_a = nn.Parameter(a_M)
        self.static_r = nn.Parameter(torch.eye(M))
        self.static_b = nn.Parameter(torch.ones(M))
        if dynamic:
            self.norm = RMSNorm(dim, eps)
            # Columns: [a | R row (M) | b] computed from each branch's own normalised state.
            self.dyn_w = nn.Parameter(torch.zeros(dim, M + 2))
            self.dyn_scale_a = nn.Parameter(torch.full((), 0.01))
            self.dyn_scale_b = nn.Parameter(torch.full((), 0.01))

    def reset_parameters(self) -> None:
        """Back to the static init (and a zero dynamic part)."""
        M = self.n_branches
        with torch.no_grad():
            self.static_a.zero_()
            self.static_a[self.layer_index % M] = 1.0
            self.static_r.copy_(torch.eye(M))
            self.static_b.fill_(1.0)
            if self.dynamic:
                self.norm.weight.fill_(1.0)
                self.dyn_w.zero_()
                self.dyn_scale_a.fill_(0.01)
                self.dyn_scale_b.fill_(0.01)

    def width(self, h_BTMD: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Return the sublayer input ``x_BTD`` and the ``(R, b)`` coefficients for :meth:`depth`."""
        M = self.n_branches
        if h_BTMD.dim() != 4 or h_BTMD.shape[2] != M:
            raise ValueError(f"hyper-connection state must be [B, T, M={M}, D], got {tuple(h_BTMD.shape)}")
        with torch.autocast(h_BTMD.device.type, enabled=False):
            dt = h_BTMD.dtype
            if not self.dynamic:
                a, r, b = self.static_a.to(dt), self.static_r.to(dt), self.static_b.to(dt)
                # einsum folds (B, T, D) into one GEMM; broadcast matmul would run B*T tiny ones (4x slower).
                x_BTD = torch.einsum("m,btmd->btd", a, h_BTMD)
                return x_BTD, (r, b[:, None])
            # d[..., n, :] comes from branch n: its input weight, outgoing R weights, output weight.
            d_BTMC = torch.tanh(torch.matmul(self.norm(h_BTMD), self.dyn_w.to(dt)))
            a_BTM = self.static_a.to(dt) + self.dyn_scale_a.to(dt) * d_BTMC[..., 0]
            # R[m, n] weights h_n into h'_m; the dynamic row of branch n sits in column n.
            r_BTMM = self.static_r.to(dt) + self.dyn_scale_a.to(dt) * d_BTMC[..., 1 : M + 1].transpose(-1, -2)
            b_BTM = self.static_b.to(dt) + self.dyn_scale_b.to(dt) * d_BTMC[..., M + 1]
            x_BTD = torch.matmul(a_BTM.unsqueeze(-2), h_BTMD).squeeze(-2)
            return x_BTD, (r_BTMM, b_BTM.unsqueeze(-1))

    def depth(self, h_BTMD: torch.Tensor, y_BTD: torch.Tensor,
              coeffs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """New residual state ``h'_m = sum_n R_mn h_n + b_m y``."""
        r, b = coeffs
        with torch.autocast(h_BTMD.device.type, enabled=False):
            if r.dim() == 2:  # static: one [M, M] matrix for every token
                mixed = torch.einsum("mn,btnd->btmd", r, h_BTMD)
            else:
                mixed = torch.matmul(r, h_BTMD)
            return mixed + b * y_BTD.unsqueeze(-2).to(h_BTMD.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, branches={self.n_branches}, layer_index={self.layer_index}, dynamic={self.dynamic}"
