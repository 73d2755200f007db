"""Tests for the backbone: EngramLM, MoE, hyper-connections, persistence and parameter accounting."""

# Shapes: B batch, T time, N tokens, D model width, E experts, K top-k, M residual branches, V vocabulary.

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM, HyperConnection, MoE, count_params, iso_engram_config
from engram.tokenizer.compression import CompressedVocab

V = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_engram(**kw) -> EngramConfig:
    base = dict(engram_vocab_size=[53, 59], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0, 2], pad_id=0,
                conv_init="default", kernel_size=3)
    return EngramConfig(**{**base, **kw})


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, mlp_hidden=48, max_seq_len=24, engram=tiny_engram())
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def build(tiny):
    """``build(seed=0, **config overrides)``: a tiny model, seeded (engram=None: no Engram, no vocabulary)."""

    def make(seed=0, **kw) -> EngramLM:
        torch.manual_seed(seed)
        cfg = tiny_cfg(**kw)
        return EngramLM(cfg, tiny.vocab() if cfg.engram is not None else None)

    return make


def ids(B=2, T=10, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the LM

@pytest.mark.parametrize("kw", [{}, dict(n_routed_experts=4, moe_top_k=2, expert_hidden=16), dict(hc_mult=3)])
def test_causal(kw, build):
    model = build(**kw).eval()
    a = ids(T=16)
    b = a.clone()
    b[:, 9:] = (b[:, 9:] + 7) % V
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert torch.equal(la[:, :9], lb[:, :9])
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


def test_forward_outputs_and_objective(build):
    model = build(n_routed_experts=4, moe_top_k=2, expert_hidden=16, first_dense_layers=1)
    x = ids()
    out = model(x, x)
    assert out.logits.shape == (2, 10, V)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, V), x.reshape(-1)))
    torch.testing.assert_close(out.total_loss, out.loss + model.cfg.router_aux_coef * out.aux_loss)
    assert out.aux_loss > 0
    dense = build()(x)
    assert dense.loss is None and dense.total_loss is None and float(dense.aux_loss) == 0.0
    # Precomputed rows (the prefetch hook) give the same result as computing them inside.
    rows = model.engram_rows(x)
    assert sorted(rows) == [0, 2] and rows[0].shape == (2, 10, 4)
    assert torch.equal(model(x, engram_rows=rows).logits, out.logits)


def test_bf16_autocast_runs_and_is_close(build):
    model = build(n_routed_experts=4, moe_top_k=2, expert_hidden=16, hc_mult=2, hc_dynamic=True)
    x = ids()
    ref = model(x, x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x)
    out.total_loss.backward()
    assert out.logits.dtype == torch.bfloat16 and abs(out.loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None for p in model.parameters())


def test_training_steps_reduce_loss(build):
    model = build(n_routed_experts=4, moe_top_k=2, expert_hidden=16, hc_mult=2)
    x = ids(B=4, T=16)
    dense_opt = torch.optim.AdamW(model.backbone_parameters(), lr=3e-3)
    table_opt = torch.optim.SparseAdam(model.engram_parameters(), lr=1.5e-2)
    first = None
    for _ in range(25):
        out = model(x[:, :-1], x[:, 1:])
        out.total_loss.backward()
        dense_opt.step()
        table_opt.step()
        model.zero_grad(set_to_none=True)
        first = out.loss.item() if first is None else first
    assert out.loss.item() < first - 0.5


def test_engram_table_grads_are_sparse_and_groups_partition(build):
    model = build(n_routed_experts=4, moe_top_k=2, expert_hidden=16)
    model(ids(), ids(seed=2)).total_loss.backward()
    tables = model.engram_parameters()
    assert len(tables) == 2 and all(t.grad.is_sparse for t in tables)
    backbone = model.backbone_parameters()
    assert all(not p.grad.is_sparse for p in backbone)
    ids_all = [id(p) for p in model.parameters()]
    assert sorted(ids_all) == sorted(id(p) for p in tables + backbone)
    assert len(set(map(id, tables)) & set(map(id, backbone))) == 0


def test_init_scales_and_tying(build):
    model = build(n_layers=4, engram=None, tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 2e-3
    w = torch.cat([b.attn.out_proj.weight.flatten() for b in model.blocks])
    assert abs(w.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert abs(untied.blocks[0].engram.table.weight.std().item() - 1.0) < 0.1  # tables keep N(0, 1)


@pytest.mark.parametrize("tied", [True, False])
def test_embed_init_std_scales_the_token_embedding_alone(build, tied):
    """embed_init_std changes the token embedding's (and a tied head's) std and nothing else: the same draws
    scaled, every other weight bit-identical, so the default init is the one runs were made with."""
    base = build(engram=None, tie_embeddings=tied)
    wide = build(engram=None, tie_embeddings=tied, embed_init_std=0.1)
    assert torch.allclose(wide.tok_emb.weight, 5 * base.tok_emb.weight, rtol=1e-5, atol=1e-7)
    a, b = dict(base.named_parameters()), dict(wide.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a if k != "tok_emb.weight")  # untied lm_head: still N(0, 0.02)
    with pytest.raises(ValueError, match="embed_init_std"):
        tiny_cfg(embed_init_std=0.0)


def test_bad_inputs_raise_clear_errors(build):
    model = build()
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(ids(), ids()[:, :5])
    with pytest.raises(ValueError, match="target id"):
        model(ids(), torch.full((2, 10), V))
    with pytest.raises(ValueError, match="engram_rows"):
        model(ids(), engram_rows={0: torch.zeros(2, 10, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="CompressedVocab"):
        EngramLM(tiny_cfg())
    with pytest.raises(ValueError, match="vocab maps"):
        EngramLM(tiny_cfg(), CompressedVocab(np.arange(10)))
    model(ids(), torch.full((2, 10), -100))  # all-ignored targets are fine


# ------------------------------------------------------------------------------------ persistence

@pytest.mark.parametrize("kw", [{}, dict(engram=None, tie_embeddings=False),
                                dict(n_routed_experts=4, moe_top_k=2, expert_hidden=16, hc_mult=2, hc_dynamic=True,
                                     engram=tiny_engram(table_dtype="bfloat16"))])
def test_save_load_roundtrip(tmp_path, kw, build):
    model = build(**kw)
    with torch.no_grad():
        for p in model.parameters():  # make sure nothing is left at a reproducible init
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["checksums.json", "config.json", "model.safetensors"]
                           + (["vocab.safetensors"] if model.vocab else []))
    loaded = EngramLM.from_pretrained(tmp_path)
    x = ids()
    assert torch.equal(model(x).logits, loaded(x).logits)
    if model.vocab is not None:
        assert np.array_equal(loaded.vocab.lookup, model.vocab.lookup)
    assert loaded.cfg == model.cfg


def test_load_errors(tmp_path, build):
    model = build()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        EngramLM.from_pretrained(tmp_path / "nothing")
    # Truncated weights.
    bad = tmp_path / "trunc"
    model.save_pretrained(bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        EngramLM.from_pretrained(bad)
    with pytest.raises(ValueError, match="not a readable safetensors"):  # what the checksums guard against
        EngramLM.from_pretrained(bad, verify=False)
    # Garbage config.
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid model config"):
        EngramLM.from_pretrained(bad, verify=False)
    # A config that does not describe the weights.
    mis = tmp_path / "mis"
    model.save_pretrained(mis)
    cfg = json.loads((mis / "config.json").read_text())
    cfg["mlp_hidden"] = 64
    (mis / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json is truncated or altered"):
        EngramLM.from_pretrained(mis)
    with pytest.raises(ValueError, match="does not match"):
        EngramLM.from_pretrained(mis, verify=False)
    # Missing vocabulary.
    (tmp_path / "m" / "vocab.safetensors").unlink()
    with pytest.raises(ValueError, match="vocab.safetensors is missing"):
        EngramLM.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="vocab.safetensors"):
        EngramLM.from_pretrained(tmp_path / "m", verify=False)


# ------------------------------------------------------------------------------------ MoE

def naive_moe(moe: MoE, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference: softmax router, top-k, renormalise, weighted expert sum."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    probs_NE = torch.softmax(x_ND @ moe.router.weight.T, dim=-1)
    out = []
    for n in range(x_ND.shape[0]):
        w, e = probs_NE[n].topk(moe.top_k)
        w = w / w.sum()
        y = moe.shared(x_ND[n]) if moe.shared is not None else torch.zeros_like(x_ND[n])
        for wk, ek in zip(w, e.tolist(), strict=True):
            g, u = (x_ND[n] @ moe.w_gate_up[ek]).chunk(2)
            y = y + wk * ((F.silu(g) * u) @ moe.w_down[ek])
        out.append(y)
    counts = torch.bincount(probs_NE.topk(moe.top_k, dim=-1).indices.flatten(), minlength=moe.n_experts)
    f = counts.float() / (x_ND.shape[0] * moe.top_k)
    aux = moe.n_experts * (f * probs_NE.mean(0)).sum()
    return torch.stack(out).view_as(x_BTD), aux


@pytest.mark.parametrize("n_shared", [0, 2])
def test_moe_matches_naive_loop(n_shared):
    torch.manual_seed(0)
    moe = MoE(16, n_routed_experts=7, n_shared_experts=n_shared, top_k=3, expert_hidden=8)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # spread routing so most experts get tokens
    x = torch.randn(3, 11, 16)
    y, aux = moe(x)
    y_ref, aux_ref = naive_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, aux_ref)
    assert int(moe.last_expert_counts.sum()) == 33 * 3
    (y.square().sum() + aux).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = moe.last_expert_counts > 0
    assert (moe.w_gate_up.grad.flatten(1).abs().sum(1) > 0).eq(used).all()
    assert (moe.w_down.grad.flatten(1).abs().sum(1) > 0).eq(used).all()


def test_moe_aux_is_one_when_uniform_and_bf16_works():
    moe = MoE(8, n_routed_experts=4, n_shared_experts=1, top_k=4, expert_hidden=4)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities, every expert takes every token
    _, aux = moe(torch.randn(2, 5, 8))
    torch.testing.assert_close(aux, torch.tensor(1.0))
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = moe(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), moe(x)[0], atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------ hyper-connections

def test_hyper_connections_with_one_branch_equal_plain_residual(build):
    model = build(n_routed_experts=4, moe_top_k=2, expert_hidden=16, engram=tiny_engram()).eval()
    x = ids()
    with torch.no_grad():
        plain = model(x).logits
        for i, blk in enumerate(model.blocks):
            blk.attn_hc = HyperConnection(32, 1, 2 * i)
            blk.mlp_hc = HyperConnection(32, 1, 2 * i + 1)
        wrapped = model(x).logits
    assert torch.equal(plain, wrapped)


def test_hyper_connection_formula_and_dynamic_init():
    torch.manual_seed(0)
    M, D = 3, 8
    hc = HyperConnection(D, M, layer_index=4, dynamic=True)
    h = torch.randn(2, 5, M, D)
    x0, co0 = hc.width(h)
    assert torch.equal(x0, h[:, :, 4 % M])  # one-hot input weights; the dynamic part is zero at init
    with torch.no_grad():
        hc.static_a.normal_()
        hc.static_r.normal_()
        hc.static_b.normal_()
    static = HyperConnection(D, M, 4)
    static.load_state_dict({k: v for k, v in hc.state_dict().items() if k.startswith("static")})
    y = torch.randn(2, 5, D)
    x, co = static.width(h)
    out = static.depth(h, y, co)
    a, R, b = hc.static_a, hc.static_r, hc.static_b
    torch.testing.assert_close(x, torch.einsum("m,btmd->btd", a, h))
    ref = torch.einsum("mn,btnd->btmd", R, h) + b[:, None] * y[:, :, None]
    torch.testing.assert_close(out, ref)
    xd, cod = hc.width(h)  # dynamic with zero W equals static
    torch.testing.assert_close(hc.depth(h, y, cod), ref)


# ------------------------------------------------------------------------------------ parameter accounting

def test_count_params_by_group(build):
    model = build(n_routed_experts=4, moe_top_k=2, expert_hidden=16, n_shared_experts=1, first_dense_layers=1,
                  hc_mult=2, tie_embeddings=False)
    c = count_params(model)
    assert c == count_params(model.cfg)  # from the config alone (meta device)
    assert c["total"] == sum(p.numel() for p in model.parameters())
    assert c["memory"] == sum(p.numel() for p in model.engram_parameters())
    assert c["backbone"] == sum(p.numel() for p in model.backbone_parameters())
    routed = sum(m.w_gate_up.numel() + m.w_down.numel() for m in model.modules() if isinstance(m, MoE))
    assert c["experts_routed_total"] == routed
    # Activated: everything except the tables, unused experts and all but one embedding row.
    eng = model.blocks[0].engram
    gathered = 2 * eng.num_heads * eng.head_dim
    expect = c["backbone"] - routed // 2 - (V - 1) * 32 + gathered
    assert c["activated_per_token"] == expect


def test_iso_engram_config():
    moe = ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, mlp_hidden=128, max_seq_len=64,
                      n_routed_experts=16, moe_top_k=2, expert_hidden=128, first_dense_layers=1)
    template = EngramConfig(engram_vocab_size=[1000, 1000], n_embed_per_ngram=32, n_head_per_ngram=4,
                            layer_ids=[1], pad_id=0)
    eng = iso_engram_config(moe, 6, template)
    assert eng.n_routed_experts == 10 and eng.moe_top_k == 2 and eng.engram.layer_ids == [1]
    assert len(set(eng.engram.engram_vocab_size)) == 1
    a, b = count_params(moe), count_params(eng)
    removed = a["experts_routed_total"] - b["experts_routed_total"]
    print(f"\nMoE    : {a}\nEngram : {b}\nremoved experts {removed}, engram_vocab_size {eng.engram.engram_vocab_size}")
    assert a["memory"] == 0 and abs(b["memory"] - removed) / removed < 0.01
    assert abs(b["total"] - a["total"]) / a["total"] < 0.01
    assert abs(b["activated_per_token"] - a["activated_per_token"]) / a["activated_per_token"] < 0.05
    # match_total trades Engram's dense overhead against memory: totals agree even more closely.
    t = count_params(iso_engram_config(moe, 6, template, match_total=True))
    assert abs(t["total"] - a["total"]) / a["total"] < 0.002 and t["memory"] < b["memory"]
    with pytest.raises(ValueError, match="n_experts_moved"):
        iso_engram_config(moe, 15, template)
    with pytest.raises(ValueError, match="MoE baseline"):
        iso_engram_config(ModelConfig(), 1, template)
