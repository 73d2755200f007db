"""N-gram hashing: compressed token ids -> per-head row ids of the Engram tables.

Bit-exact with DeepSeek's reference. For layer l, order n (2..N) and head j:
    mix_n[t] = XOR_{k<n} ids[t-k] * m_l[k]     (int64 products, wrapping; ids[<0] = pad)
    row[t, (n-2)*K + j] = mix_n[t] mod p_{l,n,j}  (floored modulo, so rows are >= 0)
Multipliers m_l are odd int64 drawn from `np.random.default_rng(seed + 10007 * l)`; the primes
p are distinct across every layer, order and head. Row ids depend only on token ids, which is
what lets tables live off-device and rows be prefetched before a layer runs.

Legend: B batch, T time, N max n-gram order, K heads per order, H = (N-1)*K heads, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1


def _is_prime(n: int) -> bool:
    from sympy import isprime  # deterministic for 64-bit integers

    return bool(isprime(n))


def _next_prime(after: int, taken: set[int]) -> int:
    """Smallest prime > `after` not in `taken`."""
    c = after + 1
    while not (_is_prime(c) and c not in taken):
        c += 1
    return c


class NgramHasher:
    """Hash compressed token ids into per-head row ids for every Engram layer.

    Args:
        compressed_vocab_size: size of the compressed vocabulary (ids live in [0, size)).
        engram_vocab_size: target table size per n-gram order (one int per order 2..N, or a
            single int for all orders); each head gets the next unused prime >= that size.
        max_ngram_size: N, the largest n-gram order (>= 2).
        n_head_per_ngram: K hash heads per order.
        layer_ids: the transformer layers that carry an Engram module.
        pad_id: padding id *in compressed-id space*, used left of the sequence start.
        seed: base seed of the multipliers.

    `table_sizes[layer] = [[prime per head] per order]`; `hash(ids)` returns
    `{layer: rows [B, T, H]}` (numpy in -> numpy out, tensor in -> tensor on the same device).
    """

    def __init__(self, compressed_vocab_size: int, engram_vocab_size: int | Sequence[int],
                 max_ngram_size: int, n_head_per_ngram: int, layer_ids: Sequence[int],
                 pad_id: int, seed: int = 0):
        self.vocab_size = _pos_int(compressed_vocab_size, "compressed_vocab_size")
        self.max_ngram_size = N = _pos_int(max_ngram_size, "max_ngram_size")
        if N < 2:
            raise ValueError(f"max_ngram_size must be >= 2 (an n-gram spans at least 2 tokens), got {N}")
        self.n_head = K = _pos_int(n_head_per_ngram, "n_head_per_ngram")
        if isinstance(engram_vocab_size, (int, np.integer)):
            engram_vocab_size = [int(engram_vocab_size)] * (N - 1)
        sizes = [int(s) for s in engram_vocab_size]
        if len(sizes) != N - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{N} ({N - 1} values), got {len(sizes)}"
            )
        for n, s in enumerate(sizes, start=2):
            if s < 2:
                raise ValueError(f"engram_vocab_size for order {n} must be >= 2, got {s}")
        self.engram_vocab_size = sizes
        layer_ids = [int(x) for x in layer_ids]
        if not layer_ids:
            raise ValueError("layer_ids must name at least one layer")
        if len(set(layer_ids)) != len(layer_ids) or min(layer_ids) < 0:
            raise ValueError(f"layer_ids must be distinct non-negative integers, got {layer_ids}")
        self.layer_ids = layer_ids
        if not 0 <= int(pad_id) < self.vocab_size:
            raise ValueError(
                f"pad_id {pad_id} is outside the compressed vocabulary [0, {self.vocab_size}); "
                f"pass the pad id after compression"
            )
        self.pad_id = int(pad_id)
        self.seed = int(seed)

        # Products id * m must not overflow before the XOR: m < int64_max // vocab_size.
        half_bound = max(1, int(np.iinfo(np.int64).max // self.vocab_size) // 2)
        self.multipliers: dict[int, np.ndarray] = {}
        for layer in layer_ids:
            rng = np.random.default_rng(self.seed + _LAYER_SEED_STRIDE * layer)
            r = rng.integers(low=0, high=half_bound, size=(N,), dtype=np.int64)
            self.multipliers[layer] = r * 2 + 1

        # Primes: searched layer -> order -> head, each distinct from all found before.
        taken: set[int] = set()
        self.table_sizes: dict[int, list[list[int]]] = {}
        for layer in layer_ids:
            per_order = []
            for n in range(2, N + 1):
                start, heads = sizes[n - 2] - 1, []
                for _ in range(K):
                    p = _next_prime(start, taken)
                    taken.add(p)
                    heads.append(p)
                    start = p
                per_order.append(heads)
            self.table_sizes[layer] = per_order

        # Stacked forms for the vectorised paths.
        self._mult_LN = np.stack([self.multipliers[lay] for lay in layer_ids])
        self._primes_LOK = np.array([self.table_sizes[lay] for lay in layer_ids], dtype=np.int64)
        self._torch_cache: dict = {}

    @classmethod
    def from_config(cls, cfg, vocab) -> NgramHasher:
        """Build from an `EngramConfig` and a `CompressedVocab` (pad id compressed here)."""
        if not 0 <= cfg.pad_id < vocab.original_size:
            raise ValueError(f"pad_id {cfg.pad_id} is not an id of the tokenizer (size {vocab.original_size})")
        return cls(len(vocab), cfg.engram_vocab_size, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.layer_ids,
                   pad_id=int(vocab.lookup[cfg.pad_id]), seed=cfg.seed)

    # -- introspection -----------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        """H = (N-1) * K row ids per token per layer."""
        return (self.max_ngram_size - 1) * self.n_head

    def head_sizes(self, layer_id: int) -> list[int]:
        """Flat per-head table sizes of one layer, in row-id column order."""
        return [p for order in self.table_sizes[layer_id] for p in order]

    # -- batch form ----------------------------------------------------------------------------
    def hash(self, compressed_ids_BT, *, prefix_BP=None, validate: bool = True) -> dict:
        """Row ids for every Engram layer: `{layer_id: rows [B, T, H]}` (int64).

        `prefix_BP` optionally holds the P <= N-1 compressed ids that precede each sequence
        (for continuing a stream in chunks); positions before it are padded with `pad_id`.
        """
        if isinstance(compressed_ids_BT, torch.Tensor):
            return {lay: self.hash_layer(compressed_ids_BT, lay, prefix_BP=prefix_BP, validate=validate)
                    for lay in self.layer_ids}
        ids = np.asarray(compressed_ids_BT)
        return {lay: self.hash_layer(ids, lay, prefix_BP=prefix_BP, validate=validate)
                for lay in self.layer_ids}

    def hash_layer(self, compressed_ids_BT, layer_id: int, *, prefix_BP=None, validate: bool = True):
        """Row ids [B, T, H] of one layer; numpy or torch like the input."""
        if layer_id not in self.multipliers:
            raise KeyError(f"layer {layer_id} has no Engram; layers: {self.layer_ids}")
        is_torch = isinstance(compressed_ids_BT, torch.Tensor)
        ids = compressed_ids_BT if is_torch else torch.from_numpy(_as_int64_np(compressed_ids_BT))
        ids = self._check_ids(ids, validate, "compressed_ids_BT")
        B, T = ids.shape
        P = 0
        if prefix_BP is not None:
            pre = prefix_BP if isinstance(prefix_BP, torch.Tensor) else torch.from_numpy(_as_int64_np(prefix_BP))
            pre = self._check_ids(pre.to(ids.device), validate, "prefix_BP")
            P = pre.shape[1]
            if pre.shape[0] != B or P > self.max_ngram_size - 1:
                raise ValueError(f"prefix_BP must be [B={B}, <= {self.max_ngram_size - 1}], got {tuple(pre.shape)}")
            ids = torch.cat([pre, ids], dim=1)
        rows = self._hash_torch(ids, self.layer_ids.index(layer_id))[:, P:]
        return rows if is_torch else rows.numpy()

    def _consts(self, device):
        c = self._torch_cache.get(device)
        if c is None:
            c = (torch.from_numpy(self._mult_LN).to(device), torch.from_numpy(self._primes_LOK).to(device))
            self._torch_cache[device] = c
        return c

    def _hash_torch(self, ids_BT: torch.Tensor, li: int) -> torch.Tensor:
        N, K = self.max_ngram_size, self.n_head
        mult_LN, primes_LOK = self._consts(ids_BT.device)
        m, primes_OK = mult_LN[li], primes_LOK[li]
        B, T = ids_BT.shape
        rows_BTOK = torch.empty(B, T, N - 1, K, dtype=torch.int64, device=ids_BT.device)
        mix_BT = ids_BT * m[0]
        for k in range(1, N):
            # Shift the product, not the ids: positions t < k see pad_id * m[k].
            prod_BT = ids_BT * m[k]
            shifted_BT = torch.empty_like(prod_BT)
            kk = min(k, T)  # a sequence shorter than the order sees only padding there
            shifted_BT[:, :kk] = self.pad_id * int(self._mult_LN[li, k])
            shifted_BT[:, kk:] = prod_BT[:, : T - kk]
            mix_BT = mix_BT ^ shifted_BT
            # torch.remainder is floored modulo, like numpy's %: rows are non-negative.
            torch.remainder(mix_BT.unsqueeze(-1), primes_OK[k - 1], out=rows_BTOK[:, :, k - 1, :])
        return rows_BTOK.view(B, T, (N - 1) * K)

    def _check_ids(self, ids, validate: bool, what: str):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer token ids, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{what} must be 2-D [batch, time], got shape {tuple(ids.shape)}")
        ids = ids.long()
        if validate and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{what} holds id {bad}, outside the compressed vocabulary [0, {self.vocab_size}); "
                    f"compress token ids with CompressedVocab before hashing"
                )
        return ids

    # -- incremental form (decoding) -----------------------------------------------------------
    def new_window(self, batch_size: int = 1) -> np.ndarray:
        """A decode window [B, N] filled with pad: the context before the first token."""
        return np.full((batch_size, self.max_ngram_size), self.pad_id, dtype=np.int64)

    def push(self, window_BN: np.ndarray, new_ids_B) -> np.ndarray:
        """Slide the window by one token (in place) and return it."""
        window_BN[:, :-1] = window_BN[:, 1:]
        window_BN[:, -1] = new_ids_B
        return window_BN

    def hash_step(self, window_BN) -> dict:
        """Row ids of the newest token for all layers: `{layer_id: rows [B, H]}`.

        `window_BN` holds each sequence's last N compressed ids, newest last (pad where the
        sequence is shorter). Equals `hash(...)[layer][:, t]`; written in numpy over all layers
        at once because a few small ops beat torch's per-op overhead for one token.
        """
        if isinstance(window_BN, torch.Tensor):
            out = self.hash_step(window_BN.detach().cpu().numpy())
            return {lay: torch.from_numpy(r).to(window_BN.device) for lay, r in out.items()}
        w = np.asarray(window_BN, dtype=np.int64)
        if w.ndim == 1:
            w = w[None]
        N = self.max_ngram_size
        if w.shape[-1] != N:
            raise ValueError(f"window must hold the last N={N} ids, got shape {w.shape}")
        # prod[b, l, k] = ids[t-k] * m_l[k]; cumulative XOR over k gives mix for orders 1..N.
        prod_BLN = w[:, None, ::-1] * self._mult_LN[None]
        mix_BLO = np.bitwise_xor.accumulate(prod_BLN, axis=2)[:, :, 1:]
        rows_BLOK = mix_BLO[..., None] % self._primes_LOK[None]
        rows_BLH = rows_BLOK.reshape(w.shape[0], len(self.layer_ids), self.num_heads)
        return {lay: rows_BLH[:, i] for i, lay in enumerate(self.layer_ids)}

    def window_rows(self, window_BN: np.ndarray, compressed_ids_BT: torch.Tensor) -> dict:
        """Row ids ``{layer: [B, T, H]}`` of a chunk that continues the sequences whose last N compressed
        ids are ``window_BN``; the window is only read (:meth:`slide` advances it).

        The one implementation of the decode window: a single token goes through :meth:`hash_step` in
        numpy (a few small ops beat torch's per-op overhead), a longer chunk through :meth:`hash` with
        the window's last N-1 ids as its prefix. Either equals hashing the whole sequence at once.
        """
        T = compressed_ids_BT.shape[1]
        device = compressed_ids_BT.device
        if T == 1:
            window = self.push(window_BN.copy(), compressed_ids_BT[:, 0].cpu().numpy())
            return {lay: torch.from_numpy(r).to(device).unsqueeze(1) for lay, r in self.hash_step(window).items()}
        prefix_BP = torch.from_numpy(window_BN[:, 1:].copy()).to(device)
        return self.hash(compressed_ids_BT, prefix_BP=prefix_BP, validate=False)

    def slide(self, window_BN: np.ndarray, compressed_ids_BT: torch.Tensor) -> np.ndarray:
        """Advance ``window_BN`` (in place) past a chunk of compressed ids; returns it."""
        ids_BT = compressed_ids_BT.cpu().numpy()
        if ids_BT.shape[1] == 1:
            return self.push(window_BN, ids_BT[:, 0])
        N = window_BN.shape[1]
        window_BN[:] = np.concatenate([window_BN, ids_BT], axis=1)[:, -N:]
        return window_BN

    def config(self) -> dict:
        """Constructor arguments, for saving beside a model."""
        return dict(compressed_vocab_size=self.vocab_size, engram_vocab_size=self.engram_vocab_size,
                    max_ngram_size=self.max_ngram_size, n_head_per_ngram=self.n_head,
                    layer_ids=self.layer_ids, pad_id=self.pad_id, seed=self.seed)


def _pos_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return int(x)


def _as_int64_np(a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got an array of {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)
