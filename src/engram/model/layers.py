"""Backbone building blocks: RMSNorm, rotary embeddings, causal self-attention with a KV cache, SwiGLU."""

# Shapes: B batch, T time (new tokens), S cached + new keys, D model width, nh attention heads,
# hd head width, Hid MLP hidden width, L layers.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learnable gain (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}"


class Rotary(nn.Module):
    """Rotary position embeddings (half-split "NeoX" layout) with precomputed cos/sin tables.

    The tables are non-persistent buffers: derived from ``(head_dim, max_seq_len, theta)``, so
    checkpoints do not carry them and they follow ``.to(device)``.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp64, stored fp32: large positions keep their precision.
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles_TF = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        return angles_TF.cos().float(), angles_TF.sin().float()

    def forward(self, x_BhTd: torch.Tensor, offset: int = 0, positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``[B, nh, T, hd]`` queries or keys sitting at positions ``offset .. offset+T-1``, or at
        ``positions_BT`` (per sequence, e.g. a padded batch's; each below ``max_seq_len``, unchecked)."""
        T = x_BhTd.shape[-2]
        if offset + T > self.max_seq_len:
            raise ValueError(f"positions up to {offset + T} exceed max_seq_len={self.max_seq_len}")
        if positions_BT is None:
            cos, sin = self.cos[offset : offset + T], self.sin[offset : offset + T]
        else:  # the same table entries, gathered per sequence: [B, 1, T, hd/2]
            cos, sin = self.cos[positions_BT].unsqueeze(1), self.sin[positions_BT].unsqueeze(1)
        x1, x2 = x_BhTd.float().chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x_BhTd.dtype)


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    ``k[layer]``/``v[layer]`` are ``[B, nh, max_len, hd]``, allocated on the first write so they
    take the dtype/device the attention actually produces (e.g. bf16 under autocast).
    ``length`` counts the positions already written; every layer writes the same chunk, then the
    caller calls :meth:`advance` once.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int) -> None:
        self.n_layers, self.batch_size, self.n_heads = n_layers, batch_size, n_heads
        self.max_len, self.head_dim = max_len, head_dim
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def update(self, layer: int, k_BhTd: torch.Tensor, v_BhTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk at ``[length, length+T)`` and return all keys/values ``[B, nh, S, hd]``."""
        B, nh, T, hd = k_BhTd.shape
        if (B, nh, hd) != (self.batch_size, self.n_heads, self.head_dim):
            raise ValueError(f"KV cache was built for [B={self.batch_size}, nh={self.n_heads}, hd={self.head_dim}], "
                             f"got keys of shape {tuple(k_BhTd.shape)}")
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        if self.k[layer] is None or self.k[layer].dtype != k_BhTd.dtype or self.k[layer].device != k_BhTd.device:
            shape = (B, nh, self.max_len, hd)
            old_k, old_v = self.k[layer], self.v[layer]
            self.k[layer] = k_BhTd.new_zeros(shape)
            self.v[layer] = v_BhTd.new_zeros(shape)
            if old_k is not None and self.length:  # dtype switched mid-sequence: keep the history
                self.k[layer][:, :, : self.length] = old_k[:, :, : self.length]
                self.v[layer][:, :, : self.length] = old_v[:, :, : self.length]
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf[:, :, self.length : end] = k_BhTd
        v_buf[:, :, self.length : end] = v_BhTd
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as written (after every layer has seen the chunk)."""
        self.length += n


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE and ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, rotary: Rotary) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # Shared by all layers; stored as a tuple so it is not registered once per layer.
        self._rotary = (rotary,)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None, layer: int = 0, *,
                positions_BT: torch.Tensor | None = None, attn_mask_B1TS: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over ``x`` (positions ``cache.length ..`` when a cache is given) and return ``[B, T, D]``.

        A padded batch gives its tokens' RoPE ``positions_BT`` and which keys (cached + new) each query
        may see, ``attn_mask_B1TS`` (bool; see :mod:`engram.model.padding`); both or neither.
        """
        B, T, D = x_BTD.shape
        rotary = self._rotary[0]
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        offset = 0 if cache is None else cache.length
        q, k = rotary(q, offset, positions_BT), rotary(k, offset, positions_BT)
        if attn_mask_B1TS is not None:
            k_all, v_all = (k, v) if cache is None else cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask_B1TS)
        elif cache is None or offset == 0:
            if cache is not None:
                cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_all, v_all = cache.update(layer, k, v)
            if T == 1:  # the newest token sees every cached position
                y = F.scaled_dot_product_attention(q, k_all, v_all)
            else:
                # A chunk after a prefix: SDPA's is_causal aligns top-left, so spell the mask out.
                S = k_all.shape[2]
                q_pos = torch.arange(offset, offset + T, device=x_BTD.device)
                mask_TS = torch.arange(S, device=x_BTD.device)[None, :] <= q_pos[:, None]
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask_TS)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate x) * W_up x)`` with gate and up fused into one matmul."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)
