"""V4.1 config, fp8 tables and the Engram layer, checked against independent float64 loops."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import ConfigError
from engram.v41 import V41Config, V41Engram, V41Hasher, dequantize_fp8_rows, quantize_fp8_rows

E4M3, E8M0 = torch.float8_e4m3fn, torch.float8_e8m0fnu

RELEASED_STYLE = {  # a released-style text config: the Engram fields among unrelated ones
    "architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41_text", "vocab_size": 129280,
    "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4, "head_dim": 32, "hc_mult": 3,
    "hc_sinkhorn_iters": 20, "rms_norm_eps": 1e-20, "compress_ratios": [0, 0, 2, 2, 1, 1],
    "engram_layer_ids": [1, 4], "engram_num_embeddings": [120, 184], "engram_max_ngram_size": 3,
    "engram_vocab_size": 23, "engram_n_heads": 2, "engram_head_dim": 32, "engram_pad_id": 2,
    "engram_compressed_vocab_size": 17, "torch_dtype": "bfloat16",
}


def _write(tmp_path, d, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


@pytest.fixture
def cfg(tmp_path):
    return V41Config.from_pretrained(_write(tmp_path, RELEASED_STYLE))


# ------------------------------------------------------------------ config


def test_config_loads_the_released_names_and_keeps_eps(tmp_path, cfg):
    assert cfg.engram_layer_ids == [1, 4] and cfg.hc_mult == 3 and cfg.n_hash_cols == 4
    assert cfg.rms_norm_eps == 1e-20  # honoured as given, not floored to a "safe" value
    assert V41Config.from_pretrained(tmp_path) == cfg  # the directory works too
    composite = {"model_type": "deepseek_v41", "text_config": RELEASED_STYLE, "vision_config": {}}
    assert V41Config.from_pretrained(_write(tmp_path, composite, "c.json")) == cfg
    # the table sizes are what the layout needs: a hasher accepts them
    V41Hasher(cfg, np.arange(20) % 17)


@pytest.mark.parametrize("change,match", [
    ({"engram_n_heads": None}, "lacks engram_n_heads"),
    ({"engram_head_dim": 48}, "multiple of 32"),
    ({"engram_num_embeddings": [120]}, "one table size per Engram layer"),
    ({"engram_max_ngram_size": 1}, ">= 2"),
    ({"hc_mult": "4"}, "hc_mult must be a positive integer"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"engram_layer_ids": [1, 1]}, "distinct"),
])
def test_config_refuses_missing_and_invalid_fields(tmp_path, change, match):
    d = dict(RELEASED_STYLE)
    for k, v in change.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=match):
        V41Config.from_pretrained(_write(tmp_path, d))


def test_config_file_errors_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        V41Config.from_pretrained(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        V41Config.from_pretrained(tmp_path / "bad.json")


def test_a_wrong_compressed_size_is_refused(cfg):
    with pytest.raises(ConfigError, match="18 compressed ids but engram_compressed_vocab_size is 17"):
        V41Hasher(cfg, np.arange(18))


# ------------------------------------------------------------------ fp8


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), log_scale=st.integers(-30, 30), rows=st.integers(1, 5))
def test_fp8_round_trip_error_is_e4m3_rounding(seed, log_scale, rows):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=g) * 2.0**log_scale
    x[0, :32] = 0.0  # an all-zero block
    q, s = quantize_fp8_rows(x)
    assert q.dtype == E4M3 and s.dtype == E8M0 and s.shape == (rows, 2)
    y = dequantize_fp8_rows(q, s)
    assert torch.equal(y[0, :32], x[0, :32])
    scale = s.float().repeat_interleave(32, -1)
    assert (q.float().abs() <= 448).all() and (x.abs() / scale <= 448).all()  # nothing saturates
    # e4m3 keeps 3 mantissa bits: relative error 2^-4, or 2^-10 * scale below the normal range
    assert ((y - x).abs() <= torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)).all()
    # dequantised rows are representable: a second round trip changes no value (the bytes may
    # differ: a block whose largest value rounded to 224 fits the half scale as well)
    assert torch.equal(dequantize_fp8_rows(*quantize_fp8_rows(y)), y)


def test_fp8_scales_are_the_smallest_sufficient_power_of_two():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 32] = 448.0, 449.0  # exactly fits scale 1; just over needs scale 2
    q, s = quantize_fp8_rows(x)
    assert s.float().tolist() == [[1.0, 2.0]]
    assert dequantize_fp8_rows(q, s)[0, 0] == 448.0
    # scales given as raw E8M0 bytes or as floats (a table loaded with widened scales) read the same
    y = dequantize_fp8_rows(q, s)
    assert torch.equal(dequantize_fp8_rows(q, s.view(torch.uint8)), y)
    assert torch.equal(dequantize_fp8_rows(q, s.float()), y)
    with pytest.raises(ValueError, match="multiple of the fp8 block"):
        quantize_fp8_rows(torch.zeros(2, 40))


# ------------------------------------------------------------------ the layer


def _random_module(cfg, layer_id=4, seed=0):
    torch.manual_seed(seed)
    m = V41Engram(cfg, layer_id)
    with torch.no_grad():
        m.embed.weight.normal_()
        m.wkv.weight.normal_(std=0.05)
        m.q_weight.uniform_(-1, 1)
        m.k_weight.uniform_(0.5, 2)
    return m


def ref_forward(table, w_kv, q_w, k_w, eps, h, ids, live) -> np.ndarray:
    """Per-token float64 loop: rows -> keys and value -> per-stream gate -> update."""
    B, T, H, D = h.shape
    out = h.copy()
    for b in range(B):
        for t in range(T):
            if not live[b, t]:
                continue
            kv = w_kv @ np.concatenate([table[i] for i in ids[b, t]])
            value = kv[H * D:]
            for k in range(H):
                key = kv[k * D:(k + 1) * D]
                dot = float(np.sum(h[b, t, k] * q_w[k] * k_w[k] * key))
                dot /= math.sqrt(np.mean(h[b, t, k] ** 2) + eps) * math.sqrt(np.mean(key**2) + eps) * math.sqrt(D)
                z = math.copysign(math.sqrt(max(abs(dot), 1e-6)), dot)
                out[b, t, k] = h[b, t, k] + value / (1 + math.exp(-z))
    return out


def _inputs(cfg, m, seed=1, B=2, T=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, cfg.hc_mult, cfg.hidden_size, generator=g)
    ids = torch.randint(0, m.embed.num_embeddings, (B, T, cfg.n_hash_cols), generator=g)
    live = torch.rand(B, T, generator=g) > 0.3
    return h, ids, live


def test_forward_matches_the_per_token_loop(cfg):
    m = _random_module(cfg)
    h, ids, live = _inputs(cfg, m)
    got = m(h, ids, live)
    p = {k: v.detach().double().numpy() for k, v in m.state_dict().items() if k != "embed.scale"}
    want = ref_forward(p["embed.weight"], p["wkv.weight"], p["q_weight"], p["k_weight"], cfg.rms_norm_eps,
                       h.double().numpy(), ids.numpy(), live.numpy())
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(want, h.numpy(), atol=1e-3)  # memory really entered the live tokens


def test_a_false_mask_shuts_the_gate_exactly(cfg):
    m = _random_module(cfg)
    h, ids, live = _inputs(cfg, m)
    with torch.no_grad():
        m.embed.weight[ids[~live]] = float("nan")  # rows of dead tokens are never used
    out = m(h, ids, live)
    assert torch.equal(out[~live], h[~live])
    all_dead = m(h, ids, torch.zeros_like(live))
    assert torch.equal(all_dead, h)


def test_zero_dot_gives_the_clamped_gate(cfg):
    m = _random_module(cfg)
    with torch.no_grad():
        m.q_weight.zero_()  # <h * 0, key> = 0: the gate is sigmoid(sqrt(1e-6))
    h, ids, _ = _inputs(cfg, m)
    rows = m.embed(ids).flatten(-2)
    value = m.wkv(rows)[..., cfg.hc_mult * cfg.hidden_size:]
    want = h + torch.sigmoid(torch.tensor(1e-3)) * value.unsqueeze(2)
    torch.testing.assert_close(m(h, ids), want.detach())


def test_fp8_state_dict_loads_as_fp8_and_matches_its_float_twin(cfg):
    src = _random_module(cfg)
    q, s = quantize_fp8_rows(src.embed.weight.detach())
    fp8_sd = {**src.state_dict(), "embed.weight": q, "embed.scale": s}
    fp8 = V41Engram(cfg, 4)
    fp8.load_state_dict(fp8_sd)
    assert fp8.embed.weight.dtype == E4M3 and fp8.embed.scale.dtype == E8M0
    assert not fp8.embed.weight.requires_grad
    assert set(fp8.state_dict()) == {"embed.weight", "embed.scale", "wkv.weight", "q_weight", "k_weight"}
    # casting the module leaves an fp8 table as it is (its scales would mean nothing otherwise)
    h, ids, live = _inputs(cfg, src)
    half = V41Engram(cfg, 4)
    half.load_state_dict(fp8_sd)
    half.to(torch.bfloat16)
    assert half.embed.weight.dtype == E4M3 and half.embed.scale.dtype == E8M0
    assert half.wkv.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half(h, ids, live), fp8(h, ids, live), rtol=0.05, atol=0.05)
    # the same rows as a float table: no scale needed (strict load still passes)
    float_sd = {k: v for k, v in fp8_sd.items() if k != "embed.scale"}
    float_sd["embed.weight"] = dequantize_fp8_rows(q, s)
    twin = V41Engram(cfg, 4)
    twin.load_state_dict(float_sd)
    assert twin.embed.weight.dtype == torch.float32
    torch.testing.assert_close(fp8(h, ids, live), twin(h, ids, live), rtol=0, atol=0)
    # a bf16 table keeps bf16 too (every e4m3 value is exact in bf16)
    bf16_sd = dict(float_sd, **{"embed.weight": float_sd["embed.weight"].bfloat16()})
    twin.load_state_dict(bf16_sd)
    assert twin.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(twin(h, ids, live), fp8(h, ids, live), rtol=0, atol=0)


def test_layer_id_is_the_real_one_and_hash_slices_fit_its_table(cfg):
    token_map = np.arange(20) % 17
    rows = V41Hasher(cfg, token_map).hash(torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(0)))
    for li, lid in enumerate(cfg.engram_layer_ids):
        m = _random_module(cfg, layer_id=lid)
        assert m.embed.num_embeddings == cfg.engram_num_embeddings[li]
        h = torch.randn(2, 9, cfg.hc_mult, cfg.hidden_size)
        assert m(h.bfloat16(), rows[:, :, li]).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="layer 2 has no Engram"):
        V41Engram(cfg, 2)
