"""V4.1 hashing against a slow re-derivation written from the stated semantics.

The reference below walks positions, orders and heads one Python int at a time, finds primes
by trial division and keeps history in a dict; it shares no code with `engram.v41.hashing`.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import ConfigError
from engram.v41 import V41Config, V41Hasher, bucket_primes, hash_multipliers

VOCAB = 40  # tokenizer ids
COMPRESSED = 23  # compressed ids (the map below folds the tokenizer ids onto them)
PAD = 5


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def ref_layout(vocab_size: int, n_layers: int, per_layer: int) -> list[list[int]]:
    primes, c = [], vocab_size
    while len(primes) < n_layers * per_layer:
        if _is_prime(c):
            primes.append(c)
        c += 1
    return [primes[i * per_layer:(i + 1) * per_layer] for i in range(n_layers)]


def ref_multipliers(layer_ids, n: int, compressed: int) -> list[list[int]]:
    bound = max(1, ((2**63 - 1) // compressed) // 2)
    return [[int(v) * 2 + 1 for v in np.random.default_rng(10007 * lid).integers(0, bound, size=n, dtype=np.int64)]
            for lid in layer_ids]


def make_config(**kw) -> V41Config:
    base = dict(hidden_size=64, hc_mult=2, engram_layer_ids=[1, 4], engram_max_ngram_size=3, engram_vocab_size=31,
                engram_n_heads=2, engram_head_dim=32, engram_pad_id=PAD, engram_compressed_vocab_size=COMPRESSED)
    base.update(kw)
    n_cols = (base["engram_max_ngram_size"] - 1) * base["engram_n_heads"]
    layout = ref_layout(base["engram_vocab_size"], len(base["engram_layer_ids"]), n_cols)
    base.setdefault("engram_num_embeddings", [sum(p) for p in layout])
    return V41Config(**base)


TOKEN_MAP = np.array([(i * 7) % COMPRESSED for i in range(VOCAB)], dtype=np.int64)


def ref_hash(cfg: V41Config, ids, live, positions) -> np.ndarray:
    """[T, L, C] for one sequence: ids/live/positions are Python lists."""
    N, K = cfg.engram_max_ngram_size, cfg.engram_n_heads
    layout = ref_layout(cfg.engram_vocab_size, len(cfg.engram_layer_ids), (N - 1) * K)
    mults = ref_multipliers(cfg.engram_layer_ids, N, cfg.engram_compressed_vocab_size)
    pad = int(TOKEN_MAP[cfg.engram_pad_id])
    history = {p: (int(TOKEN_MAP[i]) if ok else None) for i, ok, p in zip(ids, live, positions, strict=True)}
    out = []
    for p in positions:
        grams, blocked = [], False
        for back in range(N):
            q = p - back
            if q < 0 or history.get(q) is None:
                blocked = True
            grams.append(pad if blocked else history[q])
        per_layer = []
        for primes, m in zip(layout, mults, strict=True):
            cols = []
            for n in range(2, N + 1):
                mix = 0
                for k in range(n):
                    mix ^= grams[k] * m[k]
                for j in range(K):
                    c = (n - 2) * K + j
                    cols.append(mix % primes[c] + sum(primes[:c]))
            per_layer.append(cols)
        out.append(per_layer)
    return np.array(out, dtype=np.int64)


def _batch(seed: int, B: int = 2, T: int = 12, p_dead: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    live = torch.rand(B, T, generator=g) > p_dead
    return ids, live


@pytest.mark.parametrize("N,heads", [(3, 2), (4, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_pass_matches_the_slow_reference(N, heads, seed):
    cfg = make_config(engram_max_ngram_size=N, engram_n_heads=heads)
    hasher = V41Hasher(cfg, TOKEN_MAP)
    ids, live = _batch(seed)
    got = hasher.hash(ids, live)
    assert got.dtype == torch.int64 and got.shape == (2, 12, 2, (N - 1) * heads)
    assert not live.all() and live.any()  # the inputs really have dead positions
    for b in range(2):
        want = ref_hash(cfg, ids[b].tolist(), live[b].tolist(), list(range(12)))
        np.testing.assert_array_equal(got[b].numpy(), want)


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(0, 5), min_size=1, max_size=6), seed=st.integers(0, 10**6))
def test_chunked_steps_equal_one_pass(chunks, seed):
    cfg = make_config(engram_max_ngram_size=4)
    hasher = V41Hasher(cfg, TOKEN_MAP)
    ids, live = _batch(seed, T=sum(chunks))
    state, parts, at = hasher.new_state(2), [], 0
    for c in chunks:
        parts.append(hasher.step(state, ids[:, at:at + c], live[:, at:at + c]))
        at += c
    assert state.position == sum(chunks)
    torch.testing.assert_close(torch.cat(parts, 1), hasher.hash(ids, live), rtol=0, atol=0)


def test_prefill_3_1_5_then_decode_matches_reference():
    cfg = make_config()
    hasher = V41Hasher(cfg, TOKEN_MAP)
    ids, live = _batch(7, T=13)
    state, parts, at = hasher.new_state(2), [], 0
    for c in (3, 1, 5, 1, 1, 1, 1):  # chunked prefill, then decode one token at a time
        parts.append(hasher.step(state, ids[:, at:at + c], live[:, at:at + c]))
        at += c
    got = torch.cat(parts, 1)
    for b in range(2):
        np.testing.assert_array_equal(got[b].numpy(), ref_hash(cfg, ids[b].tolist(), live[b].tolist(), list(range(13))))


def test_a_dead_token_blocks_the_look_back():
    """After a masked token, hashing restarts as at the sequence start; the dead token itself
    hashes like a pad token with no history."""
    hasher = V41Hasher(make_config(engram_max_ngram_size=4), TOKEN_MAP)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    live = torch.tensor([[True, True, False, True, True, True]])
    rows = hasher.hash(ids, live)
    torch.testing.assert_close(rows[:, 3:], hasher.hash(ids[:, 3:]), rtol=0, atol=0)
    torch.testing.assert_close(rows[:, 2], hasher.hash(torch.tensor([[PAD]]))[:, 0], rtol=0, atol=0)
    # ...and without the mask the same positions do see their past
    assert not torch.equal(hasher.hash(ids)[:, 3:], rows[:, 3:])


def test_position_ids_place_tokens_and_gaps_are_dead():
    cfg = make_config()
    hasher = V41Hasher(cfg, TOKEN_MAP)
    ids, live = _batch(3, B=1, T=8)
    pos = torch.tensor([[0, 1, 2, 5, 6, 7, 8, 12]])
    got = hasher.hash(ids, live, position_ids=pos)
    np.testing.assert_array_equal(got[0].numpy(), ref_hash(cfg, ids[0].tolist(), live[0].tolist(), pos[0].tolist()))
    # nothing written before a late start: same ids as starting at 0
    torch.testing.assert_close(hasher.hash(ids, live, position_ids=torch.arange(8) + 9), hasher.hash(ids, live),
                               rtol=0, atol=0)


def test_each_column_stays_in_its_own_bucket_of_its_own_table():
    cfg = make_config(engram_max_ngram_size=4, engram_n_heads=3)
    rows = V41Hasher(cfg, TOKEN_MAP).hash(*_batch(5, T=40))
    for li, primes in enumerate(bucket_primes(cfg)):
        lo = np.concatenate([[0], np.cumsum(primes)[:-1]])
        r = rows[:, :, li].reshape(-1, len(primes)).numpy()
        assert (r >= lo).all() and (r < lo + np.array(primes)).all()
        assert r.max() < cfg.engram_num_embeddings[li]


def test_multipliers_are_odd_and_cannot_overflow():
    cfg = make_config(engram_compressed_vocab_size=99092)
    m = hash_multipliers(cfg)
    assert m.shape == (2, 3) and (m % 2 == 1).all()
    assert all(int(v) * (99092 - 1) < 2**63 for v in m.ravel())
    assert not np.array_equal(m[0], m[1])  # layers hash differently


def test_released_layout_matches_released_table_sizes():
    """The released config's table sizes are the sums of its consecutive bucket primes."""
    cfg = V41Config(hidden_size=5120, hc_mult=4, engram_layer_ids=[1, 14], engram_num_embeddings=[384006168, 384016682],
                    engram_max_ngram_size=4, engram_vocab_size=16000000, engram_n_heads=8, engram_head_dim=256,
                    engram_pad_id=2, engram_compressed_vocab_size=99092)
    assert [sum(p) for p in bucket_primes(cfg)] == cfg.engram_num_embeddings


def test_mismatches_are_refused():
    cfg = make_config()
    with pytest.raises(ConfigError, match="24 compressed ids.*engram_compressed_vocab_size is 23"):
        V41Hasher(cfg, np.arange(24))
    bad = make_config(engram_num_embeddings=[100, 100])
    with pytest.raises(ConfigError, match="engram_num_embeddings says 100 rows"):
        V41Hasher(bad, TOKEN_MAP)
    hasher = V41Hasher(cfg, TOKEN_MAP)
    with pytest.raises(ValueError, match="input ids must lie"):
        hasher.hash(torch.tensor([[VOCAB]]))
    # a masked position may hold anything (e.g. -100 padding): it is never looked up
    assert hasher.hash(torch.tensor([[-100, 3]]), torch.tensor([[False, True]])).shape == (1, 2, 2, 4)
