"""Ablation switches of the Engram layer (compress, gate, short_conv, branch_gates) and the
activated-parameter matching of the iso-parameter comparison."""

# Shapes: B batch, T time, M residual branches, D model width, E gathered row width, k conv taps.

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import ConfigError, EngramConfig, ModelConfig
from engram.model import EngramLM, count_params
from engram.model import mix as mix_module
from engram.model.engram import Engram
from engram.model.params import ISO_TOLERANCE, activated_control, iso_engram_config
from engram.model.vocab import identity_vocab, model_vocab
from engram.train.config import RunConfig, apply_overrides, run_preset

pytestmark = pytest.mark.usefixtures("one_thread")

SWITCHES = {"gate": "fixed", "short_conv": False, "branch_gates": "shared"}
D, M, H, d, K = 16, 2, 4, 8, 3  # model width, branches, heads, row width, conv taps
E = H * d


def engram(M=M, conv_init="default", **switches) -> Engram:
    torch.manual_seed(0)
    mod = Engram(D, [11] * H, max_ngram_size=3, n_head_per_ngram=H // 2, n_embed_per_ngram=H // 2 * d,
                 hc_mult=M, kernel_size=K, conv_init=conv_init, **switches)
    with torch.no_grad():  # off the ones init of the norms, so every weight matters
        for name, p in mod.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return mod


def inputs(M=M, B=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, M, D, generator=g), torch.randn(B, T, E, generator=g)


def shapes(mod) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in mod.named_parameters() if not n.startswith("table.")}


# ------------------------------------------------------------------------------------ parameter sets

def test_each_switch_removes_exactly_its_parameters():
    full = shapes(engram())
    assert full == {"value_proj.weight": (D, E), "value_proj.bias": (D,), "key_proj.weight": (M * D, E),
                    "key_proj.bias": (M * D,), "key_norm.weight": (M, D), "query_norm.weight": (M, D),
                    "short_conv.norm.weight": (M, D), "short_conv.weight": (M * D, 1, K)}
    gate_keys = {"key_proj.weight", "key_proj.bias", "key_norm.weight", "query_norm.weight"}
    assert shapes(engram(gate="fixed")) == {k: v for k, v in full.items() if k not in gate_keys}
    assert shapes(engram(short_conv=False)) == {k: v for k, v in full.items() if not k.startswith("short_conv.")}
    shared = shapes(engram(branch_gates="shared"))
    assert shared == {**full, "key_proj.weight": (D, E), "key_proj.bias": (D,), "key_norm.weight": (1, D),
                      "query_norm.weight": (1, D)}
    both = shapes(engram(gate="fixed", short_conv=False))
    assert both == {"value_proj.weight": (D, E), "value_proj.bias": (D,)}


def test_model_parameter_counts_follow_the_switches(tiny):
    """count_params of a model differs from the default by exactly the removed weights, per Engram layer."""
    base = tiny.cfg(hc_mult=2)
    n_layers, Dm, Mm = len(base.engram.layer_ids), base.d_model, 2
    Em, k = base.engram.n_embed_per_ngram * (base.engram.max_ngram_size - 1), base.engram.kernel_size
    ref = count_params(base)
    expect = {"gate": Em * Mm * Dm + Mm * Dm + 2 * Mm * Dm, "short_conv": Mm * Dm + Mm * Dm * k,
              "branch_gates": (Mm - 1) * (Em * Dm + Dm + 2 * Dm)}
    for name, value in SWITCHES.items():
        cfg = dataclasses.replace(base, engram=dataclasses.replace(base.engram, **{name: value}))
        got = count_params(cfg)
        assert ref["total"] - got["total"] == n_layers * expect[name], name
        assert ref["activated_per_token"] - got["activated_per_token"] == n_layers * expect[name], name
        assert got["memory"] == ref["memory"]


# ------------------------------------------------------------------------------------ the math

def test_fixed_gate_is_one_and_the_output_is_value_plus_conv():
    h, e = inputs()
    mod = engram(gate="fixed")
    out, aux = mod(h, emb=e, return_gates=True)
    assert torch.equal(aux["gates"], torch.ones(2, 9, M))
    v = mod.value_proj(e).unsqueeze(2).expand(-1, -1, M, -1)
    conv, _ = mod.short_conv(v.contiguous())
    assert conv.abs().max() > 0  # the conv contributes, so the check below sees it
    torch.testing.assert_close(out, v + conv)
    no_conv = engram(gate="fixed", short_conv=False)
    assert torch.equal(no_conv(h, emb=e), no_conv.value_proj(e).unsqueeze(2).expand(-1, -1, M, -1))


def test_without_short_conv_the_output_is_the_gated_value():
    h, e = inputs()
    ref = engram()
    mod = engram(short_conv=False)
    mod.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("short_conv.")})
    _, aux = ref(h, emb=e, return_gates=True)
    out, aux2 = mod(h, emb=e, return_gates=True)
    torch.testing.assert_close(aux2["gates"], aux["gates"])
    torch.testing.assert_close(out, aux["gates"].unsqueeze(-1) * ref.value_proj(e).unsqueeze(2))


@pytest.mark.parametrize("short_conv", [True, False])
def test_shared_gates_with_one_branch_equal_per_branch(short_conv):
    h, e = inputs(M=1)
    ref = engram(M=1, short_conv=short_conv)
    mod = engram(M=1, branch_gates="shared", short_conv=short_conv)
    mod.load_state_dict(ref.state_dict())
    out, aux = mod(h, emb=e, return_gates=True)
    want, waux = ref(h, emb=e, return_gates=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["gates"], waux["gates"], rtol=1e-5, atol=1e-6)


def test_shared_gate_comes_from_the_branch_mean_and_scales_every_branch():
    h, e = inputs()
    mod = engram(branch_gates="shared")
    _, aux = mod(h, emb=e, return_gates=True)
    g = aux["gates"]
    assert torch.equal(g[..., 0], g[..., 1])
    # The same gate from a one-branch per-branch layer fed the mean hidden state, same key weights.
    one = engram(M=1)
    one.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith("short_conv.")}, strict=False)
    _, aux1 = one(h.mean(2, keepdim=True), emb=e, return_gates=True)
    torch.testing.assert_close(g[..., :1], aux1["gates"], rtol=1e-5, atol=1e-6)
    # Branches differ: the gate really is shared, not recomputed per branch.
    per = engram()
    _, paux = per(h, emb=e, return_gates=True)
    assert not torch.equal(paux["gates"][..., 0], paux["gates"][..., 1])


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_ablated_layers_run_eagerly_and_train(switch, monkeypatch):
    """A non-default layer never takes the fused path, and every parameter it has gets a gradient."""
    def refuse(*a, **k):
        raise AssertionError("an ablated layer must use the eager engram_mix")

    mod = engram(**{switch: SWITCHES[switch]})
    monkeypatch.setattr(mix_module.FusedMix, "apply", refuse)
    monkeypatch.setattr("engram.model.engram.FusedMix.apply", refuse)
    mod.compiled_mix = True  # not even when compiling is asked for
    h, e = inputs()
    h.requires_grad_(True)
    mod(h, emb=e).square().sum().backward()
    for name, p in mod.named_parameters():
        if name != "table.weight":
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if switch == "gate":
        assert h.grad is None  # without the gate the increment does not read the hidden state at all
    else:
        assert h.grad.abs().sum() > 0


@pytest.mark.parametrize("switches", [{"gate": "fixed"}, {"short_conv": False}, {"branch_gates": "shared"},
                                      {"gate": "fixed", "short_conv": False}], ids=str)
def test_chunked_decode_equals_one_pass(switches):
    h, e = inputs(T=10)
    mod = engram(**switches)
    with torch.no_grad():
        want, waux = mod(h, emb=e, return_gates=True)
        state, outs, gates = None, [], []
        for a, b in [(0, 4), *((t, t + 1) for t in range(4, 10))]:
            o, aux = mod(h[:, a:b], emb=e[:, a:b], conv_state=state, return_state=True, return_gates=True)
            state = aux["conv_state"]
            outs.append(o)
            gates.append(aux["gates"])
    assert state.shape == (2, mod.state_len, M * D)
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(gates, 1), waux["gates"])


# ------------------------------------------------------------------------------------ compress

def test_compress_false_hashes_raw_ids(tiny):
    """Ids 5 and 35 compress together in the tiny vocabulary: their rows agree with compression, not without."""
    comp = EngramLM(tiny.cfg(), tiny.vocab())
    cfg = tiny.cfg()
    cfg.engram.compress = False
    vocab = model_vocab(cfg, "no tokenizer is read for the identity map")
    assert np.array_equal(vocab.lookup, np.arange(tiny.V)) and vocab.original_size == tiny.V
    raw = EngramLM(cfg, vocab)
    a, b = torch.tensor([[1, 2, 5, 7]]), torch.tensor([[1, 2, 35, 7]])
    assert int(tiny.vocab().lookup[5]) == int(tiny.vocab().lookup[35])
    for lay in cfg.engram.layer_ids:
        assert torch.equal(comp.engram_rows(a)[lay], comp.engram_rows(b)[lay])
        ra, rb = raw.engram_rows(a)[lay], raw.engram_rows(b)[lay]
        assert torch.equal(ra[:, :2], rb[:, :2])  # before the differing token, and
        assert not torch.equal(ra[:, 2:], rb[:, 2:])  # every n-gram that reaches it differs
    assert model_vocab(dataclasses.replace(cfg, engram=None), "unused") is None
    with pytest.raises(ValueError):
        identity_vocab(0)


# ------------------------------------------------------------------------------------ configs

def test_old_config_dicts_load_with_defaults():
    d = EngramConfig().to_dict()
    for k in ("compress", "gate", "short_conv", "branch_gates"):
        d.pop(k)
    e = EngramConfig.from_dict(d)
    assert (e.compress, e.gate, e.short_conv, e.branch_gates) == (True, "context", True, "per_branch")
    assert not e.ablated
    run = run_preset("debug").to_dict()
    run["model"].pop("shared_expert_hidden")
    for k in ("compress", "gate", "short_conv", "branch_gates"):
        run["model"]["engram"].pop(k)
    cfg = RunConfig.from_dict(run)
    assert cfg.model.shared_expert_hidden is None and cfg.model.shared_hidden == cfg.model.expert_hidden
    assert cfg.to_dict() == run_preset("debug").to_dict()


def test_switches_are_settable_recorded_and_validated():
    cfg = apply_overrides(run_preset("debug"), ["model.engram.gate='fixed'", "model.engram.short_conv=false",
                                                "model.engram.branch_gates='shared'", "model.engram.compress=false",
                                                "model.shared_expert_hidden=96"])
    e = cfg.model.engram
    assert (e.gate, e.short_conv, e.branch_gates, e.compress, cfg.model.shared_expert_hidden) == (
        "fixed", False, "shared", False, 96)
    assert e.ablated
    assert RunConfig.from_dict(copy.deepcopy(cfg.to_dict())).to_dict() == cfg.to_dict()
    for bad, field in [("model.engram.gate='none'", "gate"), ("model.engram.branch_gates='mean'", "branch_gates"),
                       ("model.engram.short_conv=3", "short_conv"), ("model.shared_expert_hidden=0",
                                                                     "shared_expert_hidden")]:
        with pytest.raises(ConfigError, match=field):
            apply_overrides(run_preset("debug"), [bad])
    with pytest.raises(ConfigError, match="gate must be"):
        EngramConfig(gate="off")
    with pytest.raises(ConfigError, match="compress must be"):
        EngramConfig(compress="no")


# ------------------------------------------------------------------------------------ iso-parameter matching

def demo_moe(**kw) -> tuple[ModelConfig, EngramConfig]:
    base = run_preset("demo").model
    template = base.engram
    return dataclasses.replace(base, engram=None, **kw), template


def test_shared_expert_hidden_defaults_to_the_expert_width():
    moe, _ = demo_moe()
    same = dataclasses.replace(moe, shared_expert_hidden=moe.expert_hidden)
    assert count_params(same) == count_params(moe)
    wide = dataclasses.replace(moe, shared_expert_hidden=moe.expert_hidden + 10)
    n_moe = moe.n_layers - moe.first_dense_layers
    grown = count_params(wide)["activated_per_token"] - count_params(moe)["activated_per_token"]
    assert grown == 10 * 3 * moe.d_model * moe.n_shared_experts * n_moe
    with torch.device("meta"):
        names = {n for n, _ in EngramLM(moe).named_parameters()}
        assert names == {n for n, _ in EngramLM(wide).named_parameters()}


@settings(max_examples=12)
@given(n_moved=st.integers(1, 30), d_model=st.sampled_from([128, 256]), n_shared=st.sampled_from([1, 2]))
def test_match_activated_matches_totals_and_activated(n_moved, d_model, n_shared):
    moe, template = demo_moe(d_model=d_model, n_shared_experts=n_shared)
    base = count_params(moe)
    plain = count_params(iso_engram_config(moe, n_moved, template, match_total=True))
    assert plain["activated_per_token"] > base["activated_per_token"]  # the gap the option closes
    eng = iso_engram_config(moe, n_moved, template, match_activated=True)
    got = count_params(eng)
    assert abs(got["total"] - base["total"]) <= ISO_TOLERANCE * base["total"]
    assert abs(got["activated_per_token"] - base["activated_per_token"]) <= ISO_TOLERANCE * base["activated_per_token"]
    assert eng.shared_expert_hidden < moe.expert_hidden and eng.n_routed_experts == moe.n_routed_experts - n_moved
    assert got["memory"] > plain["memory"]  # the narrower shared experts' parameters went into memory


def test_match_activated_names_the_gap_it_cannot_absorb():
    moe, template = demo_moe(n_shared_experts=0)
    with pytest.raises(ValueError, match="no shared experts"):
        iso_engram_config(moe, 8, template, match_activated=True)
    moe, template = demo_moe(shared_expert_hidden=2)
    with pytest.raises(ValueError, match=r"gap of -[\d,]+ activated parameters"):
        iso_engram_config(moe, 8, template, match_activated=True)


def test_activated_control_widens_the_shared_experts_to_the_target():
    moe, template = demo_moe()
    target = count_params(iso_engram_config(moe, 8, template, match_total=True))["activated_per_token"]
    ctl = activated_control(moe, target)
    assert ctl.shared_expert_hidden > moe.expert_hidden and ctl.n_routed_experts == moe.n_routed_experts
    per_unit = 3 * moe.d_model * moe.n_shared_experts * (moe.n_layers - moe.first_dense_layers)
    assert abs(count_params(ctl)["activated_per_token"] - target) <= per_unit / 2
    assert activated_control(moe, count_params(moe)["activated_per_token"]).shared_hidden == moe.expert_hidden
    with pytest.raises(ValueError, match="no shared experts"):
        activated_control(demo_moe(n_shared_experts=0)[0], target)


def test_compare_exposes_match_activated():
    from engram.cli.parser import build_parser
    from engram.train.compare import variants

    p = build_parser()
    assert p.parse_args(["compare"]).match_activated is False
    assert p.parse_args(["compare", "--match-activated"]).match_activated is True
    base = run_preset("demo")
    plain, matched = variants(base, 8), variants(base, 8, match_activated=True)
    assert plain["engram"].model.shared_expert_hidden is None
    assert matched["engram"].model.shared_expert_hidden < base.model.expert_hidden
    assert matched["moe"].to_dict() == plain["moe"].to_dict()


# ------------------------------------------------------------------------------------ training, saving, serving

RUNS = {"gate": ["model.engram.gate='fixed'"], "short_conv": ["model.engram.short_conv=false"],
        "branch_gates": ["model.engram.branch_gates='shared'", "model.hc_mult=2"],
        "compress": ["model.engram.compress=false"]}


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory, make_corpus):
    from engram.data import prepare_data

    base = tmp_path_factory.mktemp("ablate")
    corpus = make_corpus(base / "corpus")
    return corpus, prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)


@pytest.mark.parametrize("switch", list(RUNS))
def test_trainer_trains_saves_and_serves_each_switch(switch, corpus_data, tmp_path):
    from engram.model import generate
    from engram.serve import export_tables, open_memory
    from engram.train.trainer import Trainer

    corpus, data = corpus_data
    cfg = apply_overrides(run_preset("debug"), [
        "train.steps=4", "train.ckpt_every=4", "train.eval_every=4", "train.log_every=2", "train.dtype='float32'",
        "train.threads=1", "data.vocab_size=512", f"data.data={[str(corpus)]!r}", *RUNS[switch]])
    res = Trainer(cfg, tmp_path / "run", data=data, progress=False).train()
    assert res.status == "finished" and np.isfinite(res.val_loss)
    model_dir = tmp_path / "run" / "model"
    model = EngramLM.from_pretrained(model_dir).eval()
    saved = model.cfg.engram
    assert getattr(saved, switch) == getattr(apply_overrides(run_preset("debug"), RUNS[switch]).model.engram, switch)
    is_identity = np.array_equal(model.vocab.lookup, np.arange(model.cfg.vocab_size))
    assert is_identity == (switch == "compress")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_decode_state(2)
        model(ids[:, :5], cache=state)
        steps = torch.stack([model.forward_step(ids[:, t], state) for t in range(5, 14)], 1)
        greedy = generate(model, ids[:, :4], 6, temperature=0)
    torch.testing.assert_close(steps, full[:, 5:], rtol=1e-4, atol=1e-5)
    store = export_tables(model_dir, tmp_path / "store")
    with open_memory(model_dir, "disk", store) as lm:
        assert not lm.model.has_tables
        torch.testing.assert_close(lm(ids).logits, full, rtol=1e-5, atol=1e-6)
        assert torch.equal(lm.generate(ids[:, :4], 6, temperature=0), greedy)
