"""``model.head_bias``: an output bias, optionally started at the train split's log unigram prior.

Invariants: the prior is the add-one, centred log frequency of the ids the run trains on; the bias
costs no random draws (every other weight equals the bias-free model's); it is saved, loaded, served
and resumed like any weight; both models of an iso-parameter pair carry it.
"""

# Shapes: B batch, T time, V vocabulary.

import math

import numpy as np
import pytest
import torch

from engram.config import ConfigError, EngramConfig, ModelConfig
from engram.model import EngramLM, count_params, iso_engram_config
from engram.train.config import apply_overrides, run_preset
from engram.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = ["train.dtype='float32'", "train.threads=1", "data.vocab_size=512", "train.steps=4",
             "train.eval_every=4", "train.ckpt_every=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_corpus):
    from engram.data import prepare_data

    base = tmp_path_factory.mktemp("head-bias")
    corpus = make_corpus(base / "corpus")
    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)
    return {"base": base, "corpus": corpus, "data": data}


def cfg_for(env, *extra):
    return apply_overrides(run_preset("debug"), [*OVERRIDES, f"data.data={[str(env['corpus'])]!r}", *extra])


def test_bad_values_are_refused_by_name():
    with pytest.raises(ConfigError, match="head_bias"):
        ModelConfig(head_bias="prior")
    with pytest.raises(ConfigError, match="head_bias"):
        apply_overrides(run_preset("debug"), ["model.head_bias=yes"])


def test_log_prior_is_the_centred_add_one_log_frequency_of_the_train_split(env):
    tr = Trainer(cfg_for(env, "model.head_bias='log_prior'"), env["base"] / "prior", data=env["data"], progress=False)
    V = tr.cfg.model.vocab_size
    counts = np.zeros(V)
    for t in np.asarray(env["data"].train).reshape(-1):  # counted one by one, not with the trainer's bincount
        counts[t] += 1
    logp = np.log((counts + 1) / (counts.sum() + V))
    bias = tr.model.lm_head.bias.detach().double().numpy()
    np.testing.assert_allclose(bias, logp - logp.mean(), rtol=0, atol=1e-5)
    assert abs(bias.sum()) < 1e-2 and bias.argmax() == counts.argmax()


def test_the_bias_costs_no_draws_and_the_prior_starts_lower(env):
    """Every other weight is the bias-free model's, so a comparison isolates the bias; at step 0 the prior
    predicts the validation split better than the uniform logits a small init gives (ln V)."""
    runs = {hb: Trainer(cfg_for(env, f"model.head_bias={hb!r}"), env["base"] / f"draws-{hb}", data=env["data"],
                        progress=False) for hb in ("none", "zero", "log_prior")}
    ref = runs["none"].model.state_dict()
    for hb in ("zero", "log_prior"):
        sd = runs[hb].model.state_dict()
        assert set(sd) - set(ref) == {"lm_head.bias"}
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not runs["zero"].model.lm_head.bias.any()
    V = runs["none"].cfg.model.vocab_size
    loss0 = {hb: tr.evaluate() for hb, tr in runs.items()}
    assert loss0["none"] == pytest.approx(loss0["zero"], abs=1e-6)
    assert abs(loss0["none"] - math.log(V)) < 0.05
    assert loss0["log_prior"] < loss0["none"] - 0.5


def test_the_trained_bias_is_saved_loaded_served_and_resumed(env, tmp_path):
    from engram.serve import export_tables, open_memory
    from engram.train.run import read_metrics

    cfg = cfg_for(env, "model.head_bias='log_prior'")
    whole = Trainer(cfg, tmp_path / "whole", data=env["data"], progress=False)
    start = whole.model.lm_head.bias.detach().clone()
    whole.train()
    assert not torch.equal(whole.model.lm_head.bias.detach(), start)  # it is trained

    half = Trainer(cfg, tmp_path / "half", data=env["data"], progress=False)
    real = half.sampler.next

    def nxt():
        batch = real()
        half._stop = half.sampler.step >= 2
        return batch

    half.sampler.next = nxt
    half.train()
    Trainer(None, tmp_path / "half", resume=True, data=env["data"], progress=False).train()

    def losses(run):
        return [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]

    assert losses("half") == losses("whole")  # the checkpoint's bias, not a fresh prior, is resumed

    model = EngramLM.from_pretrained(tmp_path / "whole" / "model").eval()
    assert torch.equal(model.lm_head.bias, whole.model.lm_head.bias.detach())
    idx_BT = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    whole.model.eval()
    with torch.no_grad():
        want = whole.model(idx_BT).logits
    assert torch.equal(model(idx_BT).logits, want)
    store = export_tables(tmp_path / "whole" / "model", tmp_path / "store")
    with open_memory(tmp_path / "whole" / "model", "disk", store) as lm:
        assert torch.equal(lm(idx_BT).logits, want)


def test_hugging_face_logits_keep_the_bias(env, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    tr = Trainer(cfg_for(env, "model.head_bias='log_prior'", "train.steps=2", "train.eval_every=2"),
                 tmp_path / "run", data=env["data"], progress=False)
    tr.train()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    native = EngramLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert native.lm_head.bias.abs().max() > 1  # the prior, not zeros
    idx_BT = torch.randint(0, native.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx_BT).logits, native(idx_BT).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_iso_pairs_both_carry_the_bias(tied):
    moe = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_routed_experts=8, moe_top_k=2,
                      expert_hidden=32, head_bias="log_prior", tie_embeddings=tied)
    eng = iso_engram_config(moe, 2, EngramConfig(engram_vocab_size=[101, 101], n_embed_per_ngram=32,
                                                 n_head_per_ngram=2, layer_ids=[1]))
    assert eng.head_bias == "log_prior"
    plain = count_params(ModelConfig(**{**moe.to_dict(), "head_bias": "none"}))
    with_bias = count_params(moe)
    for key in ("total", "activated_per_token"):
        assert with_bias[key] - plain[key] == 300  # one bias per id, used by every token
    with pytest.raises(ValueError, match="no output bias"):
        torch.manual_seed(0)
        EngramLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, mlp_hidden=32)).set_head_prior(
            np.ones(50))
