"""Padding through EngramLM (`token_mask_BT`) and the Hugging Face wrapper (`attention_mask` with zeros).

What must hold: a left- or right-padded batch gives, at every live token, the logits of each sequence
run alone without padding (full forward, and prefill + decode with the cache for left padding), in both
Engram flavours, with and without hyper-connections and MoE; an all-True mask is bit-identical to none;
padding stays out of the MoE's load-balancing loss; a padded batched `generate()` gives each prompt's
own greedy tokens; a bad mask is a clear error.

Legend: B batch, T time, V vocabulary, D model width.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.model import EngramLM, generate
from engram.model.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")

V = 48
KINDS = ("demo", "demo-hc2-moe", "v41", "v41-hc2")
ATOL = 1e-5


@functools.cache
def model(Tiny, kind: str) -> EngramLM:
    """A tiny model of ``kind`` (the ``tiny`` fixture's layout), off its symmetric init so every path matters."""
    kw = {} if "hc2" not in kind else dict(hc_mult=2, hc_dynamic=True, n_routed_experts=4, moe_top_k=2,
                                           expert_hidden=16, n_shared_experts=1, first_dense_layers=1)
    cfg = Tiny.cfg(**kw) if kind != "plain" else Tiny.cfg(engram=None)
    if kind.startswith("v41"):
        cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, engram_vocab_size=[53, 53],
                                                                  n_embed_per_ngram=64, flavour="v41"))
    torch.manual_seed(0)
    m = EngramLM(cfg, Tiny.vocab()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "hc" in name or "q_weight" in name or "k_weight" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def padded(seqs: list[torch.Tensor], T: int, left: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_BT, mask_BT)``: each sequence padded to T on one side with random (non-pad) junk ids."""
    ids_BT = torch.randint(0, V, (len(seqs), T), generator=torch.Generator().manual_seed(seed))
    mask_BT = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        at = slice(T - len(s), T) if left else slice(0, len(s))
        ids_BT[b, at], mask_BT[b, at] = s, True
    return ids_BT, mask_BT


def draw(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), extra=st.integers(0, 3), left=st.booleans(),
       seed=st.integers(0, 1000))
def test_padded_batch_equals_each_sequence_alone(tiny, kind, lengths, extra, left, seed):
    m = model(tiny, kind)
    seqs = draw(lengths, seed)
    ids_BT, mask_BT = padded(seqs, max(lengths) + extra, left, seed)
    with torch.no_grad():
        out = m(ids_BT, token_mask_BT=mask_BT)
        for b, s in enumerate(seqs):
            alone = m(s[None]).logits[0]
            torch.testing.assert_close(out.logits[b][mask_BT[b]], alone, atol=ATOL, rtol=ATOL)
        assert torch.isfinite(out.logits).all()  # padding positions: unspecified, but finite


@pytest.mark.parametrize("kind", ["demo", "v41"])
def test_padded_loss_with_ignored_pad_targets_is_the_unpadded_loss(tiny, kind):
    """Targets at padding are the caller's to set to -100; then the batch loss is the token-weighted
    mean of each sequence's own loss."""
    m = model(tiny, kind)
    seqs = draw([4, 9, 6], seed=17)
    ids_BT, mask_BT = padded(seqs, 10, left=True, seed=17)
    targets_BT = torch.full_like(ids_BT, -100)
    for b, s in enumerate(seqs):
        targets_BT[b, 10 - len(s):-1] = s[1:]
    with torch.no_grad():
        loss = m(ids_BT, targets_BT, token_mask_BT=mask_BT).loss
        ref = sum(m(s[None, :-1], s[None, 1:]).loss * (len(s) - 1) for s in seqs) / sum(len(s) - 1 for s in seqs)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_prefill_then_decode_equals_each_sequence_alone(tiny, kind):
    """The decode state remembers the prompt's padding: later steps (single tokens and a chunk, with no
    mask of their own) still ignore it and continue the live tokens' positions."""
    m = model(tiny, kind)
    seqs = draw([3, 8, 6], seed=5)
    ids_BT, mask_BT = padded(seqs, 9, left=True, seed=5)
    cont_BC = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        state = m.new_decode_state(3)
        pre = m(ids_BT, cache=state, token_mask_BT=mask_BT).logits
        steps = [m.forward_step(cont_BC[:, t], state) for t in range(3)]
        chunk = m(cont_BC[:, 3:], cache=state).logits
        assert state.n_live_B.tolist() == [len(s) + 6 for s in seqs]
        for b, s in enumerate(seqs):
            alone = m(torch.cat([s, cont_BC[b]])[None]).logits[0]
            torch.testing.assert_close(pre[b][mask_BT[b]], alone[: len(s)], atol=ATOL, rtol=ATOL)
            got = torch.cat([torch.stack([x[b] for x in steps]), chunk[b]])
            torch.testing.assert_close(got, alone[len(s):], atol=ATOL, rtol=ATOL)


def test_positions_count_live_tokens_only(tiny):
    """Right padding, then decoding: the pads sit between the prompt and what follows. RoPE is relative,
    so only a model whose other parts never look back over tokens (no Engram: no n-gram look-back, no
    conv) can show it: its continuation equals the unpadded sequence's only if the pads take no position."""
    m = model(tiny, "plain")
    seqs = draw([3, 7], seed=13)
    ids_BT, mask_BT = padded(seqs, 8, left=False, seed=13)
    cont_BC = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        state = m.new_decode_state(2)
        m(ids_BT, cache=state, token_mask_BT=mask_BT)
        got = m(cont_BC, cache=state).logits
        for b, s in enumerate(seqs):
            alone = m(torch.cat([s, cont_BC[b]])[None]).logits[0, len(s):]
            torch.testing.assert_close(got[b], alone, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_inside_a_decode_chunk(tiny, kind):
    """A mask on a later chunk (a right-padded chunk after an unpadded prefix) is honoured too: the
    cached prefix stays visible, the chunk's pads are skipped and positions continue."""
    m = model(tiny, kind)
    pre_BP = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    ids_BT, mask_BT = padded(draw([2, 5], seed=3), 5, left=False, seed=3)
    with torch.no_grad():
        state = m.new_decode_state(2)
        m(pre_BP, cache=state)
        assert state.live_BL is None  # no padding seen yet: the plain path
        out = m(ids_BT, cache=state, token_mask_BT=mask_BT).logits
        for b in range(2):
            whole = torch.cat([pre_BP[b], ids_BT[b][mask_BT[b]]])
            torch.testing.assert_close(out[b][mask_BT[b]], m(whole[None]).logits[0, 4:], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_all_true_mask_is_bit_identical_to_none(tiny, kind):
    m = model(tiny, kind)
    ids_BT = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
    ones = torch.ones_like(ids_BT, dtype=torch.bool)
    with torch.no_grad():
        a, b = m(ids_BT, ids_BT), m(ids_BT, ids_BT, token_mask_BT=ones)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.total_loss, b.total_loss)
        s1, s2 = m.new_decode_state(2), m.new_decode_state(2)
        pre1, pre2 = m(ids_BT[:, :6], cache=s1), m(ids_BT[:, :6], cache=s2, token_mask_BT=ones[:, :6])
        assert torch.equal(pre1.logits, pre2.logits)
        assert torch.equal(m.forward_step(ids_BT[:, 6], s1), m.forward_step(ids_BT[:, 6], s2))
        assert s2.live_BL is None and s2.n_live_B is None


@pytest.mark.parametrize("kind", ["demo", "v41"])
def test_precomputed_rows_take_the_mask_too(tiny, kind):
    m = model(tiny, kind)
    ids_BT, mask_BT = padded(draw([3, 7], seed=8), 8, left=True, seed=8)
    with torch.no_grad():
        rows, plain = m.engram_rows(ids_BT, token_mask_BT=mask_BT), m.engram_rows(ids_BT)
        assert any(not torch.equal(rows[lay], plain[lay]) for lay in rows)  # the pads' junk ids are not hashed
        ref = m(ids_BT, token_mask_BT=mask_BT).logits
        assert torch.equal(m(ids_BT, engram_rows=rows, token_mask_BT=mask_BT).logits, ref)


def test_moe_padding_takes_no_capacity_and_no_aux_loss():
    """Dropless routing: a token's output does not depend on the others; the aux loss counts live tokens."""
    torch.manual_seed(0)
    moe = MoE(16, 4, 1, 2, 8)
    x_BTD = torch.randn(2, 5, 16)
    live_BT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    y, aux = moe(x_BTD, live_BT)
    y_live, aux_live = moe(x_BTD[live_BT][None])
    torch.testing.assert_close(y[live_BT], y_live[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(aux, aux_live, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(moe(x_BTD)[1], aux_live)  # the pads would have shifted it


def test_bad_masks_are_clear_errors(tiny):
    m = model(tiny, "demo")
    ids_BT = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="bool"):
        m(ids_BT, token_mask_BT=torch.ones(2, 6))
    with pytest.raises(ValueError, match="bool"):
        m(ids_BT, token_mask_BT=torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        m(ids_BT, token_mask_BT=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        m.engram_rows(ids_BT, token_mask_BT=torch.ones(6, dtype=torch.bool))
    dead = torch.ones(2, 6, dtype=torch.bool)
    dead[1] = False
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no live token"):
        m(ids_BT, token_mask_BT=dead)
    state = m.new_decode_state(2)
    with pytest.raises(ValueError, match="no live token"):
        m(ids_BT, cache=state, token_mask_BT=dead)
    assert state.length == 0 and state.live_BL is None  # refused before anything was cached


@pytest.mark.parametrize("kind", ["demo-hc2-moe", "v41"])
def test_native_generate_with_left_padding_equals_each_prompt_alone(tiny, kind):
    m = model(tiny, kind)
    seqs = draw([4, 9], seed=11)
    ids_BT, mask_BT = padded(seqs, 9, left=True, seed=11)
    out = generate(m, ids_BT, 8, temperature=0, token_mask_BT=mask_BT)
    for b, s in enumerate(seqs):
        assert torch.equal(out[b, 9:], generate(m, s[None], 8, temperature=0)[0, len(s):])


# ------------------------------------------------------------------------------------ Hugging Face
def hf_model(tiny, kind: str):
    pytest.importorskip("transformers")
    from engram.hf import EngramForCausalLM, EngramHFConfig

    m = model(tiny, kind)
    return EngramForCausalLM(EngramHFConfig.from_model_config(m.cfg), lm=m).eval()


@pytest.mark.parametrize("kind", ["demo", "demo-hc2-moe", "v41"])
def test_hf_left_padded_generate_equals_each_prompt_alone(tiny, kind):
    hf = hf_model(tiny, kind)
    seqs = draw([5, 9], seed=21)
    ids_BT, mask_BT = padded(seqs, 9, left=True, seed=21)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = hf.generate(ids_BT, attention_mask=mask_BT.long(), **kw)
    for b, s in enumerate(seqs):
        alone = hf.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
        assert torch.equal(out[b, 9:], alone[0, len(s):])
    # the decode state's padding changes nothing: a full (masked) forward per step agrees
    assert torch.equal(out, hf.generate(ids_BT, attention_mask=mask_BT.long(), use_cache=False, **kw))
    # beam search reorders the remembered padding with the rest of the state
    beams = dict(kw, num_beams=2)
    assert torch.equal(hf.generate(ids_BT, attention_mask=mask_BT.long(), **beams),
                       hf.generate(ids_BT, attention_mask=mask_BT.long(), use_cache=False, **beams))


def test_hf_forward_threads_the_attention_mask(tiny):
    hf = hf_model(tiny, "demo")
    ids_BT, mask_BT = padded(draw([3, 6], seed=31), 7, left=False, seed=31)
    with torch.no_grad():
        out = hf(ids_BT, attention_mask=mask_BT.long()).logits
        assert torch.equal(out, hf.model(ids_BT, token_mask_BT=mask_BT).logits)
        with pytest.raises(ValueError, match="attention_mask"):
            hf(ids_BT, attention_mask=mask_BT[:, :3].long())
