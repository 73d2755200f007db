"""Token masks through EngramLM: which tokens are live, where they sit, and what they may attend to.

A padded batch must give, at every live token, the logits of its sequence run alone and unpadded. So a
masked (padding) token must leave no trace on a live one: live queries never attend to it, it does not
count as a position (RoPE positions are those of the unpadded sequence), it hashes as the padding before
a sequence start, and the Engram short conv sees zeros there. The model's outputs at masked positions
are unspecified (finite). Padding *between* live tokens (a right-padded prompt that is then continued)
is a gap rather than erased: attention and positions skip it, but n-grams and the conv do not bridge it.

Legend: B batch, T time (this chunk), S cached + new keys, L decode-state capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram.model.generation import DecodeState


@dataclass
class Padding:
    """What one forward pass needs to ignore its masked tokens.

    live_BT: the chunk's token mask (True = live). pos_BT: each token's RoPE position, the number of
    live tokens of its sequence before it. attn_B1TS: which keys each query may attend to (causal,
    live keys, and the query's own key, so a masked query never has an empty softmax row).
    """

    live_BT: torch.Tensor
    pos_BT: torch.Tensor
    attn_B1TS: torch.Tensor


def check_token_mask(token_mask_BT, B: int, T: int) -> torch.Tensor:
    """Raise a clear error unless ``token_mask_BT`` is a bool ``[B, T]`` tensor; return it."""
    if not isinstance(token_mask_BT, torch.Tensor):
        raise TypeError(f"token_mask_BT must be a torch.Tensor, got {type(token_mask_BT).__name__}")
    if token_mask_BT.dtype != torch.bool:
        raise ValueError(f"token_mask_BT must be a bool tensor (True = live token, False = padding), "
                         f"got dtype {token_mask_BT.dtype}")
    if tuple(token_mask_BT.shape) != (B, T):
        raise ValueError(f"token_mask_BT must have the ids' shape {(B, T)}, got {tuple(token_mask_BT.shape)}")
    return token_mask_BT


def prepare(token_mask_BT: torch.Tensor | None, B: int, T: int, cache: DecodeState | None,
            device: torch.device) -> Padding | None:
    """The :class:`Padding` of a chunk, or None when nothing is masked (then the model runs exactly
    its unmasked path, so an all-True mask is bit-identical to none).

    A chunk continuing a decode state that has seen padding needs one even without a mask of its own:
    the cached pads must stay ignored and the positions keep counting live tokens only. Reads the mask
    back once (a host sync) to take the unmasked path and to refuse a sequence with no live token.
    """
    padded_cache = cache is not None and cache.live_BL is not None
    if token_mask_BT is None and not padded_cache:
        return None
    if token_mask_BT is None:
        live_BT = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        live_BT = check_token_mask(token_mask_BT, B, T).to(device)
    offset = 0 if cache is None else cache.length
    n_live_B = live_BT.sum(1)
    before_B = cache.n_live_B.to(device) if padded_cache else torch.full_like(n_live_B, offset)
    all_live, some_live = (bool(v) for v in torch.stack([live_BT.all(), ((before_B + n_live_B) > 0).all()]).tolist())
    if not some_live:
        empty = ((before_B + n_live_B) == 0).nonzero().flatten().tolist()
        raise ValueError(f"sequence(s) {empty} have no live token (token_mask_BT all False): there is nothing "
                         f"to compute logits from; drop them from the batch")
    if all_live and not padded_cache:
        return None
    pos_BT = before_B[:, None] + torch.cumsum(live_BT, 1) - live_BT.long()
    S = offset + T
    q_T1 = torch.arange(offset, S, device=device)[:, None]
    k_1S = torch.arange(S, device=device)[None, :]
    cached_BS = cache.live_BL[:, :offset].to(device) if padded_cache else live_BT.new_ones(B, offset)
    key_live_B1S = torch.cat([cached_BS, live_BT], 1)[:, None, :]
    attn_BTS = ((k_1S <= q_T1) & key_live_B1S) | (k_1S == q_T1)
    return Padding(live_BT=live_BT, pos_BT=pos_BT, attn_B1TS=attn_BTS[:, None])


def record(cache: DecodeState, pad: Padding) -> None:
    """Remember the chunk's mask and live counts in ``cache`` (before ``cache.kv.advance``), so later
    chunks keep ignoring its masked tokens and continue its positions."""
    B, T = pad.live_BT.shape
    offset = cache.length
    if cache.live_BL is None:  # the first padding this state sees: everything before it was live
        cache.live_BL = torch.ones(B, cache.kv.max_len, dtype=torch.bool, device=pad.live_BT.device)
        cache.n_live_B = torch.full((B,), offset, dtype=torch.int64, device=pad.live_BT.device)
    cache.live_BL[:, offset:offset + T] = pad.live_BT
    cache.n_live_B = cache.n_live_B + pad.live_BT.sum(1)
