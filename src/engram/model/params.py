"""Parameter accounting (total / memory / activated per token) and iso-parameter MoE -> Engram configs."""

# Shapes: D model width, V vocabulary, E routed experts, K top-k, Hid expert hidden width,
# H hash heads per Engram layer, d table row width.

from __future__ import annotations

import copy
import dataclasses

import torch

from engram.config import EngramConfig, ModelConfig
from engram.hashing import NgramHasher
from engram.model.vocab import identity_vocab


def _meta_model(cfg: ModelConfig):
    """The model built on the meta device: exact shapes, no memory (tables of any size are free)."""
    from engram.model.transformer import EngramLM

    vocab = None
    if cfg.engram is not None:
        # Parameter shapes do not depend on the compression map (table sizes come from the
        # hash primes), so an identity map of the right size will do.
        vocab = identity_vocab(cfg.vocab_size)
    with torch.device("meta"):
        return EngramLM(cfg, vocab)


def count_params(model_or_cfg) -> dict[str, int]:
    """Parameter counts of an ``EngramLM`` or of the model a ``ModelConfig`` describes.

    Returns a dict with:
        total: unique parameters (tied embeddings counted once).
        memory: Engram table entries (rows * d over all layers).
        backbone: total - memory.
        experts_routed_total: routed-expert weights over all MoE layers.
        activated_per_token: what one token touches: one embedding row, everything dense
            (attention, norms, dense MLPs, shared experts, routers, hyper-connections, Engram
            projections/norms/conv), top_k routed experts per MoE layer, the H gathered table
            rows per Engram layer, and the full LM head (V*D, even when tied).
    A config is counted by building the model on the meta device, so no table is allocated.
    """
    from engram.model.moe import MoE

    model = _meta_model(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    cfg: ModelConfig = model.cfg
    total = sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for p in model.engram_parameters())
    routed_total = routed_active = 0
    for mod in model.modules():
        if isinstance(mod, MoE):
            n = mod.w_gate_up.numel() + mod.w_down.numel()
            routed_total += n
            routed_active += n * mod.top_k // mod.n_experts
    gathered = sum(blk.engram.num_heads * blk.engram.head_dim for blk in model.blocks if blk.engram is not None)
    VD = model.tok_emb.weight.numel()
    head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    dense = total - memory - routed_total - VD - head  # everything every token uses in full
    activated = dense + cfg.d_model + VD + routed_active + gathered
    return {"total": total, "memory": memory, "backbone": total - memory,
            "activated_per_token": activated, "experts_routed_total": routed_total}


def _n_moe_layers(cfg: ModelConfig) -> int:
    return max(0, cfg.n_layers - cfg.first_dense_layers) if cfg.is_moe else 0


ISO_TOLERANCE = 0.005  # how closely match_activated matches totals and activated parameters


def iso_engram_config(moe_cfg: ModelConfig, n_experts_moved: int, engram_template: EngramConfig, *,
                      match_total: bool = False, match_activated: bool = False) -> ModelConfig:
    """An Engram variant of ``moe_cfg`` with about the same total and activated parameters.

    Removes ``n_experts_moved`` routed experts from every MoE layer (top-k unchanged, so the
    activated expert parameters stay equal) and spends the freed parameters on Engram memory
    laid out as ``engram_template`` (layers, orders, heads, widths): one ``engram_vocab_size``
    shared by all orders, chosen so that ``memory ~= removed expert parameters``. Engram's dense
    part (projections, norms, conv: small) comes on top, so the total grows by that much; with
    ``match_total=True`` the memory is shrunk by it instead, making the totals equal. Table sizes
    are primes, so either match is within a fraction of a percent, not exact.

    Engram's dense part and its gathered rows are also activated by every token, so the variant
    activates a few percent more parameters than the MoE. ``match_activated=True`` takes that gap
    out of the variant's shared experts (``shared_expert_hidden`` narrowed until activated parameters
    match within 0.5%), then sizes the memory so the totals match too (implies ``match_total``);
    ValueError naming the gap where the shared experts are too narrow to absorb it.
    Computed from configs alone (primes via :class:`NgramHasher`; nothing is allocated).
    """
    if not moe_cfg.is_moe:
        raise ValueError("iso_engram_config needs an MoE baseline (n_routed_experts > 0)")
    if moe_cfg.engram is not None:
        raise ValueError("the MoE baseline already has Engram memory; pass a config without it")
    n_moved = int(n_experts_moved)
    E_left = moe_cfg.n_routed_experts - n_moved
    if n_moved < 1 or E_left < moe_cfg.moe_top_k:
        raise ValueError(f"n_experts_moved must be in [1, n_routed_experts - moe_top_k = "
                         f"{moe_cfg.n_routed_experts - moe_cfg.moe_top_k}], got {n_experts_moved}")
    if _n_moe_layers(moe_cfg) == 0:
        raise ValueError("the baseline has no MoE layers (first_dense_layers >= n_layers)")
    tmpl = copy.deepcopy(engram_template)
    bad = [i for i in tmpl.layer_ids if not 0 <= i < moe_cfg.n_layers]
    if bad:
        raise ValueError(f"engram_template.layer_ids {bad} are not layers of a {moe_cfg.n_layers}-layer model")

    base = count_params(moe_cfg)
    out = dataclasses.replace(moe_cfg, n_routed_experts=E_left, engram=None)
    if match_activated:
        # Activated parameters do not depend on the table size: measure them with tiny tables.
        gap = count_params(_with_size(out, tmpl, _min_size(tmpl)))["activated_per_token"] - base["activated_per_token"]
        out = _resize_shared(out, -gap, "absorb the Engram variant's extra activated parameters")
    eng = _size_memory(out, tmpl, base["total"], match_total or match_activated, n_moved)
    if match_activated:
        got = count_params(eng)
        for key in ("total", "activated_per_token"):
            if abs(got[key] - base[key]) > ISO_TOLERANCE * base[key]:
                raise ValueError(f"could not match {key}: Engram variant {got[key]:,} vs MoE {base[key]:,} "
                                 f"(more than {ISO_TOLERANCE:.1%} apart)")
    return eng


def activated_control(moe_cfg: ModelConfig, target_activated: int) -> ModelConfig:
    """``moe_cfg`` with its shared experts widened (``shared_expert_hidden``) until it activates about
    ``target_activated`` parameters per token (within one unit of width).

    The control run for an activated-parameter gap: an MoE activating as much as the Engram variant it
    is compared with, so a difference in loss that remains is not the extra activated parameters'.
    ValueError where the model has no shared experts to widen, or the target would need a width below 1.
    """
    if not moe_cfg.is_moe:
        raise ValueError("activated_control needs an MoE config (n_routed_experts > 0)")
    gap = int(target_activated) - count_params(moe_cfg)["activated_per_token"]
    return _resize_shared(moe_cfg, gap, f"reach {int(target_activated):,} activated parameters")


def _resize_shared(cfg: ModelConfig, delta: int, why: str) -> ModelConfig:
    """``cfg`` with ``shared_expert_hidden`` changed by the width nearest to ``delta`` parameters (all
    shared-expert parameters are activated, so the activated count moves by the same amount)."""
    per_unit = 3 * cfg.d_model * cfg.n_shared_experts * _n_moe_layers(cfg)  # SwiGLU: gate, up, down
    if per_unit == 0:
        raise ValueError(f"cannot {why} ({delta:+,} parameters): the model has no shared experts in MoE layers")
    width = cfg.shared_hidden + round(delta / per_unit)
    if width < 1:
        raise ValueError(f"cannot {why}: a gap of {delta:+,} activated parameters takes "
                         f"{round(delta / per_unit):+} of shared-expert width ({per_unit:,} parameters each), "
                         f"but the shared experts are only {cfg.shared_hidden} wide")
    return dataclasses.replace(cfg, shared_expert_hidden=width)


def _min_size(tmpl: EngramConfig) -> int:
    return max(tmpl.n_head_per_ngram, 2)


def _with_size(out: ModelConfig, tmpl: EngramConfig, size: int) -> ModelConfig:
    eng = dataclasses.replace(tmpl, engram_vocab_size=[int(size)] * (tmpl.max_ngram_size - 1))
    return dataclasses.replace(out, engram=eng)


def _size_memory(out: ModelConfig, tmpl: EngramConfig, base_total: int, match_total: bool,
                 n_moved: int) -> ModelConfig:
    """``out`` with Engram memory laid out as ``tmpl`` and sized to ``base_total`` less ``out``'s own
    parameters (less Engram's dense part too with ``match_total``)."""
    no_mem_total = count_params(out)["total"]
    d = tmpl.n_embed_per_ngram // tmpl.n_head_per_ngram
    n_tables = len(tmpl.layer_ids) * (tmpl.max_ngram_size - 1) * tmpl.n_head_per_ngram
    min_size = _min_size(tmpl)
    # Engram's dense overhead does not depend on the table size: measure it with tiny tables.
    overhead = count_params(_with_size(out, tmpl, min_size))["backbone"] - no_mem_total
    budget = base_total - no_mem_total - (overhead if match_total else 0)  # memory entries to spend
    if budget < n_tables * d * min_size:
        raise ValueError(f"moving {n_moved} experts frees too few parameters ({base_total - no_mem_total}) "
                         f"for an Engram memory of {n_tables} tables of width {d}")
    size = budget // (n_tables * d)
    # Heads take the next distinct primes above `size`, overshooting a little; correct once or twice.
    for _ in range(3):
        rows = _table_rows(_with_size(out, tmpl, size))
        excess = rows * d - budget
        step = round(excess / (n_tables * d))
        if step == 0:
            break
        size = max(min_size, size - step)
    return _with_size(out, tmpl, size)


def _table_rows(cfg: ModelConfig) -> int:
    """Total table rows of ``cfg``'s Engram memory (primes from the hasher, no tables built)."""
    e = cfg.engram
    hasher = NgramHasher(max(2, e.pad_id + 1), e.engram_vocab_size, e.max_ngram_size, e.n_head_per_ngram,
                         e.layer_ids, pad_id=e.pad_id, seed=e.seed)
    return sum(sum(hasher.head_sizes(lay)) for lay in e.layer_ids)
