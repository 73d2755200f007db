"""Autoregressive sampling with a KV cache, incremental n-gram hashing and the ShortConv decode state."""

# Shapes: B batch, T prompt length, N max n-gram order, V vocabulary, P conv history, C = M*D conv channels.

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engram.model.layers import KVCache

if TYPE_CHECKING:  # transformer.py imports this module; no runtime cycle
    from engram.memory.provider import MemoryProvider
    from engram.model.transformer import EngramLM
    from engram.v41.hashing import V41HashState


@dataclass
class DecodeState:
    """Everything a model needs to continue a batch of sequences one chunk at a time.

    kv: attention keys/values of every layer (``kv.length`` = tokens consumed so far).
    conv: per Engram layer, the ShortConv history ``[B, P, C]``.
    window: the last N compressed ids per sequence ``[B, N]`` (pad-filled at the start), from
        which :meth:`NgramHasher.hash_step` hashes the newest token; for the v41 flavour a
        :class:`~engram.v41.V41HashState` (position-indexed look-back, advanced by its ``step``);
        None without Engram.
    live_BL: which cached positions hold live tokens ``[B, L]`` bool (L the cache capacity); None until
        a token is masked (``token_mask_BT``), i.e. every cached token is live.
    n_live_B: live tokens per sequence so far (the next live token's RoPE position); None with ``live_BL``.

    Make one with :meth:`EngramLM.new_decode_state`; pass it as ``model(ids, cache=state)`` (any
    chunk length) or ``model.forward_step(ids_B1, state)``.
    """

    kv: KVCache
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    window: np.ndarray | V41HashState | None = None
    live_BL: torch.Tensor | None = None
    n_live_B: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens consumed so far."""
        return self.kv.length

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size


def sample_next(logits_BV: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``logits_BV``: greedy at temperature 0, else softmax(logits/T)
    restricted to the ``top_k`` largest logits. Returns ``[B]`` int64."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: EngramLM, prompt_idx_BT: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             memory: MemoryProvider | None = None, token_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Continue ``prompt_idx_BT`` by ``max_new_tokens`` tokens; returns ``[B, T + max_new_tokens]``.

    The prompt is processed in one pass (prefill), then one token per step reuses the KV cache,
    the Engram hashing window and the ShortConv state. ``temperature == 0`` is greedy decoding.
    ``memory``: the provider of the Engram rows (default: the model's own, see ``EngramLM.set_memory``).
    ``token_mask_BT``: the prompt's padding (bool, False = pad), for prompts of different lengths padded on
    the left: each row then continues as its prompt alone would (see ``EngramLM.forward``).
    """
    if not isinstance(prompt_idx_BT, torch.Tensor):
        raise TypeError(f"prompt must be a torch.Tensor of token ids, got {type(prompt_idx_BT).__name__}")
    if prompt_idx_BT.dim() == 1:
        prompt_idx_BT = prompt_idx_BT.unsqueeze(0)
    if prompt_idx_BT.dim() != 2 or prompt_idx_BT.shape[1] == 0 or prompt_idx_BT.shape[0] == 0:
        raise ValueError(f"prompt must be a non-empty [batch, time] tensor, got shape {tuple(prompt_idx_BT.shape)}")
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    B, T = prompt_idx_BT.shape
    limit = model.cfg.max_seq_len
    if T > limit:
        raise ValueError(f"prompt has {T} tokens, more than max_seq_len={limit}")
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} tokens "
                         f"exceeds max_seq_len={limit}")
    if max_new_tokens == 0:
        return prompt_idx_BT.clone()
    device = next(model.parameters()).device
    prompt_idx_BT = prompt_idx_BT.to(device)
    state = model.new_decode_state(B, max_len=T + max_new_tokens)

    def step(idx_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        return model(idx_BT, cache=state, memory=memory, token_mask_BT=mask_BT).logits[:, -1]

    logits_BV = step(prompt_idx_BT, None if token_mask_BT is None else token_mask_BT.to(device))
    out = [prompt_idx_BT]
    for i in range(max_new_tokens):
        nxt_B = sample_next(logits_BV, temperature=temperature, top_k=top_k, generator=generator)
        out.append(nxt_B.unsqueeze(1))
        if i + 1 < max_new_tokens:
            logits_BV = step(nxt_B.unsqueeze(1))
    return torch.cat(out, dim=1)
