"""The Engram block: hashed n-gram memory, context-aware gating and a causal short convolution."""

# Shapes: B batch, T time, H hash heads, d row width, E = H*d, M residual branches, D model width,
# C = M*D conv channels, P = (kernel_size-1)*dilation conv history.

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engram.memory.table import MultiHeadTable
from engram.model.mix import (  # noqa: F401 - short_conv, engram_mix: public here too
    FusedMix,
    compiled_engram_mix,
    engram_mix,
    fused_mix_applies,
    short_conv,
)

CONV_INITS = ("zero", "default")
GATE_MODES = ("context", "fixed")
BRANCH_GATES = ("per_branch", "shared")


class BranchRMSNorm(nn.Module):
    """RMSNorm over the last dim of ``[..., M, D]`` with a separate learnable weight per branch.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, matching ``nn.RMSNorm(eps=None)``.
    """

    def __init__(self, num_branches: int, dim: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_branches, dim))

    def forward(self, x_BTMD: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x_BTMD, (x_BTMD.shape[-1],), eps=self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"branches={self.weight.shape[0]}, dim={self.weight.shape[1]}, eps={self.eps}"


def _check_conv_state(state_BPC: torch.Tensor | None, shape_BTMD, P: int) -> None:
    """Raise if a carried conv state does not fit an input of ``shape_BTMD`` (checked outside the mixing
    functions so that the compiled path never sees the error branch)."""
    if state_BPC is not None:
        B, _, M, D = shape_BTMD
        if tuple(state_BPC.shape) != (B, P, M * D):
            raise ValueError(f"conv state must have shape {(B, P, M * D)}, got {tuple(state_BPC.shape)}")


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise dilated 1-D conv over time, then SiLU.

    Channel ``m*D + c`` of the conv is branch ``m``, feature ``c``. The weight is stored in
    ``nn.Conv1d`` layout ``[M*D, 1, kernel_size]``; tap ``kernel_size-1`` multiplies the current
    step and tap ``j`` the step ``(kernel_size-1-j)*dilation`` earlier.

    ``forward`` takes and returns a state (the last ``P`` normalised inputs) so a sequence can
    be processed in chunks, e.g. one token at a time while decoding.

    Args:
        hidden_size: ``D``.
        hc_mult: number of residual branches ``M``.
        kernel_size: taps per channel.
        dilation: spacing between taps in time steps.
        conv_init: ``"zero"`` (block starts as SiLU(0) = 0) or ``"default"`` (``nn.Conv1d``'s init).
        norm_eps: epsilon of the input RMSNorm.
    """

    def __init__(
        self,
        hidden_size: int,
        hc_mult: int = 1,
        kernel_size: int = 4,
        dilation: int = 1,
        *,
        conv_init: str = "zero",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("hc_mult", hc_mult),
                            ("kernel_size", kernel_size), ("dilation", dilation)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"unknown conv_init {conv_init!r}; expected one of {CONV_INITS}")
        self.hidden_size = int(hidden_size)
        self.hc_mult = int(hc_mult)
        self.kernel_size = int(kernel_size)
        self.dilation = int(dilation)
        self.conv_init = conv_init
        channels = self.hc_mult * self.hidden_size
        self.norm = BranchRMSNorm(self.hc_mult, self.hidden_size, eps=norm_eps)
        self.weight = nn.Parameter(torch.empty(channels, 1, self.kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.conv_init == "zero":
                self.weight.zero_()
            else:
                # Same call nn.Conv1d.reset_parameters makes, so seeds reproduce nn.Conv1d exactly.
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def state_len(self) -> int:
        """``P``: how many past normalised inputs the conv needs."""
        return (self.kernel_size - 1) * self.dilation

    def forward(
        self, x_BTMD: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y_BTMD, new_state_BPC)``; ``state=None`` means an all-zero history."""
        if x_BTMD.dim() != 4 or tuple(x_BTMD.shape[2:]) != (self.hc_mult, self.hidden_size):
            raise ValueError(
                f"ShortConv input must be [B, T, M={self.hc_mult}, D={self.hidden_size}], "
                f"got {tuple(x_BTMD.shape)}"
            )
        _check_conv_state(state, x_BTMD.shape, self.state_len)
        return short_conv(x_BTMD, self.norm.weight, self.weight, self.dilation, self.norm.eps, state)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, conv_init={self.conv_init!r}"
        )


class Engram(nn.Module):
    """Conditional memory: look up hashed n-gram embeddings and gate them into the residual stream.

    With ``e`` the ``[B, T, E]`` gathered embeddings and ``h`` the ``[B, T, M, D]`` hidden state,
    for each branch ``m``::

        k_m = RMSNorm_m(W_K,m e + b_K,m);  q_m = RMSNorm_m(h_m);  s = <k_m, q_m> / sqrt(D)
        gate_m = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))
        u_m = gate_m * (W_V e + b_V)              # value projection shared by all branches
        out = u + ShortConv(u)                    # ShortConv dilated by max_ngram_size

    The module returns only the increment; the caller does ``h = h + engram(h, rows)``.

    Args:
        hidden_size: ``D``.
        head_sizes: table rows per hash head, ``(max_ngram_size-1) * n_head_per_ngram`` of them.
        max_ngram_size: ``N``; n-gram orders 2..N each get ``n_head_per_ngram`` heads.
        n_head_per_ngram: ``K``.
        n_embed_per_ngram: embedding width per n-gram order; each head gets ``d = n_embed / K``.
        hc_mult: residual branches ``M`` (hyper-connections); 1 for a plain residual stream.
        kernel_size: ShortConv taps.
        conv_init: ``"zero"`` (paper; output starts exactly ``u``) or ``"default"``.
        table_dtype: storage dtype of the table (float32 or bfloat16).
        sparse: sparse gradients for the table.
        init_std: std of the table's initial rows.
        with_table: False builds the module without its table (``self.table`` is None), for serving
            the rows from a store: ``forward`` then needs ``emb`` (see :meth:`flat_rows`).
        gate: ``"context"`` (above) or ``"fixed"``: every gate is 1, ``u = W_V e + b_V``; ``key_proj``,
            ``key_norm`` and ``query_norm`` are then None, so no unused parameter is counted or trained.
        short_conv: False drops the ShortConv (``out = u``; ``self.short_conv`` is None).
        branch_gates: ``"per_branch"`` (above) or ``"shared"``: one key projection ``E -> D`` and one
            gate from the branch-mean ``q = RMSNorm(mean_m h_m)``, applied to every branch (the same
            layer as ``"per_branch"`` when ``hc_mult == 1``).
        A layer with any switch off its default computes its mixing with the eager torch path
        (:func:`engram_mix`), never the fused or compiled one.
    """

    def __init__(
        self,
        hidden_size: int,
        head_sizes: Sequence[int],
        *,
        max_ngram_size: int,
        n_head_per_ngram: int,
        n_embed_per_ngram: int,
        hc_mult: int = 1,
        kernel_size: int = 4,
        conv_init: str = "zero",
        table_dtype: torch.dtype = torch.float32,
        sparse: bool = True,
        init_std: float = 1.0,
        with_table: bool = True,
        gate: str = "context",
        short_conv: bool = True,
        branch_gates: str = "per_branch",
    ) -> None:
        super().__init__()
        head_sizes = [int(s) for s in head_sizes]
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2 (bigrams and up), got {max_ngram_size}")
        if n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {n_head_per_ngram}")
        if n_embed_per_ngram < 1 or n_embed_per_ngram % n_head_per_ngram != 0:
            raise ValueError(
                f"n_embed_per_ngram ({n_embed_per_ngram}) must be a positive multiple of "
                f"n_head_per_ngram ({n_head_per_ngram})"
            )
        expected_heads = (max_ngram_size - 1) * n_head_per_ngram
        if len(head_sizes) != expected_heads:
            raise ValueError(
                f"expected len(head_sizes) == (max_ngram_size-1)*n_head_per_ngram = {expected_heads}, "
                f"got {len(head_sizes)}"
            )
        for h, s in enumerate(head_sizes):
            if s < 1:
                raise ValueError(f"head_sizes[{h}] must be >= 1, got {s}")
        if hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1, got {hc_mult}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"unknown conv_init {conv_init!r}; expected one of {CONV_INITS}")
        if gate not in GATE_MODES:
            raise ValueError(f"unknown gate {gate!r}; expected one of {GATE_MODES}")
        if branch_gates not in BRANCH_GATES:
            raise ValueError(f"unknown branch_gates {branch_gates!r}; expected one of {BRANCH_GATES}")

        self.hidden_size = int(hidden_size)
        self.max_ngram_size = int(max_ngram_size)
        self.n_head_per_ngram = int(n_head_per_ngram)
        self.n_embed_per_ngram = int(n_embed_per_ngram)
        self.hc_mult = int(hc_mult)
        self.num_heads = expected_heads
        self.head_dim = self.n_embed_per_ngram // self.n_head_per_ngram
        self.embed_dim = self.num_heads * self.head_dim
        D, M, E = self.hidden_size, self.hc_mult, self.embed_dim

        self.head_sizes = tuple(head_sizes)
        self.num_rows = sum(head_sizes)
        self.table_dtype = table_dtype
        # Plain attribute (not a buffer): derived from head_sizes, moved to the ids' device on use.
        sizes_H = torch.tensor(head_sizes, dtype=torch.int64)
        self._offsets_H = torch.cumsum(sizes_H, 0) - sizes_H
        self.table: MultiHeadTable | None = None
        if with_table:
            self.table = MultiHeadTable(
                head_sizes, self.head_dim, dtype=table_dtype, sparse=sparse, init_std=init_std
            )
        self.gate, self.branch_gates = gate, branch_gates
        self.ablated = gate != "context" or not short_conv or branch_gates != "per_branch"
        self.value_proj = nn.Linear(E, D, bias=True)
        self.key_proj: nn.Linear | None = None
        self.key_norm: BranchRMSNorm | None = None
        self.query_norm: BranchRMSNorm | None = None
        if gate == "context":
            G = 1 if branch_gates == "shared" else M  # gates computed: one per branch, or one for all
            # All G key projections in one matmul; the output is viewed as [B, T, G, D].
            self.key_proj = nn.Linear(E, G * D, bias=True)
            self.key_norm = BranchRMSNorm(G, D, eps=None)
            self.query_norm = BranchRMSNorm(G, D, eps=None)
        self.short_conv: ShortConv | None = None
        if short_conv:
            self.short_conv = ShortConv(
                D, M, kernel_size, dilation=self.max_ngram_size, conv_init=conv_init, norm_eps=1e-5
            )
        # Run the post-lookup math through torch.compile when gradients are on (training); off
        # by default because compiling costs seconds and numerics differ from eager in the last ulp.
        self.compiled_mix = False

    def _check_inputs(
        self, h: torch.Tensor, rows_BTH: torch.Tensor | None, emb: torch.Tensor | None
    ) -> None:
        if h.dim() not in (3, 4):
            raise ValueError(f"h must be [B, T, D] or [B, T, M, D], got shape {tuple(h.shape)}")
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size mismatch: expected D={self.hidden_size}, got {h.shape[-1]}")
        M = h.shape[2] if h.dim() == 4 else 1
        if M != self.hc_mult:
            raise ValueError(f"branch count mismatch: expected M=hc_mult={self.hc_mult}, got {M}")
        B, T = h.shape[0], h.shape[1]
        if B == 0 or T == 0:
            raise ValueError(f"empty batch: h has shape {tuple(h.shape)}")
        if (rows_BTH is None) == (emb is None):
            raise ValueError("pass exactly one of rows_BTH (table lookup) or emb (pre-gathered)")
        if rows_BTH is not None:
            if self.table is None:
                raise ValueError("this Engram module has no table (built with with_table=False): pass emb= "
                                 "(rows gathered from a store) instead of rows_BTH")
            if rows_BTH.dim() != 3 or tuple(rows_BTH.shape[:2]) != (B, T):
                raise ValueError(
                    f"rows_BTH must have shape [B, T, H] = [{B}, {T}, {self.num_heads}], "
                    f"got {tuple(rows_BTH.shape)}"
                )
        else:
            ok = tuple(emb.shape) in ((B, T, self.num_heads, self.head_dim), (B, T, self.embed_dim))
            if not ok:
                raise ValueError(
                    f"emb must have shape [B, T, H, d] = [{B}, {T}, {self.num_heads}, {self.head_dim}] "
                    f"or [B, T, E] = [{B}, {T}, {self.embed_dim}], got {tuple(emb.shape)}"
                )

    def forward(
        self,
        h: torch.Tensor,
        rows_BTH: torch.Tensor | None = None,
        *,
        emb: torch.Tensor | None = None,
        conv_state: torch.Tensor | None = None,
        return_state: bool = False,
        return_gates: bool = False,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the Engram increment for ``h`` (``[B, T, D]`` or ``[B, T, M, D]``).

        Give either ``rows_BTH`` (per-head row ids, looked up in ``self.table``) or ``emb``
        (already gathered, ``[B, T, H, d]`` or ``[B, T, E]``). ``conv_state`` continues a
        previous chunk (see :class:`ShortConv`).

        Returns the increment, same shape as ``h``. If ``return_state`` or ``return_gates``,
        returns ``(increment, aux)`` where ``aux`` holds ``"conv_state"`` (``[B, P, M*D]``)
        and/or ``"gates"`` (``[B, T, M]``, also for 3-D ``h``).

        ``token_mask`` (bool ``[B, T]``, False = padding) keeps padding tokens out of the short conv's
        look-back (see :func:`engram_mix`); such a call takes the eager path.
        """
        self._check_inputs(h, rows_BTH, emb)
        squeeze = h.dim() == 3
        h_BTMD = h.unsqueeze(2) if squeeze else h
        B, T, M, D = h_BTMD.shape
        if rows_BTH is not None:
            emb = self.table(rows_BTH)
        # A bf16 table feeds fp32 projections (and vice versa) at the hidden state's precision;
        # rows gathered from a host-side store may also still need to move to h's device.
        e_BTE = emb.reshape(B, T, self.embed_dim).to(h.device, h.dtype)

        _check_conv_state(conv_state, h_BTMD.shape, self.state_len)
        if token_mask is not None and (token_mask.dtype != torch.bool or tuple(token_mask.shape) != (B, T)):
            raise ValueError(f"token_mask must be a bool [B, T] = [{B}, {T}] tensor, got {token_mask.dtype} "
                             f"{tuple(token_mask.shape)}")
        if self.ablated or token_mask is not None:
            key, kn, qn, conv = self.key_proj, self.key_norm, self.query_norm, self.short_conv
            args = (e_BTE, h_BTMD, None if key is None else key.weight, None if key is None else key.bias,
                    self.value_proj.weight, self.value_proj.bias, None if kn is None else kn.weight,
                    None if qn is None else qn.weight, None if conv is None else conv.norm.weight,
                    None if conv is None else conv.weight, self.max_ngram_size,
                    None if conv is None else conv.norm.eps, conv_state)
            out, gate_BTM, new_state = engram_mix(*args, gate=self.gate, branch_gates=self.branch_gates,
                                                  live_BT=None if token_mask is None else token_mask.to(h.device))
            return self._returns(out, gate_BTM, new_state, squeeze, return_state, return_gates)
        args = (e_BTE, h_BTMD, self.key_proj.weight, self.key_proj.bias, self.value_proj.weight,
                self.value_proj.bias, self.key_norm.weight, self.query_norm.weight, self.short_conv.norm.weight,
                self.short_conv.weight, self.short_conv.dilation, self.short_conv.norm.eps, conv_state)
        if self.compiled_mix and torch.is_grad_enabled():
            mix = compiled_engram_mix()
        elif fused_mix_applies(e_BTE, h_BTMD, *args[2:10]):
            mix = FusedMix.apply
        else:
            mix = engram_mix
        out, gate_BTM, new_state = mix(*args)
        return self._returns(out, gate_BTM, new_state, squeeze, return_state, return_gates)

    @property
    def state_len(self) -> int:
        """``P``: how many past steps the decode state carries (0 without the ShortConv)."""
        return 0 if self.short_conv is None else self.short_conv.state_len

    @staticmethod
    def _returns(out: torch.Tensor, gate_BTM: torch.Tensor, new_state: torch.Tensor, squeeze: bool,
                 return_state: bool, return_gates: bool):
        if squeeze:
            out = out.squeeze(2)
        if not (return_state or return_gates):
            return out
        aux: dict[str, torch.Tensor] = {}
        if return_state:
            aux["conv_state"] = new_state
        if return_gates:
            aux["gates"] = gate_BTM
        return out, aux

    def flat_rows(self, rows_BTH: torch.Tensor) -> torch.Tensor:
        """Per-head row ids ``[..., H]`` -> int64 ids into the flat ``[num_rows, d]`` table (head offsets added).

        These are the ids a row store serves; ``store.gather(flat.reshape(-1))`` equals
        ``self.table(rows_BTH)`` flattened, bit for bit. Ids are not range-checked here (the store checks them).
        """
        if rows_BTH.dim() == 0 or rows_BTH.shape[-1] != self.num_heads:
            raise ValueError(f"row ids must have last dimension H={self.num_heads}, got shape {tuple(rows_BTH.shape)}")
        return rows_BTH.to(torch.int64) + self._offsets_H.to(rows_BTH.device)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, max_ngram_size={self.max_ngram_size}, "
            f"heads={self.num_heads}, head_dim={self.head_dim}"
            + (f", gate={self.gate!r}, short_conv={self.short_conv is not None}, branch_gates={self.branch_gates!r}"
               if self.ablated else "")
        )
