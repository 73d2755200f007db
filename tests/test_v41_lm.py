"""The V4.1 flavour as an Engram variant of EngramLM (`model.engram.flavour = "v41"`).

What must hold: the LM's V4.1 layer computes exactly what `engram.v41.V41Engram` computes on the same
weights and the V4.1 hasher's ids; its hashing gives the same ids however a sequence is chunked (and a
dead token blocks the look-back); decoding equals the full forward pass; it trains, saves and loads,
serves from a disk store and from row-sharded tables exactly like the RAM model; parameter counts are
the real ones.

Legend: B batch, T time, H hash heads, M residual streams, D model width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engram.config import ConfigError, EngramConfig, ModelConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM, generate
from engram.model.params import count_params
from engram.model.v41_flavour import V41Layer, V41NgramHasher
from engram.v41 import V41Config, V41Engram, V41Hasher

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent


def v41_cfg(tiny, *, hc_mult: int = 1, sizes=(53, 53), embed: int = 64, dtype: str = "float32") -> ModelConfig:
    """Tiny's model with the v41 layer; one size for all orders and 32-wide rows make its layout one a
    released-style V41Config can describe too (consecutive primes, fp8-block-sized rows)."""
    cfg = tiny.cfg(dtype, hc_mult=hc_mult)
    eng = dataclasses.replace(cfg.engram, engram_vocab_size=list(sizes), n_embed_per_ngram=embed, flavour="v41")
    return dataclasses.replace(cfg, engram=eng)


def v41_model(tiny, seed: int = 0, **kw) -> EngramLM:
    torch.manual_seed(seed)
    model = EngramLM(v41_cfg(tiny, **kw), tiny.vocab()).eval()
    with torch.no_grad():  # off the all-ones init, so the gate weights matter
        for blk in model.blocks:
            if blk.engram is not None:
                blk.engram.q_weight.add_(0.3 * torch.randn_like(blk.engram.q_weight))
                blk.engram.k_weight.add_(0.3 * torch.randn_like(blk.engram.k_weight))
    return model


def released_config(model: EngramLM) -> V41Config:
    """The V41Config describing ``model``'s memory the way a released checkpoint would."""
    e, cfg = model.cfg.engram, model.cfg
    return V41Config(hidden_size=cfg.d_model, hc_mult=cfg.hc_mult, engram_layer_ids=list(e.layer_ids),
                     engram_num_embeddings=[model.blocks[i].engram.num_rows for i in e.layer_ids],
                     engram_max_ngram_size=e.max_ngram_size, engram_vocab_size=e.engram_vocab_size[0],
                     engram_n_heads=e.n_head_per_ngram, engram_head_dim=e.n_embed_per_ngram // e.n_head_per_ngram,
                     engram_pad_id=e.pad_id, engram_compressed_vocab_size=len(model.vocab),
                     rms_norm_eps=cfg.norm_eps)


# ------------------------------------------------------------------------------------------- config
def test_flavour_defaults_to_demo_and_is_checked():
    assert EngramConfig().flavour == "demo"
    old = EngramConfig().to_dict()
    del old["flavour"]  # a config written before the field existed
    assert EngramConfig.from_dict(old).flavour == "demo"
    with pytest.raises(ConfigError, match="flavour"):
        EngramConfig(flavour="v4")
    with pytest.raises(ConfigError, match="no ablation switches"):
        EngramConfig(flavour="v41", gate="fixed")
    with pytest.raises(ConfigError, match="no ablation switches"):
        EngramConfig(flavour="v41", branch_gates="shared")


def test_the_override_picks_the_layer_and_the_hasher(tiny):
    from engram.train.config import apply_overrides, run_preset

    cfg = apply_overrides(run_preset("debug"), ["model.engram.flavour=v41"])
    assert cfg.model.engram.flavour == "v41"
    model = EngramLM(v41_cfg(tiny), tiny.vocab())
    assert isinstance(model.hasher, V41NgramHasher)
    assert all(isinstance(b.engram, V41Layer) for b in model.blocks if b.engram is not None)
    assert isinstance(EngramLM(tiny.cfg(), tiny.vocab()).blocks[0].engram, torch.nn.Module)
    assert not isinstance(EngramLM(tiny.cfg(), tiny.vocab()).blocks[0].engram, V41Layer)


# ------------------------------------------------------------------------------- the layer is V41Engram
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_layer_equals_v41engram_on_the_same_weights_and_ids(tiny, hc_mult):
    model = v41_model(tiny, hc_mult=hc_mult)
    rcfg = released_config(model)
    ref_hasher = V41Hasher(rcfg, tiny.vocab().lookup)
    idx = tiny.ids(3, 12, seed=5)
    mask = torch.rand(idx.shape, generator=torch.Generator().manual_seed(2)) > 0.25
    ours = model.hasher.hash(model.vocab_lookup[idx], token_mask=mask)
    ref_rows = ref_hasher.hash(idx, mask)
    h = torch.randn(3, 12, hc_mult, rcfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in rcfg.engram_layer_ids:
        eng = model.blocks[layer].engram
        # the same ids: ours per head, the released ones with each head's offset into the layer's table
        assert torch.equal(eng.flat_rows(ours[layer]), ref_rows[:, :, rcfg.layer_index(layer)])
        ref = V41Engram(rcfg, layer)
        ref.load_state_dict(eng.released_state_dict(), strict=False)
        assert torch.equal(ref.embed.weight, eng.table.weight)
        want = ref(h, ref_rows[:, :, rcfg.layer_index(layer)], mask)
        got = h + eng(h, ours[layer], token_mask=mask)
        assert torch.equal(got, want)
        assert torch.equal(got[~mask], h[~mask]) and not torch.equal(got[mask], h[mask])
        # and back: released weights load into the LM layer
        twin = V41Layer(rcfg.hidden_size, eng.head_sizes, max_ngram_size=3, n_head_per_ngram=2,
                        n_embed_per_ngram=64, hc_mult=hc_mult, norm_eps=rcfg.rms_norm_eps)
        twin.load_released_state_dict(ref.state_dict())
        assert torch.equal(twin(h, ours[layer], token_mask=mask), eng(h, ours[layer], token_mask=mask))


def test_fp8_released_rows_load_dequantised(tiny):
    from engram.v41 import dequantize_fp8_rows, quantize_fp8_rows

    model = v41_model(tiny)
    eng = model.blocks[0].engram
    q, scale = quantize_fp8_rows(eng.table.weight.detach())
    state = {**eng.released_state_dict(), "embed.weight": q, "embed.scale": scale}
    eng.load_released_state_dict(state)
    assert torch.equal(eng.table.weight, dequantize_fp8_rows(q, scale).float())


# ---------------------------------------------------------------------------------------- hashing
@given(cuts=st.lists(st.integers(1, 11), max_size=4, unique=True), seed=st.integers(0, 2**16),
       dead=st.floats(0.0, 0.6))
def test_any_chunking_gives_the_ids_of_one_pass(tiny, cuts, seed, dead):
    hasher = EngramLM(v41_cfg(tiny), tiny.vocab()).hasher
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(0, 30, (2, 12), generator=g)
    mask = torch.rand(comp.shape, generator=g) >= dead
    whole = hasher.hash(comp, token_mask=mask)
    state, parts, bounds = hasher.new_window(2), [], [0, *sorted(cuts), 12]
    for a, b in zip(bounds, bounds[1:], strict=False):
        read = hasher.window_rows(state, comp[:, a:b], token_mask=mask[:, a:b])
        tail = state.tail_BK.clone()
        step = hasher.window_rows(state, comp[:, a:b], token_mask=mask[:, a:b])
        assert torch.equal(state.tail_BK, tail)  # reading does not advance
        hasher.slide(state, comp[:, a:b], token_mask=mask[:, a:b])
        parts.append(read)
        assert all(torch.equal(read[k], step[k]) for k in read)
    for layer in hasher.layer_ids:
        assert torch.equal(torch.cat([p[layer] for p in parts], 1), whole[layer])
    assert state.position == 12


def test_without_dead_tokens_the_ids_are_the_demo_hashers_and_dead_ones_block_the_look_back(tiny):
    e = v41_cfg(tiny).engram
    v41 = V41NgramHasher.from_config(e, tiny.vocab())
    demo = NgramHasher.from_config(e, tiny.vocab())
    comp = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(4))
    for layer in e.layer_ids:
        assert torch.equal(v41.hash(comp)[layer], demo.hash(comp)[layer])
        assert np.array_equal(v41.hash(comp.numpy())[layer], demo.hash(comp.numpy())[layer])
        pre = comp[:, :2]
        assert torch.equal(v41.hash(comp[:, 2:], prefix_BP=pre)[layer], demo.hash(comp)[layer][:, 2:])
    mask = torch.ones_like(comp, dtype=torch.bool)
    mask[:, 4] = False
    rows = v41.hash(comp, token_mask=mask)
    # after a dead token the sequence hashes as if it started there
    for layer in e.layer_ids:
        assert torch.equal(rows[layer][:, 5:], demo.hash(comp[:, 5:])[layer])
        assert torch.equal(rows[layer][:, :4], demo.hash(comp)[layer][:, :4])


# ------------------------------------------------------------------------------- model: decode, persistence
def test_incremental_decoding_equals_the_full_forward_pass(tiny):
    model = v41_model(tiny, hc_mult=2)
    idx = tiny.ids(2, 14, seed=8)
    with torch.no_grad():
        full = model(idx).logits
        state = model.new_decode_state(2)
        parts = [model(idx[:, a:b], cache=state).logits for a, b in ((0, 5), (5, 6), (6, 7), (7, 14))]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        state = model.new_decode_state(2)
        steps = [model.forward_step(idx[:, t], state) for t in range(14)]
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
        out = generate(model, idx[:, :4], 6, temperature=0)
        assert torch.equal(out[:, 6:], model(out[:, :-1]).logits[:, 5:].argmax(-1))  # greedy = argmax of one pass


def test_save_load_round_trip(tiny, tmp_path):
    model = v41_model(tiny, hc_mult=2)
    d = model.save_pretrained(tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["engram"]["flavour"] == "v41"
    back = EngramLM.from_pretrained(d).eval()
    assert isinstance(back.blocks[0].engram, V41Layer)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(),
                                                  strict=True))
    idx = tiny.ids()
    with torch.no_grad():
        assert torch.equal(back(idx).logits, model(idx).logits)
    # a demo-flavour directory (whose config names no flavour) still loads as the demo layer
    demo = tiny.model().save_pretrained(tmp_path / "demo")
    raw = json.loads((demo / "config.json").read_text())
    assert raw["engram"].pop("flavour") == "demo"
    (demo / "config.json").write_text(json.dumps(raw))
    old = EngramLM.from_pretrained(demo, verify=False)  # the edited file no longer matches its checksum
    assert old.cfg.engram.flavour == "demo" and not isinstance(old.blocks[0].engram, V41Layer)


# ---------------------------------------------------------------------------------------- training
def test_gradients_reach_table_projection_and_gate(tiny):
    model = v41_model(tiny).train()
    idx, tgt = tiny.ids(2, 10, seed=1), tiny.ids(2, 10, seed=2)
    model(idx, tgt).loss.backward()
    for layer in (0, 2):
        eng = model.blocks[layer].engram
        g = eng.table.weight.grad
        assert g.is_sparse and g.coalesce().values().abs().sum() > 0
        for p in (eng.wkv.weight, eng.q_weight, eng.k_weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_corpus):
    """The debug preset with the v41 layer, trained a few steps (fp32, one thread)."""
    from engram.data import prepare_data
    from engram.train.config import apply_overrides, run_preset
    from engram.train.trainer import Trainer

    base = tmp_path_factory.mktemp("v41train")
    corpus = make_corpus(base / "corpus")
    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)
    cfg = apply_overrides(run_preset("debug"), [
        "train.steps=12", "train.eval_every=6", "train.ckpt_every=6", "train.dtype='float32'", "train.threads=1",
        "data.vocab_size=512", f"data.data={[str(corpus)]!r}", "model.engram.flavour=v41", "model.hc_mult=2"])
    tr = Trainer(cfg, base / "run", data=data, progress=False)
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    res = tr.train()
    return {"base": base, "corpus": corpus, "res": res, "before": before, "model": tr.model, "run": base / "run"}


def test_the_v41_lm_trains(trained):
    from engram.train.run import read_metrics

    res, model = trained["res"], trained["model"]
    assert res.status == "finished" and res.step == 12 and math.isfinite(res.val_loss)
    losses = [r["loss"] for r in read_metrics(trained["run"] / "metrics.jsonl") if r["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    after = model.state_dict()
    for name in ("blocks.0.engram.table.weight", "blocks.0.engram.wkv.weight", "blocks.0.engram.q_weight",
                 "blocks.0.engram.k_weight"):
        assert not torch.equal(trained["before"][name], after[name].cpu()), name
    assert count_params(model)["memory"] == model.blocks[0].engram.table.weight.numel()


def test_disk_store_serving_equals_ram(trained, capsys, monkeypatch):
    from engram.cli import main

    monkeypatch.setenv("ENGRAM_CACHE", str(trained["base"] / "cache"))
    model, store = str(trained["run"] / "model"), str(trained["base"] / "store")
    assert main(["export-memory", "--model", model, "--out", store]) == 0
    capsys.readouterr()
    ev = ["eval", "--model", model, "--data", str(trained["corpus"]), "--batch-size", "2", "--seq-len", "32",
          "--eval-tokens", "256", "--json"]
    assert main([*ev, "--memory", "ram"]) == 0
    ram = json.loads(capsys.readouterr().out)
    assert main([*ev, "--memory", "disk", "--store", store, "--cold", "--no-prefetch"]) == 0
    disk = json.loads(capsys.readouterr().out)
    assert disk["val_loss"] == ram["val_loss"] and disk["tokens"] == ram["tokens"] > 0
    gen = ["generate", "--model", model, "--prompt", "def value", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(gen) == 0
    plain = capsys.readouterr().out
    assert main([*gen, "--memory", "disk", "--store", store]) == 0
    assert capsys.readouterr().out == plain


# ------------------------------------------------------------------------------------ row-sharded serving
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    """A saved v41 model, its store and its single-process outputs (the inputs of tests/distributed_worker.py)."""
    sys.path.insert(0, str(HERE))
    from engram.serve import export_tables
    from test_distributed import _run_worker

    root = tmp_path_factory.mktemp("v41served")
    model = v41_model(tiny, sizes=(53, 67), dtype="bfloat16")
    model_dir = model.save_pretrained(root / "model")
    store_dir = export_tables(model_dir, root / "store")
    idx, prompt = tiny.ids(), tiny.ids(2, 5, seed=3)
    batches = [(tiny.ids(3, 10, seed=s), tiny.ids(3, 10, seed=s + 100)) for s in range(4)]
    batches[1][1][0, :3] = -100
    with torch.no_grad():
        total = n = 0
        for x, y in batches:
            k = int((y != -100).sum())
            total += float(model(x, y).loss) * k
            n += k
        ref = {"logits": model(idx).logits, "greedy": generate(model, prompt, 8, temperature=0),
               "sampled": generate(model, prompt, 8, temperature=0.9, top_k=10,
                                   generator=torch.Generator().manual_seed(7)), "loss": total / n}

    def run(world: int) -> dict:
        out = tmp_path_factory.mktemp(f"v41serve{world}")
        _run_worker(world, "serve", out, str(model_dir), str(store_dir))
        return torch.load(out / "serve.pt")

    return ref, run


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_row_sharded_serving_equals_one_process(served, world):
    ref, run = served
    got = run(world)
    assert len(got) == 4  # from the weights and from the store, with either exchange
    for key, out in got.items():
        assert torch.equal(out["logits"], ref["logits"]), key
        assert torch.equal(out["greedy"], ref["greedy"]), key
        assert torch.equal(out["sampled"], ref["sampled"]), key
        assert out["loss"] == ref["loss"], key


# ------------------------------------------------------------------------------------ parameter counting
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_count_params_is_the_real_count(tiny, hc_mult):
    cfg = v41_cfg(tiny, hc_mult=hc_mult)
    model = EngramLM(cfg, tiny.vocab())
    counted = count_params(cfg)
    assert counted == count_params(model)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    engs = [b.engram for b in model.blocks if b.engram is not None]
    assert counted["memory"] == sum(e.num_rows * e.head_dim for e in engs)
    # the dense part of a V4.1 layer is wkv (no bias) and the two gate weights: nothing else (no conv, no norms)
    D, M, E = cfg.d_model, hc_mult, engs[0].embed_dim
    per_layer = E * (M + 1) * D + 2 * M * D
    plain = count_params(dataclasses.replace(cfg, engram=None))
    assert counted["backbone"] - plain["backbone"] == len(engs) * per_layer
    assert counted["activated_per_token"] - plain["activated_per_token"] == len(engs) * (per_layer + E)
    demo = count_params(dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, flavour="demo")))
    assert demo["memory"] == counted["memory"] and demo["backbone"] > counted["backbone"]


def test_compare_builds_an_iso_parameter_v41_variant(make_corpus, tmp_path):
    from engram.cli.parser import build_parser
    from engram.train.compare import variants
    from engram.train.config import apply_overrides, run_preset

    base = apply_overrides(run_preset("debug"), [
        "model.n_routed_experts=6", "model.moe_top_k=2", "model.expert_hidden=64", "model.first_dense_layers=1"])
    pair = variants(base, 2, flavour="v41")
    assert pair["engram"].model.engram.flavour == "v41" and pair["moe"].model.engram is None
    moe, eng = count_params(pair["moe"].model), count_params(pair["engram"].model)
    assert abs(eng["total"] - moe["total"]) / moe["total"] < 0.01
    assert variants(base, 2)["engram"].model.engram.flavour == "demo"
    with pytest.raises(ConfigError, match="flavour"):
        variants(base, 2, flavour="v5")
    args = build_parser().parse_args(["compare", "--preset", "debug", "--flavour", "v41"])
    assert args.flavour == "v41"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--flavour", "v5"])
