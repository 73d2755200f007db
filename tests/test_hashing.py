"""N-gram hashing: golden vectors, an independent big-int derivation, and properties."""

# Legend: B batch, T time, N max n-gram order, K heads per order, H = (N-1)*K.

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.hashing import NgramHasher

SMALL = dict(compressed_vocab_size=97, engram_vocab_size=[1000, 1000], max_ngram_size=3, n_head_per_ngram=4,
             layer_ids=[1, 15], pad_id=2, seed=0)


def test_golden_table_sizes_by_hand():
    # Consecutive primes above 999 are 1009 1013 1019 1021 1031 1033 1039 1049 1051 1061 1063 1069
    # 1087 1091 1093 1097. Every head takes the next prime not yet taken, searching
    # layer -> order -> head, and each order restarts its search at its table size.
    h = NgramHasher(**SMALL)
    assert h.table_sizes == {1: [[1009, 1013, 1019, 1021], [1031, 1033, 1039, 1049]],
                             15: [[1051, 1061, 1063, 1069], [1087, 1091, 1093, 1097]]}
    assert h.head_sizes(15) == [1051, 1061, 1063, 1069, 1087, 1091, 1093, 1097]


def test_golden_multipliers():
    h = NgramHasher(**SMALL)
    assert h.multipliers[1].tolist() == [78284821251697249, 4944257750913641, 36735214942979007]
    assert h.multipliers[15].tolist() == [29542797607925397, 57228561961204965, 55092125367186621]
    bound = (2**63 - 1) // 97
    for m in h.multipliers.values():
        assert all(x % 2 == 1 and 0 < x < bound for x in m.tolist())  # odd, no overflow of id * m


GOLDEN_ROWS_L1 = [[403, 204, 441, 592, 75, 637, 802, 1000], [547, 91, 191, 549, 151, 442, 221, 291],
                  [802, 153, 301, 311, 504, 499, 263, 269], [695, 36, 634, 805, 738, 151, 355, 337],
                  [874, 111, 142, 439, 972, 722, 939, 399], [547, 91, 191, 549, 878, 842, 328, 912]]


def _wrap64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def bigint_rows(h: NgramHasher, ids: list[int], layer: int) -> list[list[int]]:
    """The hash written out element by element with Python integers (independent of numpy/torch)."""
    m = [int(x) for x in h.multipliers[layer]]
    out = []
    for t in range(len(ids)):
        row = []
        for n in range(2, h.max_ngram_size + 1):
            mix = 0
            for k in range(n):
                tok = ids[t - k] if t - k >= 0 else h.pad_id
                mix ^= _wrap64(tok * m[k])
            row += [mix % p for p in h.table_sizes[layer][n - 2]]  # Python % is floored, like numpy
        out.append(row)
    return out


def test_golden_rows_and_bigint_derivation():
    h = NgramHasher(**SMALL)
    ids = [5, 17, 96, 0, 5, 17]
    rows = h.hash(np.array([ids]))
    assert rows[1][0].tolist() == GOLDEN_ROWS_L1
    assert bigint_rows(h, ids, 1) == GOLDEN_ROWS_L1
    assert rows[15][0].tolist() == bigint_rows(h, ids, 15)
    # the bigram (5, 17) occurs at t=1 and t=5: same 2-gram rows, different 3-gram rows
    assert GOLDEN_ROWS_L1[1][:4] == GOLDEN_ROWS_L1[5][:4] and GOLDEN_ROWS_L1[1][4:] != GOLDEN_ROWS_L1[5][4:]


def test_golden_reference_config_on_tekken(tekken):
    """The reference's default config (2 layers, N=3, 8 heads, 5 x 129280 rows) on a real sentence."""
    vocab = tekken
    ids = vocab.tokenizer("Only Alexander the Great could tame the horse Bucephalus.").input_ids
    assert ids == [18585, 15230, 1278, 11560, 2481, 1257, 1509, 1278, 19932, 5258, 103812, 1374, 1046]
    c = vocab(np.array([ids]))
    assert c.tolist() == [[2022, 11195, 1240, 3859, 2133, 1081, 1398, 1240, 14425, 2159, 73706, 1306, 1043]]
    h = NgramHasher(len(vocab), [129280 * 5] * 2, 3, 8, [1, 15], pad_id=int(vocab.lookup[2]), seed=0)
    assert h.table_sizes[1][0][:3] == [646403, 646411, 646421] and h.table_sizes[15][1][-1] == 646879
    rows = h.hash(torch.from_numpy(c))
    assert rows[1][0, 0].tolist() == [603860, 279256, 323082, 606975, 168352, 331754, 195801, 457374,
                                      621891, 87485, 92064, 325347, 312166, 33081, 514344, 625430]
    assert rows[15][0, -1].tolist() == [347614, 116941, 415866, 131414, 63586, 544689, 28473, 433986,
                                        460866, 37777, 581126, 9593, 100553, 406007, 65783, 462894]
    assert rows[1][0].tolist() == bigint_rows(h, c[0].tolist(), 1)


configs = st.fixed_dictionaries(dict(
    compressed_vocab_size=st.integers(2, 200_000),
    max_ngram_size=st.integers(2, 5),
    n_head_per_ngram=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    layer_ids=st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True),
))


def _make(cfg, draw_sizes):
    N = cfg["max_ngram_size"]
    return NgramHasher(cfg["compressed_vocab_size"], draw_sizes[: N - 1], N, cfg["n_head_per_ngram"],
                       cfg["layer_ids"], pad_id=cfg["compressed_vocab_size"] - 1, seed=cfg["seed"])


@settings(max_examples=40, deadline=None)
@given(cfg=configs, sizes=st.lists(st.integers(2, 50_000), min_size=4, max_size=4), data=st.data())
def test_properties_range_causality_incremental_backends(cfg, sizes, data):
    h = _make(cfg, sizes)
    V, N = cfg["compressed_vocab_size"], cfg["max_ngram_size"]
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(1, 12))
    ids = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=B * T, max_size=B * T))).reshape(B, T)
    rows_np = h.hash(ids)
    rows_t = h.hash(torch.from_numpy(ids))
    for lay in h.layer_ids:
        r = rows_np[lay]
        assert isinstance(r, np.ndarray) and r.dtype == np.int64 and r.shape == (B, T, h.num_heads)
        assert np.array_equal(r, rows_t[lay].numpy())  # numpy in == tensor in
        limits = np.array(h.head_sizes(lay))
        assert (r >= 0).all() and (r < limits).all()  # each head within its own prime
        assert r[0].tolist() == bigint_rows(h, ids[0].tolist(), lay)
    # causality: rewriting the future never changes the past
    t = data.draw(st.integers(0, T - 1))
    other = ids.copy()
    other[:, t + 1:] = (other[:, t + 1:] + 1) % V
    for lay, r in h.hash(other).items():
        assert np.array_equal(r[:, : t + 1], rows_np[lay][:, : t + 1])
    # incremental == batch
    w = h.new_window(B)
    for s in range(T):
        step = h.hash_step(h.push(w, ids[:, s]))
        for lay in h.layer_ids:
            assert np.array_equal(step[lay], rows_np[lay][:, s])
    # chunked with a prefix == one pass
    if T > 1:
        cut = data.draw(st.integers(1, T - 1))
        pre = ids[:, max(0, cut - (N - 1)):cut]
        tail = h.hash(ids[:, cut:], prefix_BP=pre)
        for lay in h.layer_ids:
            assert np.array_equal(tail[lay], rows_np[lay][:, cut:])


_CHILD = """
import json, sys, numpy as np
from engram.hashing import NgramHasher
h = NgramHasher(50000, [70001, 90001], 3, 4, [2, 9], pad_id=0, seed=123)
ids = np.random.default_rng(7).integers(0, 50000, (3, 64))
print(json.dumps({"sizes": {str(k): v for k, v in h.table_sizes.items()},
                  "rows": {str(k): v.tolist() for k, v in h.hash(ids).items()}}))
"""


@pytest.mark.slow
def test_deterministic_across_processes_and_hash_seeds():
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1]
    h = NgramHasher(50000, [70001, 90001], 3, 4, [2, 9], pad_id=0, seed=123)
    ids = np.random.default_rng(7).integers(0, 50000, (3, 64))
    assert outs[0]["rows"]["9"] == h.hash(ids)[9].tolist()


def test_step_accepts_tensor_and_short_sequences():
    h = NgramHasher(**SMALL)
    one = h.hash(torch.tensor([[7]]))
    step = h.hash_step(torch.tensor([2, 2, 7]))
    for lay in h.layer_ids:
        assert torch.equal(step[lay][0], one[lay][0, 0])


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(max_ngram_size=1), ValueError, ">= 2"),
    (dict(engram_vocab_size=[1000]), ValueError, "one size per n-gram order"),
    (dict(engram_vocab_size=[1000, 1]), ValueError, "order 3 must be >= 2"),
    (dict(n_head_per_ngram=0), ValueError, "n_head_per_ngram must be >= 1"),
    (dict(layer_ids=[]), ValueError, "at least one layer"),
    (dict(layer_ids=[3, 3]), ValueError, "distinct"),
    (dict(pad_id=97), ValueError, "pad_id 97 is outside"),
    (dict(compressed_vocab_size=2.5), TypeError, "must be an integer"),
])
def test_config_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        NgramHasher(**{**SMALL, **kwargs})


def test_input_errors():
    h = NgramHasher(**SMALL)
    with pytest.raises(ValueError, match="outside the compressed vocabulary"):
        h.hash(np.array([[1, 97]]))
    with pytest.raises(ValueError, match="id -1"):
        h.hash(torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="integer"):
        h.hash(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="integers"):
        h.hash(np.array([[1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        h.hash(np.array([1, 2, 3]))
    with pytest.raises(KeyError, match="no Engram"):
        h.hash_layer(np.array([[1]]), 2)
    with pytest.raises(ValueError, match="last N=3"):
        h.hash_step(np.array([[1, 2]]))
    assert h.hash(np.zeros((0, 5), dtype=np.int64))[1].shape == (0, 5, 8)
