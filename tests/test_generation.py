"""Incremental decoding (KV cache + hashing window + ShortConv state) against full forward passes."""

# Shapes: B batch, T time, V vocabulary.

import contextlib
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM, generate

V = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(kind: str, **kw) -> ModelConfig:
    eng = EngramConfig(engram_vocab_size=[53, 59], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0, 2],
                       pad_id=0, conv_init="default", kernel_size=3)
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, mlp_hidden=48, max_seq_len=40, engram=eng)
    extra = {
        "dense": {},
        "moe": dict(n_routed_experts=6, moe_top_k=2, expert_hidden=16, n_shared_experts=1, first_dense_layers=1),
        "hc2": dict(hc_mult=2),
        "hc4": dict(hc_mult=4, hc_dynamic=True, n_routed_experts=4, moe_top_k=2, expert_hidden=16),
        "plain": dict(engram=None),
    }[kind]
    return ModelConfig(**{**base, **extra, **kw})


@pytest.fixture
def make_model(tiny):
    """``make_model(kind, seed=0, **config overrides)``: a tiny model of that kind, off its symmetric init."""

    def make(kind: str, seed: int = 0, **kw) -> EngramLM:
        torch.manual_seed(seed)
        cfg = make_cfg(kind, **kw)
        model = EngramLM(cfg, tiny.vocab() if cfg.engram is not None else None).eval()
        with torch.no_grad():  # move everything off its symmetric init so every path matters
            for name, p in model.named_parameters():
                if "hc" in name or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    return make


@pytest.mark.parametrize("kind", ["dense", "moe", "hc2", "hc4", "plain"])
def test_step_by_step_matches_full_forward(kind, make_model):
    model = make_model(kind)
    B, T, P = 2, 14, 5
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx).logits
        state = model.new_decode_state(B)
        pre = model(idx[:, :P], cache=state).logits
        steps = [model.forward_step(idx[:, t], state) for t in range(P, T)]
    got = torch.cat([pre, torch.stack(steps, dim=1)], dim=1)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=0)
    assert state.length == T


def test_chunked_prefill_matches_full_forward(make_model):
    """A multi-token chunk after a prefix takes the explicit-mask path and the prefix-hash path."""
    model = make_model("hc2")
    idx = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx).logits
        state = model.new_decode_state(3)
        parts = [model(idx[:, a:b], cache=state).logits for a, b in ((0, 3), (3, 7), (7, 8), (8, 12))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)


def test_decode_hash_window_matches_batch_hash(make_model):
    model = make_model("dense")
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    rows = model.engram_rows(idx)
    comp = model.vocab_lookup[idx]
    hasher = model.hasher
    window = hasher.new_window(2)
    for t in range(9):  # one token at a time: the numpy fast path
        step_rows = hasher.window_rows(window, comp[:, t : t + 1])
        hasher.slide(window, comp[:, t : t + 1])
        for lay in rows:
            assert torch.equal(step_rows[lay][:, 0], rows[lay][:, t])
    window = hasher.new_window(2)
    for a, b in ((0, 2), (2, 3), (3, 9)):  # chunks: the prefix path, then the window slides past them
        chunk_rows = hasher.window_rows(window, comp[:, a:b])
        hasher.slide(window, comp[:, a:b])
        for lay in rows:
            assert torch.equal(chunk_rows[lay], rows[lay][:, a:b])


def test_greedy_generate_matches_naive_argmax(make_model):
    model = make_model("moe")
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, 8, temperature=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache at all: re-run the whole prefix each step
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_and_top1_is_greedy(make_model):
    model = make_model("dense")
    prompt = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(5))
    a = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(a.max()) < V
    top1 = generate(model, prompt, 6, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, generate(model, prompt, 6, temperature=0))
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_generate_rejects_bad_lengths(make_model):
    model = make_model("dense")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 41, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 11)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 1, temperature=-1)
    state = model.new_decode_state(1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=state)
        with pytest.raises(ValueError, match="overflow"):
            model.forward_step(torch.zeros(1, dtype=torch.long), state)
        with pytest.raises(ValueError, match="batch size"):
            model.forward_step(torch.zeros(2, dtype=torch.long), model.new_decode_state(1))


@given(prompt=st.integers(1, 80), requested=st.integers(0, 200), context=st.integers(1, 64))
def test_the_cli_never_generates_past_the_context(prompt, requested, context):
    """`engram generate` samples min(--max-new-tokens, room left) tokens and says so when it caps; a prompt
    that leaves no room is a user error. Whatever it returns, `generate` accepts it."""
    from engram.cli.serving import _context_budget
    from engram.config import UserError

    if requested > 0 and prompt >= context:
        with pytest.raises(UserError, match=f"prompt has {prompt} tokens and the model's context is {context}"):
            _context_budget(prompt, requested, context)
        return
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        n = _context_budget(prompt, requested, context)
    assert n == min(requested, context - prompt) and prompt + n <= context
    err = stderr.getvalue()
    assert (f"--max-new-tokens {requested} capped to {n} to fit the model's {context}-token context" in err) \
        == (n < requested) and err.count("\n") == (n < requested)


def test_generate_fills_the_context_exactly(make_model):
    model = make_model("dense")
    limit = model.cfg.max_seq_len
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, limit - 5, temperature=0)
    assert out.shape == (1, limit) and torch.equal(out[:, :5], prompt)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(model, prompt, limit - 4, temperature=0)
