"""V4.1 n-gram hashing: token ids -> row ids of each Engram layer's table.

For Engram layer l (transformer layer id `lid`), order n in 2..N and head j, at position t:
    g[t-k]  = compressed id of the token at t-k, or pad once the look-back is blocked
    mix_n   = XOR_{k<n} g[t-k] * m_l[k]          (exact: m_l is bounded so nothing overflows)
    row     = mix_n mod p_{l,n,j} + offset_{l,n,j}
The look-back is blocked from the first slot that is before the sequence start or holds a
masked ("dead") token onwards, so an n-gram never spans a pad or an image span; a dead token
itself hashes as all-pad. Primes p are the consecutive primes from `engram_vocab_size` upward,
never reused across layers, orders or heads; offsets are the running sums of one layer's
primes, so each layer's table is addressed from 0. Multipliers m_l are odd and drawn from
`np.random.default_rng(10007 * lid)`.

History is indexed by position, which is what lets a prefill split into chunks and then
token-by-token decoding produce exactly the ids of one pass over the whole sequence.

Legend: B batch, T tokens, N max order, L Engram layers, C = (N-1) * heads ids per layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from engram.config import ConfigError

from .config import V41Config

DEAD = -1  # history slot of a masked token (or of a position never written)
_LAYER_SEED_STRIDE = 10007


@functools.lru_cache(maxsize=8)
def _consecutive_primes(start: int, count: int) -> tuple[int, ...]:
    from sympy import nextprime

    out, p = [], start - 1
    for _ in range(count):
        p = int(nextprime(p))
        out.append(p)
    return tuple(out)


def bucket_primes(config: V41Config) -> list[list[int]]:
    """Per Engram layer, its C table sizes in (order, head) order."""
    C, L = config.n_hash_cols, len(config.engram_layer_ids)
    flat = _consecutive_primes(config.engram_vocab_size, L * C)
    return [list(flat[i * C:(i + 1) * C]) for i in range(L)]


def hash_multipliers(config: V41Config) -> np.ndarray:
    """[L, N] odd int64 multipliers, bounded so `id * m` stays below 2**63 for any compressed id."""
    bound = max(1, (np.iinfo(np.int64).max // config.engram_compressed_vocab_size) // 2)
    rows = []
    for lid in config.engram_layer_ids:
        rng = np.random.default_rng(_LAYER_SEED_STRIDE * lid)
        rows.append(rng.integers(0, bound, size=config.engram_max_ngram_size, dtype=np.int64) * 2 + 1)
    return np.stack(rows)


@dataclass
class V41HashState:
    """What incremental hashing carries between calls, per batch row: the compressed ids (or
    DEAD) of the last N-1 positions, and how many positions have been consumed."""

    tail_BK: torch.Tensor
    position: int = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search): each row's look-back follows it."""
        self.tail_BK = self.tail_BK.index_select(0, rows.to(self.tail_BK.device))


class V41Hasher:
    """Hash token ids for every Engram layer of a V4.1 config.

    token_map: the compressed id of every tokenizer id (`compressed_token_map`). It must use
    exactly `engram_compressed_vocab_size` ids, and each layer's table must have exactly as
    many rows as its primes add up to; either mismatch raises ConfigError.
    """

    def __init__(self, config: V41Config, token_map):
        self.config = config
        map_V = torch.as_tensor(np.asarray(token_map), dtype=torch.int64)
        if map_V.ndim != 1 or map_V.numel() == 0 or int(map_V.min()) < 0:
            raise ConfigError("token_map must be a non-empty 1-D array of non-negative compressed ids")
        size = int(map_V.max()) + 1
        if size != config.engram_compressed_vocab_size:
            raise ConfigError(
                f"token_map uses {size} compressed ids but engram_compressed_vocab_size is "
                f"{config.engram_compressed_vocab_size}"
            )
        if config.engram_pad_id >= map_V.numel():
            raise ConfigError(f"engram_pad_id {config.engram_pad_id} is not a token id (vocabulary of {map_V.numel()})")
        self.primes = bucket_primes(config)
        for lid, rows, primes in zip(config.engram_layer_ids, config.engram_num_embeddings, self.primes, strict=True):
            if rows != sum(primes):
                raise ConfigError(
                    f"layer {lid}: engram_num_embeddings says {rows} rows but its {len(primes)} buckets from "
                    f"engram_vocab_size={config.engram_vocab_size} add up to {sum(primes)}"
                )
        self._set_layout(map_V, int(map_V[config.engram_pad_id]), self.primes, hash_multipliers(config),
                         config.engram_n_heads, offsets=True)

    def _set_layout(self, map_V: torch.Tensor, pad: int, primes: list[list[int]], mult_LN: np.ndarray,
                    heads: int, *, offsets: bool) -> None:
        self.N = int(mult_LN.shape[1])
        self.heads = int(heads)
        self.map_V = map_V
        self.pad = int(pad)
        self.primes = [list(p) for p in primes]
        self.primes_LC = torch.tensor(self.primes, dtype=torch.int64, device="cpu")
        offs = [np.concatenate([[0], np.cumsum(p[:-1])]) if offsets else np.zeros(len(p), dtype=np.int64)
                for p in self.primes]
        self.offsets_LC = torch.tensor(np.stack(offs), dtype=torch.int64, device="cpu")
        self.mult_LN = torch.from_numpy(np.ascontiguousarray(mult_LN, dtype=np.int64))

    @classmethod
    def with_layout(cls, token_map, pad_token: int, primes: list[list[int]], multipliers_LN: np.ndarray,
                    heads: int, *, offsets: bool = True) -> V41Hasher:
        """The V4.1 hashing over another model's table layout: ``primes`` per layer (C sizes each, in
        (order, head) order), ``multipliers_LN`` [L, N], ``pad_token`` a tokenizer id.

        With ``offsets=False`` the ids are per head (each in [0, its prime)), for a table that adds
        the head offsets itself; the look-back (position-indexed history, dead tokens blocking it,
        pad where blocked) is the released checkpoint's either way. No config checks: the caller's
        layout is taken as given.
        """
        self = cls.__new__(cls)
        self.config = None
        map_V = torch.as_tensor(np.asarray(token_map), dtype=torch.int64, device="cpu")  # even under a meta device
        self._set_layout(map_V, int(map_V[pad_token]), primes, multipliers_LN, heads, offsets=offsets)
        return self

    # ------------------------------------------------------------------ helpers
    def _compress(self, input_ids: torch.Tensor, token_mask: torch.Tensor | None,
                  validate: bool = True) -> torch.Tensor:
        """Compressed ids [B, T], DEAD where the mask is False (those ids are never looked up).
        ``validate=False`` skips the range check (a host sync on an accelerator) for checked ids."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        ids = input_ids.long()
        if token_mask is not None:
            if token_mask.shape != input_ids.shape:
                raise ValueError(f"token_mask {tuple(token_mask.shape)} does not match input_ids {tuple(ids.shape)}")
            live = token_mask.to(device=ids.device, dtype=torch.bool)
            ids = torch.where(live, ids, torch.zeros_like(ids))
        if validate and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.map_V.numel()):
            raise ValueError(f"input ids must lie in [0, {self.map_V.numel()}) where the mask is set")
        out = self.map_V.to(ids.device)[ids]
        if token_mask is not None:
            out = torch.where(live, out, torch.full_like(out, DEAD))
        return out

    def _rows(self, history_BP: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        """Row ids [B, T, L, C] of the tokens at `pos_BT`, reading look-back from `history_BP`."""
        dev = history_BP.device
        blocked = torch.zeros(pos_BT.shape, dtype=torch.bool, device=dev)
        grams = []
        for back in range(self.N):
            at = pos_BT - back
            src = history_BP.gather(1, at.clamp_min(0))
            blocked = blocked | (at < 0) | (src == DEAD)
            grams.append(torch.where(blocked, torch.full_like(src, self.pad), src))
        prod_BTLN = torch.stack(grams, -1).unsqueeze(2) * self.mult_LN.to(dev)
        primes = self.primes_LC.to(dev).view(-1, self.N - 1, self.heads)
        mix, per_order = prod_BTLN[..., 0], []
        for n in range(1, self.N):
            mix = mix ^ prod_BTLN[..., n]
            per_order.append(mix.unsqueeze(-1) % primes[:, n - 1])
        return torch.cat(per_order, -1) + self.offsets_LC.to(dev)

    # ------------------------------------------------------------------ public
    def hash(self, input_ids: torch.Tensor, token_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
        """Row ids [B, T, L, C] of a whole sequence (positions 0..T-1 unless given).

        position_ids [B, T] (or [T]) places tokens at absolute positions; positions that no
        token of this call occupies count as dead, so look-back does not cross them.
        """
        comp_BT = self._compress(input_ids, token_mask, validate)
        B, T = comp_BT.shape
        dev = comp_BT.device
        if position_ids is None:
            pos_BT = torch.arange(T, device=dev).expand(B, T)
            P = max(T, 1)  # known without reading the positions back (a host sync on an accelerator)
        else:
            pos_BT = position_ids.to(dev).long().expand(B, T)
            if T and int(pos_BT.min()) < 0:
                raise ValueError("position_ids must be non-negative")
            P = int(pos_BT.max()) + 1 if T else 1
        history = torch.full((B, P), DEAD, dtype=torch.int64, device=dev)
        history.scatter_(1, pos_BT, comp_BT)
        return self._rows(history, pos_BT)

    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> V41HashState:
        """An empty look-back for `batch_size` sequences (nothing before position 0)."""
        return V41HashState(torch.full((batch_size, self.N - 1), DEAD, dtype=torch.int64, device=device))

    def step(self, state: V41HashState, input_ids: torch.Tensor,
             token_mask: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
        """Row ids [B, t, L, C] of the next t tokens of each sequence; advances `state` in place.

        Feeding a sequence in chunks of any sizes gives the same ids as `hash` over all of it.
        """
        comp_Bt = self._compress(input_ids, token_mask, validate)
        if comp_Bt.shape[0] != state.tail_BK.shape[0]:
            raise ValueError(f"state holds {state.tail_BK.shape[0]} sequences, input has {comp_Bt.shape[0]}")
        history = torch.cat([state.tail_BK.to(comp_Bt.device), comp_Bt], 1)
        t = comp_Bt.shape[1]
        pos = torch.arange(self.N - 1, self.N - 1 + t, device=comp_Bt.device).expand(comp_Bt.shape[0], t)
        rows = self._rows(history, pos)
        state.tail_BK = history[:, history.shape[1] - (self.N - 1):]
        state.position += t
        return rows
