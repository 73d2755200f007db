"""``EngramCache``: our :class:`~engram.model.DecodeState` as the ``past_key_values`` of ``generate()``.

The state is more than keys and values: the Engram hashing window, the ShortConv history and the prompt's
padding move with it, so ``transformers``' ``DynamicCache`` cannot hold it. This object answers what
``generate()`` asks of a cache (its length, a beam reorder) and is otherwise opaque;
:class:`EngramForCausalLM` creates it on the first forward with ``use_cache`` and advances it on each call.
"""

# Shapes: B batch.

from __future__ import annotations

import torch

from engram.model.generation import DecodeState


class EngramCache:
    """Wraps the :class:`DecodeState` of one batch of sequences (``state``)."""

    is_compileable = False  # generate() must not pick its compiled-cache path
    is_croppable = False  # no assisted decoding: the hashing window cannot be rolled back

    def __init__(self, state: DecodeState) -> None:
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far."""
        return self.state.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.state.kv.max_len

    def __len__(self) -> int:
        return self.state.kv.n_layers

    def reorder_cache(self, beam_idx_B: torch.Tensor) -> None:
        """Keep, for row b, the history of row ``beam_idx_B[b]`` (beam search)."""
        kv = self.state.kv
        for lay in range(kv.n_layers):
            if kv.k[lay] is not None:
                idx = beam_idx_B.to(kv.k[lay].device)
                kv.k[lay], kv.v[lay] = kv.k[lay].index_select(0, idx), kv.v[lay].index_select(0, idx)
        for lay, conv in self.state.conv.items():
            self.state.conv[lay] = conv.index_select(0, beam_idx_B.to(conv.device))
        if self.state.live_BL is not None:  # the remembered padding follows its row
            idx = beam_idx_B.to(self.state.live_BL.device)
            self.state.live_BL = self.state.live_BL.index_select(0, idx)
            self.state.n_live_B = self.state.n_live_B.index_select(0, idx)
        window = self.state.window
        if hasattr(window, "select"):  # the v41 flavour's look-back (V41HashState)
            window.select(beam_idx_B)
        elif window is not None:
            self.state.window = window[beam_idx_B.cpu().numpy()].copy()
