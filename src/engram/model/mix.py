"""Everything an Engram layer computes after the lookup: gate, value, short convolution.

Two implementations of one function, ``(e, h) -> (h's increment, gates, conv state)``:

* :func:`engram_mix` composes torch ops and lets autograd differentiate them. It is the form
  ``torch.compile`` fuses (training with ``compile_engram``) and the one used for dtypes other than
  float32 (bf16 autocast).
* :class:`FusedMix`, an ``autograd.Function`` with a hand-written backward, for float32 eager runs
  (CPU training and all float32 inference, decoding included). Written plainly, the math makes ~25 passes
  over ``[B, T, M, D]`` tensors forward and autograd adds zero-filled full-size gradients for every
  shifted slice of the conv; here the norms are single-pass reductions, the key/query norms are folded
  into the gate's dot product (the normalised key and query are never materialised), the conv input's
  norm comes from the value's (``u = g * v`` so ``mean(u^2) = g^2 mean(v^2)``), and the conv reads
  shifted slices in place with no history buffer. On CPU the steps around the two projections run as
  C kernels (:mod:`engram.model.native_mix`: one pass each, no full-size temporaries); the torch code
  below is their fallback where no C compiler works or ``ENGRAM_NATIVE_MIX=0``.

Both follow the same equations (see :class:`engram.model.engram.Engram`); they agree to float rounding.
"""

# Shapes: B batch, T time, E = H*d gathered row width, M residual branches, D model width, N = B*T,
# C = M*D conv channels, k conv taps, P = (k-1)*dilation conv history.

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from engram.model import native_mix

__all__ = ["FusedMix", "compiled_engram_mix", "conv_taps", "engram_mix", "fused_mix_applies", "short_conv"]

_GATE_FLOOR = 1e-6  # |s| is clamped here before the square root, so its gradient stays finite at s = 0


def conv_taps(x_BTC: torch.Tensor, w_kC: torch.Tensor, dilation: int,
              state_BPC: torch.Tensor | None = None, state_w_kC: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise conv ``y_t = sum_j w_j * x_{t - (k-1-j)*dilation}`` over ``state`` then ``x``.

    Shifted slices are accumulated in place (shift 0 first), so no padded copy of ``x`` is made; a
    position's terms are added in the same order whether its history comes from ``state`` or from ``x``.
    ``state=None`` is an all-zero history; ``state_w_kC`` (default ``w_kC``) weighs the state's taps,
    for a state kept in other units than ``x``.
    """
    state_w_kC = w_kC if state_w_kC is None else state_w_kC
    T, k = x_BTC.shape[1], w_kC.shape[0]
    P = (k - 1) * dilation
    y_BTC = torch.mul(x_BTC, w_kC[k - 1])
    for j in range(k - 2, -1, -1):
        s = (k - 1 - j) * dilation
        if s < T:
            y_BTC[:, s:].addcmul_(x_BTC[:, : T - s], w_kC[j])
        if state_BPC is not None:
            n = min(s, T)
            y_BTC[:, :n].addcmul_(state_BPC[:, P - s : P - s + n], state_w_kC[j])
    return y_BTC


def _conv_taps_backward(dy_BTC: torch.Tensor, x_BTC: torch.Tensor, w_kC: torch.Tensor, dilation: int,
                        state_BPC: torch.Tensor | None, state_w_kC: torch.Tensor | None):
    """Gradients of :func:`conv_taps`: ``(dx_BTC, dw_kC, dstate_BPC or None, dstate_w_kC or None)``."""
    T, k = x_BTC.shape[1], w_kC.shape[0]
    P = (k - 1) * dilation
    dx_BTC = torch.mul(dy_BTC, w_kC[k - 1])
    dw_kC = torch.zeros_like(w_kC)
    dw_kC[k - 1] = torch.linalg.vecdot(dy_BTC, x_BTC, dim=1).sum(0)
    dstate_BPC = dstate_w_kC = None
    if state_BPC is not None:
        dstate_BPC, dstate_w_kC = torch.zeros_like(state_BPC), torch.zeros_like(state_w_kC)
    for j in range(k - 2, -1, -1):
        s = (k - 1 - j) * dilation
        if s < T:
            dx_BTC[:, : T - s].addcmul_(dy_BTC[:, s:], w_kC[j])
            dw_kC[j] = torch.linalg.vecdot(dy_BTC[:, s:], x_BTC[:, : T - s], dim=1).sum(0)
        if state_BPC is not None:
            n = min(s, T)
            dstate_w_kC[j] = torch.linalg.vecdot(dy_BTC[:, :n], state_BPC[:, P - s : P - s + n], dim=1).sum(0)
            dstate_BPC[:, P - s : P - s + n].addcmul_(dy_BTC[:, :n], state_w_kC[j])
    return dx_BTC, dw_kC, dstate_BPC, dstate_w_kC


def _next_state(x_BTC: torch.Tensor, state_BPC: torch.Tensor | None, P: int) -> torch.Tensor:
    """The last ``P`` conv inputs after this chunk (copied: it outlives the chunk's activations)."""
    B, T, C = x_BTC.shape
    if T >= P:
        return x_BTC[:, T - P :].clone()
    prev = state_BPC if state_BPC is not None else x_BTC.new_zeros(B, P, C)
    return torch.cat([prev[:, T:].to(x_BTC.dtype), x_BTC], dim=1)


def short_conv(x_BTMD: torch.Tensor, norm_w_MD: torch.Tensor, w_C1k: torch.Tensor, dilation: int,
               eps: float | None, state_BPC: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`~engram.model.engram.ShortConv` as a function of its weights:
    ``(silu(conv(rmsnorm(x))), new_state_BPC)``."""
    B, T, M, D = x_BTMD.shape
    P = (w_C1k.shape[-1] - 1) * dilation
    xn_BTC = (F.rms_norm(x_BTMD, (D,), eps=eps) * norm_w_MD).reshape(B, T, M * D)
    xn_BTC = xn_BTC if xn_BTC.is_contiguous() else xn_BTC.contiguous()
    w_kC = w_C1k[:, 0, :].t().to(xn_BTC.dtype)
    if state_BPC is not None:
        state_BPC = state_BPC.to(xn_BTC.dtype)
    if torch.is_grad_enabled() and xn_BTC.requires_grad:
        # Autograd through in-place slice updates would zero-fill a full-size gradient per tap; the
        # padded copy costs one pass instead. (FusedMix, the float32 path, avoids both.)
        full_BLC = torch.cat([state_BPC if state_BPC is not None else xn_BTC.new_zeros(B, P, M * D), xn_BTC], 1)
        y_BTC = full_BLC[:, P - 0 : P + T] * w_kC[-1]
        for j in range(w_kC.shape[0] - 2, -1, -1):
            s = (w_kC.shape[0] - 1 - j) * dilation
            y_BTC = y_BTC + full_BLC[:, P - s : P - s + T] * w_kC[j]
    else:
        y_BTC = conv_taps(xn_BTC, w_kC, dilation, state_BPC)
    return F.silu(y_BTC).view(B, T, M, D), _next_state(xn_BTC, state_BPC, P)


def engram_mix(e_BTE: torch.Tensor, h_BTMD: torch.Tensor, key_w: torch.Tensor | None, key_b: torch.Tensor | None,
               value_w: torch.Tensor, value_b: torch.Tensor, key_norm_w_MD: torch.Tensor | None,
               query_norm_w_MD: torch.Tensor | None, conv_norm_w_MD: torch.Tensor | None,
               conv_w_C1k: torch.Tensor | None, dilation: int, conv_eps: float | None,
               conv_state_BPC: torch.Tensor | None = None, *, gate: str = "context",
               branch_gates: str = "per_branch",
               live_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The post-lookup math composed of torch ops: ``(increment_BTMD, gate_BTM, new_conv_state_BPC)``.

    The ablations of :class:`~engram.config.EngramConfig` are computed here (only here: the fused and
    compiled paths implement the default layer alone):

    * ``gate="fixed"``: every gate is 1, so ``u = value``; the key and query weights are unused (None).
    * ``branch_gates="shared"``: ``key_w`` is ``[D, E]`` and the key/query norm weights ``[1, D]``; one gate
      from the branch-mean hidden state scales every branch.
    * ``conv_w_C1k=None``: no short convolution, the increment is ``u``; the state is ``[B, 0, M*D]``.

    ``live_BT`` (bool, False = padding) zeroes ``u`` at padding tokens: the conv then reads zeros there,
    as it reads before a sequence start, so a live token's output is that of its unpadded sequence.
    """
    B, T, M, D = h_BTMD.shape
    if gate == "fixed":
        gate_BTM = h_BTMD.new_ones(B, T, M)
        v_BTD = F.linear(e_BTE, value_w, value_b)
        u_BTMD = v_BTD.unsqueeze(2).expand(B, T, M, D)
    else:
        q_src_BTGD = h_BTMD.mean(2, keepdim=True) if branch_gates == "shared" else h_BTMD
        G = q_src_BTGD.shape[2]
        k_BTGD = F.rms_norm(F.linear(e_BTE, key_w, key_b).view(B, T, G, D), (D,)) * key_norm_w_MD
        q_BTGD = F.rms_norm(q_src_BTGD, (D,)) * query_norm_w_MD
        s_BTG = (k_BTGD * q_BTGD).sum(-1) / math.sqrt(D)
        # Signed square root tames the dot product's scale before the sigmoid.
        s_BTG = torch.sign(s_BTG) * torch.sqrt(s_BTG.abs().clamp_min(_GATE_FLOOR))
        gate_BTM = torch.sigmoid(s_BTG).expand(B, T, M)
        v_BTD = F.linear(e_BTE, value_w, value_b)
        u_BTMD = gate_BTM.unsqueeze(-1) * v_BTD.unsqueeze(2)
    if live_BT is not None:  # where, not a multiply: nothing of a padding token's row reaches the conv
        u_BTMD = torch.where(live_BT[:, :, None, None], u_BTMD, torch.zeros((), dtype=u_BTMD.dtype,
                                                                              device=u_BTMD.device))
    if conv_w_C1k is None:
        return u_BTMD.contiguous(), gate_BTM.contiguous(), u_BTMD.new_zeros(B, 0, M * D)
    conv_BTMD, new_state = short_conv(u_BTMD, conv_norm_w_MD, conv_w_C1k, dilation, conv_eps, conv_state_BPC)
    return u_BTMD + conv_BTMD, gate_BTM, new_state


def fused_mix_applies(e_BTE: torch.Tensor, h_BTMD: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether :class:`FusedMix` computes this call: everything float32, no autocast on the device."""
    f32 = torch.float32
    return (e_BTE.dtype == f32 and h_BTMD.dtype == f32 and all(w.dtype == f32 for w in weights)
            and not torch.is_autocast_enabled(h_BTMD.device.type))


class FusedMix(torch.autograd.Function):
    """:func:`engram_mix` for float32 with a hand-written backward (see the module docstring).

    ``apply(e_BTE, h_BTMD, key_w, key_b, value_w, value_b, key_norm_w_MD, query_norm_w_MD,
    conv_norm_w_MD, conv_w_C1k, dilation, conv_eps, conv_state_BPC)``, same returns as :func:`engram_mix`
    (the gates and the new state carry no gradient).

    The conv input ``xn = c * v * wc`` (``c = g / rms(g v)`` per branch) is never materialised: the conv
    runs on ``z = c * v`` with taps ``conv_w * wc``. The carried state stays in ``xn`` units (what
    :class:`~engram.model.engram.ShortConv` carries), weighed by the plain taps.
    """

    @staticmethod
    def forward(ctx, e_BTE, h_BTMD, key_w, key_b, value_w, value_b, wk_MD, wq_MD, wc_MD, conv_w_C1k,
                dilation, conv_eps, state_BPC):
        B, T, M, D = h_BTMD.shape
        N, C, k = B * T, M * D, conv_w_C1k.shape[-1]
        P = (k - 1) * dilation
        eps_kq = torch.finfo(torch.float32).eps  # what rms_norm(eps=None) uses for float32
        eps_c = eps_kq if conv_eps is None else float(conv_eps)
        e_NE = e_BTE.reshape(N, -1)
        h_NMD = h_BTMD.reshape(N, M, D)
        kr_NMD = torch.addmm(key_b, e_NE, key_w.t()).view(N, M, D)
        v_ND = torch.addmm(value_b, e_NE, value_w.t())
        if native_mix.applies(h_BTMD, k):
            return _native_forward(ctx, e_NE, e_BTE.shape, h_BTMD, kr_NMD.view(N, C), v_ND, key_w, value_w,
                                   wk_MD, wq_MD, wc_MD, conv_w_C1k, dilation, eps_kq, eps_c, state_BPC)
        ctx.native = False
        # Gate: <rmsnorm(kr)*wk, rmsnorm(h)*wq> = rk * rq * <kr, h*wk*wq>, with r = 1/rms.
        rk_NM = torch.rsqrt(torch.linalg.vector_norm(kr_NMD, dim=-1).square_().div_(D).add_(eps_kq))
        rq_NM = torch.rsqrt(torch.linalg.vector_norm(h_NMD, dim=-1).square_().div_(D).add_(eps_kq))
        hw_NMD = (h_NMD * (wk_MD * wq_MD)).contiguous()
        a_NM = torch.bmm(kr_NMD.reshape(N * M, 1, D), hw_NMD.reshape(N * M, D, 1)).view(N, M)
        s_NM = a_NM * rk_NM * rq_NM / math.sqrt(D)
        root_NM = torch.sqrt(s_NM.abs().clamp_min(_GATE_FLOOR))
        g_NM = torch.sigmoid(torch.sign(s_NM) * root_NM)
        # Conv input rmsnorm(g v) * wc: mean((g v)^2) = g^2 mean(v^2), so its norm comes from v's.
        msv_N = torch.linalg.vector_norm(v_ND, dim=-1).square_().div_(D)
        rc_NM = torch.rsqrt(g_NM.square() * msv_N[:, None] + eps_c)
        c_NM = g_NM * rc_NM
        z_BTC = torch.mul(c_NM[..., None], v_ND[:, None, :]).view(B, T, C)
        w_kC = conv_w_C1k[:, 0, :].t()
        wc_C = wc_MD.reshape(C)
        we_kC = w_kC * wc_C
        y_BTC = conv_taps(z_BTC, we_kC, dilation, state_BPC, w_kC)
        new_state = _next_state(z_BTC[:, max(0, T - P):] * wc_C, state_BPC, P)
        gate_BTM = g_NM.view(B, T, M)
        ctx.mark_non_differentiable(gate_BTM, new_state)
        if not any(ctx.needs_input_grad):  # inference: y is not needed afterwards, reuse its memory
            out_NMD = F.silu(y_BTC, inplace=True).view(N, M, D).addcmul_(g_NM[..., None], v_ND[:, None, :])
            return out_NMD.view(B, T, M, D), gate_BTM, new_state
        out_NMD = F.silu(y_BTC).view(N, M, D).addcmul_(g_NM[..., None], v_ND[:, None, :])
        ctx.save_for_backward(e_NE, h_NMD, kr_NMD, v_ND, hw_NMD, z_BTC, y_BTC, rk_NM, rq_NM, a_NM, s_NM,
                              root_NM, g_NM, rc_NM, c_NM, key_w, value_w, wk_MD, wq_MD, wc_C, w_kC, we_kC,
                              state_BPC)
        ctx.meta = (B, T, M, D, dilation, eps_c, e_BTE.shape)
        return out_NMD.view(B, T, M, D), gate_BTM, new_state

    @staticmethod
    def backward(ctx, dout_BTMD, _dgate, _dstate):
        if ctx.native:
            return _native_backward(ctx, dout_BTMD)
        (e_NE, h_NMD, kr_NMD, v_ND, hw_NMD, z_BTC, y_BTC, rk_NM, rq_NM, a_NM, s_NM, root_NM, g_NM, rc_NM,
         c_NM, key_w, value_w, wk_MD, wq_MD, wc_C, w_kC, we_kC, state_BPC) = ctx.saved_tensors
        B, T, M, D, dilation, eps_c, e_shape = ctx.meta
        N = B * T
        G_NMD = dout_BTMD.contiguous().view(N, M, D)  # e.g. the expanded ones of out.sum()
        # out = g v + silu(y), y = conv_{w wc}(z), z = c v, c = g rc, rc = (g^2 msv + eps_c)^-1/2.
        dy_BTC = torch.ops.aten.silu_backward(G_NMD.view(B, T, M * D), y_BTC)
        dz_BTC, dwe_kC, dstate_BPC, dsw_kC = _conv_taps_backward(dy_BTC, z_BTC, we_kC, dilation, state_BPC, w_kC)
        dz_NMD = dz_BTC.view(N, M, D)
        dconv_kC = dwe_kC * wc_C if dsw_kC is None else dwe_kC * wc_C + dsw_kC
        dwc_MD = (dwe_kC * w_kC).sum(0).view(M, D)
        v_ND1 = v_ND[:, :, None]
        dc_NM = torch.bmm(dz_NMD, v_ND1).view(N, M)
        rc3_NM = rc_NM.pow(3)
        # d c / d g = rc - g^2 msv rc^3 = eps_c rc^3;  d c / d msv = -g^3 rc^3 / 2
        dg_NM = torch.bmm(G_NMD, v_ND1).view(N, M).addcmul_(dc_NM, rc3_NM, value=eps_c)
        dmsv_N = (dc_NM * g_NM.pow(3) * rc3_NM).sum(1).mul_(-0.5)
        # dv = sum_m (G g + dz c) + dmsv * 2 v / D
        dv_ND = _branch_sum(G_NMD, g_NM, dz_NMD, c_NM)
        dv_ND.addcmul_(v_ND, dmsv_N[:, None], value=2.0 / D)  # d msv / d v = 2 v / D
        # Gate: g = sigmoid(sign(s) sqrt(max(|s|, floor))), s = a rk rq / sqrt(D), a = <kr, h wk wq>.
        dt_NM = dg_NM * g_NM * (1 - g_NM)
        ds_NM = torch.where(s_NM.abs() > _GATE_FLOOR, dt_NM / (2 * root_NM), torch.zeros_like(dt_NM))
        scale = 1.0 / math.sqrt(D)
        da_NM = ds_NM * rk_NM * rq_NM * scale
        coef_k_NM = -(ds_NM * a_NM * rq_NM * scale) * rk_NM.pow(3) / D  # d rk / d kr = -rk^3 kr / D
        coef_q_NM = -(ds_NM * a_NM * rk_NM * scale) * rq_NM.pow(3) / D
        dkr_NMD = torch.mul(hw_NMD, da_NM[..., None]).addcmul_(kr_NMD, coef_k_NM[..., None])
        kw_NMD = kr_NMD * (wk_MD * wq_MD)
        # d a / d (wk wq) = sum_n da kr h: per branch a [1, N] x [N, D] matmul
        dwkq_MD = torch.bmm(da_NM.t()[:, None, :], (kr_NMD * h_NMD).transpose(0, 1)).view(M, D)
        dh_NMD = kw_NMD.mul_(da_NM[..., None]).addcmul_(h_NMD, coef_q_NM[..., None])
        dkr_NC = dkr_NMD.reshape(N, M * D)
        de_NE = torch.addmm(dv_ND @ value_w, dkr_NC, key_w)
        return (de_NE.view(e_shape), dh_NMD.reshape(B, T, M, D), dkr_NC.t() @ e_NE, dkr_NC.sum(0),
                dv_ND.t() @ e_NE, dv_ND.sum(0), dwkq_MD * wq_MD, dwkq_MD * wk_MD, dwc_MD,
                dconv_kC.t().unsqueeze(1), None, None, dstate_BPC)


def _native_forward(ctx, e_NE, e_shape, h_BTMD, kr_NC, v_ND, key_w, value_w, wk_MD, wq_MD, wc_MD, conv_w_C1k, dilation,
                    eps_kq, eps_c, state_BPC):
    """:meth:`FusedMix.forward` past the projections, on the C kernels (same returns)."""
    B, T, M, D = h_BTMD.shape
    N, C = B * T, M * D
    P = (conv_w_C1k.shape[-1] - 1) * dilation
    h_NC = h_BTMD.reshape(N, C).contiguous()
    wkq_C = (wk_MD * wq_MD).reshape(C)
    g_NM, c_NM, aux_NM6 = native_mix.gate_forward(kr_NC, h_NC, wkq_C, v_ND, M, eps_kq, eps_c)
    w_kC = conv_w_C1k[:, 0, :].t().contiguous()
    wc_C = wc_MD.reshape(C)
    we_kC = w_kC * wc_C
    if state_BPC is not None:
        state_BPC = state_BPC.to(torch.float32).contiguous()
    out_NC = native_mix.conv_forward(v_ND, c_NM, g_NM, we_kC, w_kC, state_BPC, B, T, dilation)
    # The next state holds the last P conv inputs (xn = z wc); only those rows of z = c v are formed.
    L = min(T, P)
    z_BLC = (c_NM.view(B, T, M, 1)[:, T - L:] * v_ND.view(B, T, 1, D)[:, T - L:]).reshape(B, L, C)
    new_state = _next_state(z_BLC * wc_C, state_BPC, P)
    gate_BTM = g_NM.view(B, T, M)
    ctx.mark_non_differentiable(gate_BTM, new_state)
    ctx.native = True
    if any(ctx.needs_input_grad):
        ctx.save_for_backward(e_NE, h_NC, kr_NC, v_ND, g_NM, c_NM, aux_NM6, key_w, value_w, wk_MD, wq_MD, wc_C,
                              wkq_C, w_kC, we_kC, state_BPC)
        ctx.meta = (B, T, M, D, dilation, eps_c, e_shape)
    return out_NC.view(B, T, M, D), gate_BTM, new_state


def _native_backward(ctx, dout_BTMD):
    """:meth:`FusedMix.backward` on the C kernels: everything but the projections' matmuls in one pass."""
    (e_NE, h_NC, kr_NC, v_ND, g_NM, c_NM, aux_NM6, key_w, value_w, wk_MD, wq_MD, wc_C, wkq_C, w_kC, we_kC,
     state_BPC) = ctx.saved_tensors
    B, T, M, D, dilation, eps_c, e_shape = ctx.meta
    need = ctx.needs_input_grad
    r = native_mix.backward(dout_BTMD, v_ND, c_NM, g_NM, aux_NM6, kr_NC, h_NC, wkq_C, we_kC, w_kC, state_BPC,
                            dilation, eps_c, need_dh=need[1])
    dv_ND, dkr_NC, dwe_kC, dwkq_MD = r["dv_ND"], r["dkr_NC"], r["dwe_kC"], r["dwkq_C"].view(M, D)
    # The conv ran on z = c v with taps we = conv_w * wc (the state's taps: conv_w alone).
    dconv_kC = dwe_kC * wc_C if r["dsw_kC"] is None else dwe_kC * wc_C + r["dsw_kC"]
    de_NE = torch.mm(dkr_NC, key_w).addmm_(dv_ND, value_w) if need[0] else None
    dh_BTMD = r["dh_NC"].view(B, T, M, D) if need[1] else None
    return (None if de_NE is None else de_NE.view(e_shape), dh_BTMD,
            dkr_NC.t() @ e_NE if need[2] else None, r["dbk_C"], dv_ND.t() @ e_NE if need[4] else None,
            r["dbv_D"], dwkq_MD * wq_MD, dwkq_MD * wk_MD, (dwe_kC * w_kC).sum(0).view(M, D),
            dconv_kC.t().unsqueeze(1), None, None, r["dstate_BPC"])


def _branch_sum(a_NMD: torch.Tensor, x_NM: torch.Tensor, b_NMD: torch.Tensor, y_NM: torch.Tensor) -> torch.Tensor:
    """``sum_m a_m x_m + b_m y_m`` over the branches: ``[N, D]``."""
    out_ND = torch.mul(a_NMD[:, 0], x_NM[:, :1]).addcmul_(b_NMD[:, 0], y_NM[:, :1])
    for m in range(1, a_NMD.shape[1]):
        out_ND.addcmul_(a_NMD[:, m], x_NM[:, m : m + 1]).addcmul_(b_NMD[:, m], y_NM[:, m : m + 1])
    return out_ND


class _CompiledMix:
    """``torch.compile(engram_mix)``, falling back to eager (one warning) where compiling fails."""

    def __init__(self) -> None:
        self.fn = torch.compile(engram_mix, dynamic=False)

    def __call__(self, *args):
        try:
            return self.fn(*args)
        except Exception as exc:  # noqa: BLE001 - a genuine input error re-raises from the eager call below
            if self.fn is engram_mix:
                raise
            out = engram_mix(*args)
            warnings.warn(f"torch.compile of the Engram mixing failed ({type(exc).__name__}: {exc}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            self.fn = engram_mix
            return out


_COMPILED_MIX: list[_CompiledMix] = []


def compiled_engram_mix() -> _CompiledMix:
    """The process-wide compiled :func:`engram_mix` (Inductor fuses the norms, gate, conv and their
    backward into a few loops; graphs are cached per shape, so keep training shapes fixed)."""
    if not _COMPILED_MIX:
        _COMPILED_MIX.append(_CompiledMix())
    return _COMPILED_MIX[0]
