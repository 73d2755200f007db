"""Mixture-of-experts feed-forward: shared SwiGLU experts plus top-k routed SwiGLU experts."""

# Shapes: B batch, T time, N = B*T tokens, D model width, E routed experts, K top-k,
# S = N*K token-slots, Hid expert hidden width.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.layers import SwiGLU


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x``'s device run in: the autocast dtype if enabled, else ``x``'s own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class MoE(nn.Module):
    """DeepSeekMoE-style layer: ``y = shared(x) + sum_{e in topk(x)} w_e(x) * expert_e(x)``.

    Router: ``Linear(D, E, bias=False)`` (run in fp32 even under autocast, as routing decisions
    are sensitive to rounding) -> softmax -> top-k -> the k weights renormalised to sum to 1.
    Dropless: every token-slot is computed (no capacity factor).

    Routed expert weights are stacked tensors, ``w_gate_up [E, D, 2*Hid]`` and
    ``w_down [E, Hid, D]``; token-slots are sorted by expert and each expert runs one matmul
    over its contiguous slice, so the Python loop is over experts, never over tokens.

    ``forward`` returns ``(y, aux_loss)`` with the Switch/DeepSeek load-balancing loss
    ``E * sum_e f_e * P_e`` (``f_e`` fraction of token-slots routed to ``e``, ``P_e`` mean router
    probability of ``e``); it is 1 for perfectly uniform routing.

    Args:
        d_model: ``D``.
        n_routed_experts: ``E`` (>= 1).
        n_shared_experts: always-on experts, fused into one SwiGLU of width ``n_shared * shared_hidden``.
        top_k: ``K`` experts per token.
        expert_hidden: ``Hid``.
        shared_hidden: width of one shared expert (None: ``Hid``); a different width lets a comparison
            move always-on parameters without touching the routed experts.
    """

    def __init__(self, d_model: int, n_routed_experts: int, n_shared_experts: int, top_k: int,
                 expert_hidden: int, shared_hidden: int | None = None) -> None:
        super().__init__()
        if n_routed_experts < 1 or not 1 <= top_k <= n_routed_experts:
            raise ValueError(f"need 1 <= top_k ({top_k}) <= n_routed_experts ({n_routed_experts})")
        shared_hidden = expert_hidden if shared_hidden is None else shared_hidden
        if n_shared_experts < 0 or expert_hidden < 1 or shared_hidden < 1:
            raise ValueError(f"bad expert sizes: n_shared={n_shared_experts}, expert_hidden={expert_hidden}, "
                             f"shared_hidden={shared_hidden}")
        self.d_model, self.n_experts, self.top_k = d_model, n_routed_experts, top_k
        self.n_shared, self.expert_hidden, self.shared_hidden = n_shared_experts, expert_hidden, shared_hidden
        self.router = nn.Linear(d_model, n_routed_experts, bias=False)
        self.shared = SwiGLU(d_model, n_shared_experts * shared_hidden) if n_shared_experts else None
        self.w_gate_up = nn.Parameter(torch.empty(n_routed_experts, d_model, 2 * expert_hidden))
        self.w_down = nn.Parameter(torch.empty(n_routed_experts, expert_hidden, d_model))
        # Token-slots per expert in the last forward pass (for monitoring load balance).
        self.last_expert_counts: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal init; ``out_std`` (default ``std``) for the down projections."""
        with torch.no_grad():
            nn.init.normal_(self.w_gate_up, 0.0, std)
            nn.init.normal_(self.w_down, 0.0, std if out_std is None else out_std)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(weights_NK, experts_NK, probs_NE)``; weights renormalised over the top-k, fp32."""
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return weights_NK, experts_NK, probs_NE

    def forward(self, x_BTD: torch.Tensor, live_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y_BTD, aux_loss)``; ``aux_loss`` is a fp32 scalar.

        Tokens do not interact (dropless: no capacity), so a padding token changes no other token's
        output; ``live_BT`` (bool, False = padding) only keeps padding out of the load-balancing loss.
        """
        B, T, D = x_BTD.shape
        E, K = self.n_experts, self.top_k
        x_ND = x_BTD.reshape(B * T, D)
        N = x_ND.shape[0]
        weights_NK, experts_NK, probs_NE = self.route(x_ND)

        # Sort token-slots by expert so each expert's inputs are one contiguous slice.
        experts_S = experts_NK.reshape(-1)
        order_S = torch.argsort(experts_S, stable=True)
        # A scatter-add rather than bincount: on CUDA bincount reads the largest id back to size its
        # output (a host sync); the counts are exact integers either way.
        counts_E = torch.zeros(E, dtype=torch.int64, device=experts_S.device).scatter_add_(
            0, experts_S, torch.ones_like(experts_S))
        self.last_expert_counts = counts_E.detach()
        if live_BT is None:
            f_E = counts_E.float() / (N * K)
            aux = E * torch.sum(f_E * probs_NE.mean(dim=0))
        else:
            live_N = live_BT.reshape(N).to(probs_NE.dtype)
            n_live = live_N.sum().clamp_min(1.0)
            live_counts_E = torch.zeros(E, dtype=live_N.dtype, device=experts_S.device).scatter_add_(
                0, experts_S, live_N.repeat_interleave(K))
            aux = E * torch.sum(live_counts_E / (n_live * K) * (probs_NE * live_N[:, None]).sum(0) / n_live)

        y_sorted_SD = self._experts(x_ND, order_S // K, counts_E)
        # Un-sort (a gather, whose backward is an index_add), then mix each token's k outputs.
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_NKD = y_sorted_SD.index_select(0, inverse_S).view(N, K, D)
        y_ND = torch.bmm(weights_NK.to(y_NKD.dtype).unsqueeze(1), y_NKD).squeeze(1)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND.view(B, T, D), aux

    def _experts(self, x_ND: torch.Tensor, tokens_S: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run each expert on its slice of the expert-sorted token-slots; returns ``[S, D]``."""
        dtype = _compute_dtype(x_ND)
        # Cast once per forward (autocast would re-cast the stacked weights per expert matmul).
        x_SD = x_ND.index_select(0, tokens_S).to(dtype)
        # The one host sync of a layer (data-dependent: the split sizes), see docs/GUIDE.md.
        counts = counts_E.tolist()
        # split/unbind rather than slicing/indexing per expert: their backward is one cat/stack,
        # whereas each slice's backward would zero-fill and accumulate a full-size gradient
        # (measured: ~25% of an MoE training step at 16 experts).
        xs = x_SD.split(counts)
        w1s, w2s = self.w_gate_up.to(dtype).unbind(0), self.w_down.to(dtype).unbind(0)
        outs = []
        for x_cD, w1, w2, c in zip(xs, w1s, w2s, counts, strict=True):
            if c == 0:
                continue
            g, u = (x_cD @ w1).chunk(2, dim=-1)
            outs.append((F.silu(g) * u) @ w2)
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, routed={self.n_experts}, shared={self.n_shared}, "
                f"top_k={self.top_k}, expert_hidden={self.expert_hidden}"
                + (f", shared_hidden={self.shared_hidden}" if self.shared_hidden != self.expert_hidden else ""))
