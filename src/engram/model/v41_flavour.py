"""The DeepSeek-V4.1 Engram flavour inside `EngramLM`: its layer math and hashing over our tables.

`EngramConfig.flavour = "v41"` swaps two things and keeps everything else of the model:
  * the layer, :class:`V41Layer`: the released V4.1 mixing (one fused bias-free ``wkv``
    projection, a gate weighted by ``q_weight * k_weight``, no short conv), computed by the same
    function as `engram.v41.V41Engram` (:func:`engram.v41.module.v41_increment`);
  * the hashing, :class:`V41NgramHasher`: V4.1's look-back (position-indexed history, so any
    chunking of a sequence gives the ids of one pass; a dead token blocks it) over the demo
    flavour's table layout (its primes and multipliers).
The table stays a :class:`~engram.memory.table.MultiHeadTable` fed per-head row ids, so every
memory provider (local tables, disk stores, row-sharded tables) serves either flavour unchanged.

Legend: B batch, T time, M residual branches (hc streams), D model width, H hash heads,
d row width, E = H*d.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engram.hashing import NgramHasher
from engram.memory.table import MultiHeadTable
from engram.v41.fp8 import dequantize_fp8_rows, is_fp8
from engram.v41.hashing import DEAD, V41Hasher, V41HashState
from engram.v41.module import v41_increment


class V41NgramHasher(NgramHasher):
    """:class:`NgramHasher`'s layout (primes, multipliers, per-head ids) with V4.1's look-back.

    Without dead tokens the ids equal the demo hasher's: both pad the slots before the start.
    The difference is the decode state: a :class:`~engram.v41.V41HashState` (position-indexed
    history in which a dead slot stays dead) instead of a window of pad-filled ids, advanced by
    `V41Hasher.step`. ``token_mask`` (False = dead) is accepted wherever ids are.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        primes = [self.head_sizes(lay) for lay in self.layer_ids]
        # ids arrive compressed (the model compresses first), so the token map is the identity
        self.v41 = V41Hasher.with_layout(np.arange(self.vocab_size), self.pad_id, primes, self._mult_LN,
                                         self.n_head, offsets=False)

    def _split(self, rows_BTLH: torch.Tensor) -> dict[int, torch.Tensor]:
        return {lay: rows_BTLH[:, :, i] for i, lay in enumerate(self.layer_ids)}

    def hash(self, compressed_ids_BT, *, prefix_BP=None, validate: bool = True, token_mask=None) -> dict:
        """Row ids ``{layer: [B, T, H]}`` (numpy in -> numpy out); ``prefix_BP`` holds up to N-1 live ids
        that precede each sequence, as for :meth:`NgramHasher.hash`."""
        is_torch = isinstance(compressed_ids_BT, torch.Tensor)
        ids = compressed_ids_BT if is_torch else torch.from_numpy(np.ascontiguousarray(compressed_ids_BT,
                                                                                     dtype=np.int64))
        ids = self._check_ids(ids, validate, "compressed_ids_BT")
        if prefix_BP is None:
            out = self._split(self.v41.hash(ids, token_mask, validate=validate))
        else:
            pre = prefix_BP if isinstance(prefix_BP, torch.Tensor) else torch.from_numpy(np.asarray(prefix_BP))
            pre = self._check_ids(pre.to(ids.device), validate, "prefix_BP")
            if pre.shape[0] != ids.shape[0] or pre.shape[1] > self.max_ngram_size - 1:
                raise ValueError(f"prefix_BP must be [B={ids.shape[0]}, <= {self.max_ngram_size - 1}], "
                                 f"got {tuple(pre.shape)}")
            state = self.new_window(ids.shape[0], ids.device)
            state.tail_BK = torch.cat([state.tail_BK, pre], 1)[:, pre.shape[1]:]
            out = self._split(self.v41.step(state, ids, token_mask, validate=validate))
        return out if is_torch else {lay: r.numpy() for lay, r in out.items()}

    def hash_layer(self, compressed_ids_BT, layer_id: int, *, prefix_BP=None, validate: bool = True,
                   token_mask=None):
        if layer_id not in self.multipliers:
            raise KeyError(f"layer {layer_id} has no Engram; layers: {self.layer_ids}")
        return self.hash(compressed_ids_BT, prefix_BP=prefix_BP, validate=validate, token_mask=token_mask)[layer_id]

    # -- incremental form: the decode state is V4.1's ----------------------------------------------
    def new_window(self, batch_size: int = 1, device: torch.device | str | None = None) -> V41HashState:
        """An empty look-back for ``batch_size`` sequences (stored in ``DecodeState.window``)."""
        return self.v41.new_state(batch_size, device)

    def window_rows(self, state: V41HashState, compressed_ids_BT: torch.Tensor, token_mask=None) -> dict:
        """Row ids ``{layer: [B, T, H]}`` of a chunk continuing ``state``; ``state`` is only read."""
        copy = V41HashState(state.tail_BK.clone(), state.position)
        # the model checked the token ids; compressed ones are in range (and no host sync on a GPU)
        return self._split(self.v41.step(copy, compressed_ids_BT, token_mask, validate=False))

    def slide(self, state: V41HashState, compressed_ids_BT: torch.Tensor, token_mask=None) -> V41HashState:
        """Advance ``state`` (in place) past a chunk; returns it."""
        comp = compressed_ids_BT.long().to(state.tail_BK.device)
        if token_mask is not None:
            comp = torch.where(token_mask.to(comp.device, torch.bool), comp, torch.full_like(comp, DEAD))
        state.tail_BK = torch.cat([state.tail_BK, comp], 1)[:, comp.shape[1]:]
        state.position += comp.shape[1]
        return state

    def hash_step(self, window_BN):
        raise TypeError("the v41 flavour's decode state is a V41HashState: use window_rows(state, ids)")


class V41Layer(nn.Module):
    """The V4.1 Engram layer over a :class:`MultiHeadTable`, with the demo layer's call signature.

    Parameters: ``table.weight`` (the memory), ``wkv.weight`` [(M+1)*D, E] (M keys then one shared
    value, no bias), ``q_weight`` and ``k_weight`` [M, D]. Like the demo :class:`Engram` it returns the
    increment (the block adds it), takes per-head ``rows_BTH`` or pre-gathered ``emb``, and accepts
    ``conv_state``/``return_state`` (there is no conv: the state is None) and ``return_gates``.
    ``norm_eps`` is the gate's RMS epsilon (V4.1 uses the model's).
    """

    def __init__(self, hidden_size: int, head_sizes: Sequence[int], *, max_ngram_size: int, n_head_per_ngram: int,
                 n_embed_per_ngram: int, hc_mult: int = 1, norm_eps: float = 1e-6,
                 table_dtype: torch.dtype = torch.float32, sparse: bool = True, init_std: float = 1.0,
                 with_table: bool = True) -> None:
        super().__init__()
        head_sizes = [int(s) for s in head_sizes]
        if n_embed_per_ngram % n_head_per_ngram:
            raise ValueError(f"n_embed_per_ngram ({n_embed_per_ngram}) must be a multiple of n_head_per_ngram "
                             f"({n_head_per_ngram})")
        if len(head_sizes) != (max_ngram_size - 1) * n_head_per_ngram:
            raise ValueError(f"expected {(max_ngram_size - 1) * n_head_per_ngram} head sizes, got {len(head_sizes)}")
        self.hidden_size, self.hc_mult = int(hidden_size), int(hc_mult)
        self.max_ngram_size, self.n_head_per_ngram = int(max_ngram_size), int(n_head_per_ngram)
        self.num_heads = len(head_sizes)
        self.head_dim = n_embed_per_ngram // n_head_per_ngram
        self.embed_dim = self.num_heads * self.head_dim
        self.head_sizes = tuple(head_sizes)
        self.num_rows = sum(head_sizes)
        self.table_dtype = table_dtype
        self.eps = float(norm_eps)
        sizes_H = torch.tensor(head_sizes, dtype=torch.int64)
        self._offsets_H = torch.cumsum(sizes_H, 0) - sizes_H
        self.table: MultiHeadTable | None = None
        if with_table:
            self.table = MultiHeadTable(head_sizes, self.head_dim, dtype=table_dtype, sparse=sparse,
                                        init_std=init_std)
        D, M = self.hidden_size, self.hc_mult
        self.wkv = nn.Linear(self.embed_dim, (M + 1) * D, bias=False)
        # the gate only sees their product; two factors because the released checkpoint has two
        self.q_weight = nn.Parameter(torch.ones(M, D))
        self.k_weight = nn.Parameter(torch.ones(M, D))
        self.compiled_mix = False  # no compiled path; kept so EngramLM.compile_engram treats layers alike

    @property
    def state_len(self) -> int:
        """No short conv, so nothing to carry between decode chunks."""
        return 0

    def init_value(self, std: float) -> None:
        """Draw the value rows of ``wkv`` from N(0, std^2): they write into the residual stream, so the
        model gives them its scaled residual-output init (the keys keep the plain one)."""
        with torch.no_grad():
            nn.init.normal_(self.wkv.weight[self.hc_mult * self.hidden_size:], 0.0, std)

    def forward(self, h: torch.Tensor, rows_BTH: torch.Tensor | None = None, *, emb: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None, return_state: bool = False, return_gates: bool = False,
                token_mask: torch.Tensor | None = None):
        """The increment for ``h`` ([B, T, D] or [B, T, M, D]) in h's dtype; ``token_mask`` False shuts a
        token's gate (increment exactly 0). Returns ``(increment, aux)`` with ``return_state`` /
        ``return_gates`` (``aux["conv_state"]`` is None, ``aux["gates"]`` [B, T, M])."""
        if (rows_BTH is None) == (emb is None):
            raise ValueError("pass exactly one of rows_BTH (table lookup) or emb (pre-gathered)")
        if conv_state is not None:
            raise ValueError("the v41 layer has no short conv: conv_state must be None")
        squeeze = h.dim() == 3
        h_BTMD = h.unsqueeze(2) if squeeze else h
        B, T, M, D = h_BTMD.shape
        if (M, D) != (self.hc_mult, self.hidden_size):
            raise ValueError(f"h must be [B, T, {self.hc_mult}, {self.hidden_size}], got {tuple(h.shape)}")
        if rows_BTH is not None:
            if self.table is None:
                raise ValueError("this layer has no table (with_table=False): pass emb= instead of rows_BTH")
            emb = self.table(rows_BTH)
        e_BTE = emb.reshape(B, T, self.embed_dim).to(h.device)
        inc, g_BTM = v41_increment(e_BTE, h_BTMD.float(), self.wkv.weight, self.q_weight, self.k_weight, self.eps,
                                   token_mask, return_gates=True)
        inc = inc.to(h.dtype)
        if squeeze:
            inc = inc.squeeze(2)
        if not (return_state or return_gates):
            return inc
        aux: dict[str, torch.Tensor | None] = {}
        if return_state:
            aux["conv_state"] = None
        if return_gates:
            aux["gates"] = g_BTM
        return inc, aux

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's weights under `engram.v41.V41Engram`'s (the released checkpoint's) names.

        A float table needs no ``embed.scale``; a V41Engram loading this computes what this layer does
        (given the ids with offsets, which the V4.1 hasher and :meth:`flat_rows` produce).
        """
        if self.table is None:
            raise ValueError("this layer has no table (with_table=False): its rows live in a store")
        return {"embed.weight": self.table.weight.detach(), "wkv.weight": self.wkv.weight.detach(),
                "q_weight": self.q_weight.detach(), "k_weight": self.k_weight.detach()}

    @torch.no_grad()
    def load_released_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named as the released checkpoint's layer into this one; fp8 rows (with their
        ``embed.scale``) are dequantised into the table's dtype. Shapes must match exactly."""
        w = state["embed.weight"]
        if is_fp8(w):
            w = dequantize_fp8_rows(w, state["embed.scale"])
        pairs = [(self.wkv.weight, state["wkv.weight"]), (self.q_weight, state["q_weight"]),
                 (self.k_weight, state["k_weight"])]
        if self.table is not None:
            pairs.append((self.table.weight, w))
        for dst, src in pairs:
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"released weight of shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))

    def flat_rows(self, rows_BTH: torch.Tensor) -> torch.Tensor:
        """Per-head row ids -> ids into the flat table (head offsets added), as the demo layer's."""
        if rows_BTH.dim() == 0 or rows_BTH.shape[-1] != self.num_heads:
            raise ValueError(f"row ids must have last dimension H={self.num_heads}, got shape {tuple(rows_BTH.shape)}")
        return rows_BTH.to(torch.int64) + self._offsets_H.to(rows_BTH.device)

    def extra_repr(self) -> str:
        return (f"flavour='v41', hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, "
                f"max_ngram_size={self.max_ngram_size}, heads={self.num_heads}, head_dim={self.head_dim}")
