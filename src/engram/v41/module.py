"""The V4.1 Engram layer: hashed n-gram rows gated into each hyper-connection stream.

Per token, the C rows its hash ids select are concatenated and projected once (`wkv`, no
bias) into hc keys, one per residual stream, and one value shared by all streams. Stream k
takes the value with gate
    g_k = sigmoid(ssqrt(<h_k * w_k, key_k> / (rms(h_k) * rms(key_k) * sqrt(D)))),
    w_k = q_weight_k * k_weight_k,  ssqrt(x) = sign(x) * sqrt(max(|x|, 1e-6)),
the rms taken over D per (token, stream) with the model's eps. A token whose mask is False
gets g = 0 and passes through unchanged. Unlike the demo flavour there is no short
convolution and no per-stream value: the gate alone decides how much memory enters.

Legend: B batch, T tokens, H hc streams, D hidden size, C ids per token, E table row width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FP8_BLOCK, V41Config
from .fp8 import E8M0, dequantize_fp8_rows, is_fp8

GATE_CLAMP = 1e-6  # floor of |dot| under the signed square root


def _unit_scales(rows: int, blocks: int) -> torch.Tensor:
    """Scales of 2**0 in E8M0 (uint8 bytes 127 where torch lacks the dtype)."""
    raw = torch.full((rows, blocks), 127, dtype=torch.uint8)
    return raw.view(E8M0) if E8M0 is not None else raw


def v41_gate(h_BTHD: torch.Tensor, key_BTHD: torch.Tensor, q_weight_HD: torch.Tensor, k_weight_HD: torch.Tensor,
             eps: float) -> torch.Tensor:
    """Per (token, stream) gate in (0, 1), float32 [B, T, H] (the formula of the module docstring)."""
    D = h_BTHD.shape[-1]
    w_HD = q_weight_HD.float() * k_weight_HD.float()
    inv_rms = torch.rsqrt(h_BTHD.square().mean(-1) + eps) * torch.rsqrt(key_BTHD.square().mean(-1) + eps)
    dot = (h_BTHD * w_HD * key_BTHD).sum(-1) * inv_rms / D**0.5
    return torch.sigmoid(torch.copysign(dot.abs().clamp_min(GATE_CLAMP).sqrt(), dot))


def v41_increment(rows_BTX: torch.Tensor, h_BTHD: torch.Tensor, wkv_weight: torch.Tensor,
                  q_weight_HD: torch.Tensor, k_weight_HD: torch.Tensor, eps: float,
                  token_mask: torch.Tensor | None = None, *, return_gates: bool = False):
    """What the V4.1 layer adds to the streams: float32 [B, T, H, D], zero where the mask is False.

    rows_BTX: the concatenated rows of each token's C ids (X = C * E), in any float dtype.
    h_BTHD: the streams in float32. The one implementation of the V4.1 mixing, shared by
    :class:`V41Engram` (which adds it to the streams) and the LM's V4.1 layer (whose rows come
    from a memory provider and whose blocks add increments). With ``return_gates`` also the
    gates [B, T, H] (zero where masked).
    """
    H, D = h_BTHD.shape[-2:]
    kv = F.linear(rows_BTX.to(wkv_weight.dtype), wkv_weight).float()
    key_BTHD = kv[..., : H * D].unflatten(-1, (H, D))
    value_BTD = kv[..., H * D:]
    g_BTH = v41_gate(h_BTHD, key_BTHD, q_weight_HD, k_weight_HD, eps)
    inc = g_BTH.unsqueeze(-1) * value_BTD.unsqueeze(2)
    if token_mask is not None:
        # where, not a multiply: a shut gate passes the streams through exactly, even if
        # the (unused) memory row holds non-finite values
        live = token_mask.to(inc.device, torch.bool)
        inc = torch.where(live[:, :, None, None], inc, torch.zeros_like(inc))
        g_BTH = torch.where(live[:, :, None], g_BTH, torch.zeros_like(g_BTH))
    return (inc, g_BTH) if return_gates else inc


class V41EngramTable(nn.Module):
    """One layer's table: `weight` [R, E] plus `scale` [R, E/32], dequantised on lookup.

    Loading an fp8 state dict (float8_e4m3fn rows, float8_e8m0fnu or uint8 scales) keeps the
    table in fp8, a quarter of fp32's memory; lookup gathers the rows and their scales and
    multiplies. Loading a float (fp32/bf16) table switches to that dtype and `scale` is then
    unused: it may be absent from the state dict, and any value given is ignored.
    """

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("scale", _unit_scales(num_embeddings, dim // FP8_BLOCK))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # nn.Module copies into the existing tensors, which would cast fp8 rows up (or float rows
        # down): adopt the incoming dtype instead, so the table stays in the form it was stored in.
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != self.weight.dtype and w.shape == self.weight.shape:
            self.weight = nn.Parameter(torch.empty_like(w, device=self.weight.device),
                                       requires_grad=w.is_floating_point() and not is_fp8(w))
        s = state_dict.get(prefix + "scale")
        if s is not None and s.dtype != self.scale.dtype and s.shape == self.scale.shape:
            self.scale = torch.empty_like(s, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if w is not None and not is_fp8(w) and prefix + "scale" in missing_keys:
            missing_keys.remove(prefix + "scale")  # a float table needs no scales

    def _apply(self, fn, recurse=True):
        # `module.to(torch.bfloat16)` casts every floating tensor, fp8 included: the rows would
        # become bare e4m3 values with their scales forgotten. Give fn byte views instead, so
        # device moves happen and dtype casts pass an fp8 table by.
        if not is_fp8(self.weight):
            return super()._apply(fn, recurse)
        w_dtype, s_dtype = self.weight.dtype, self.scale.dtype
        w = fn(self.weight.detach().view(torch.uint8))
        s = fn(self.scale.view(torch.uint8)) if self.scale.element_size() == 1 else fn(self.scale)
        self.weight = nn.Parameter(w.view(w_dtype), requires_grad=False)
        self.scale = s.view(s_dtype) if s.dtype == torch.uint8 else s
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [..., E] of `ids`, in float32 for an fp8 table, else in the table's dtype."""
        if is_fp8(self.weight):
            # gather through byte views: index kernels need not know the fp8 dtypes
            q = self.weight.view(torch.uint8)[ids].view(self.weight.dtype)
            scale = self.scale
            s = scale.view(torch.uint8)[ids].view(scale.dtype) if scale.element_size() == 1 else scale[ids]
            return dequantize_fp8_rows(q, s)
        return F.embedding(ids, self.weight)


class V41Engram(nn.Module):
    """The Engram of transformer layer `layer_id` (its real id, e.g. 14), with the released
    parameter names: `embed.weight`, `embed.scale`, `wkv.weight`, `q_weight`, `k_weight`.

    `forward(hidden_streams [B, T, H, D], hash_ids [B, T, C], token_mask [B, T] or None)`
    returns the updated streams [B, T, H, D] in the input's dtype; `hash_ids` is this layer's
    slice of `V41Hasher` output. The arithmetic runs in float32.

    `table=False` builds the layer without its table (`embed` is None, nothing allocated: the
    released tables are ~100 GB), for serving its rows from elsewhere: `forward(..., emb=rows)`
    then takes the rows [B, T, C, E] of `hash_ids` already looked up (e.g. from a row store).
    """

    def __init__(self, config: V41Config, layer_id: int, *, table: bool = True):
        super().__init__()
        self.layer_id = layer_id
        self.layer_index = config.layer_index(layer_id)
        self.hc, self.D = config.hc_mult, config.hidden_size
        self.n_cols = config.n_hash_cols
        self.eps = config.rms_norm_eps
        self.head_dim = config.engram_head_dim
        self.embed = V41EngramTable(config.engram_num_embeddings[self.layer_index], config.engram_head_dim) \
            if table else None
        self.wkv = nn.Linear(self.n_cols * config.engram_head_dim, self.D * (self.hc + 1), bias=False)
        # the gate only ever sees their product; two factors because the checkpoint has two
        self.q_weight = nn.Parameter(torch.ones(self.hc, self.D))
        self.k_weight = nn.Parameter(torch.ones(self.hc, self.D))

    def gate(self, h_BTHD: torch.Tensor, key_BTHD: torch.Tensor) -> torch.Tensor:
        """Per (token, stream) gate in (0, 1), float32 [B, T, H]."""
        return v41_gate(h_BTHD, key_BTHD, self.q_weight, self.k_weight, self.eps)

    def forward(self, hidden_streams: torch.Tensor, hash_ids: torch.Tensor,
                token_mask: torch.Tensor | None = None, *, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, T, H, D = hidden_streams.shape
        if (H, D) != (self.hc, self.D):
            raise ValueError(f"hidden_streams must be [B, T, {self.hc}, {self.D}], got {tuple(hidden_streams.shape)}")
        if hash_ids.shape != (B, T, self.n_cols):
            raise ValueError(f"hash_ids must be [{B}, {T}, {self.n_cols}], got {tuple(hash_ids.shape)}")
        if emb is None:
            if self.embed is None:
                raise ValueError("this layer was built without its table (table=False): pass emb=, the rows of "
                                 "hash_ids looked up elsewhere")
            emb = self.embed(hash_ids)
        elif emb.shape != (B, T, self.n_cols, self.head_dim):
            raise ValueError(f"emb must be [{B}, {T}, {self.n_cols}, {self.head_dim}], got {tuple(emb.shape)}")
        rows_BTX = emb.flatten(-2)
        h = hidden_streams.float()
        out = h + v41_increment(rows_BTX, h, self.wkv.weight, self.q_weight, self.k_weight, self.eps, token_mask)
        return out.to(hidden_streams.dtype)
