"""EngramLM: a decoder-only transformer (RoPE, SwiGLU/MoE, hyper-connections) with Engram memory."""

# Shapes: B batch, T time, M residual branches, D model width, V vocabulary, H hash heads.

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import ModelConfig
from engram.hashing import NgramHasher
from engram.memory.provider import LocalMemory, MemoryProvider
from engram.model.engram import Engram
from engram.model.generation import DecodeState
from engram.model.hyper import HyperConnection
from engram.model.layers import CausalSelfAttention, KVCache, RMSNorm, Rotary, SwiGLU
from engram.model.moe import MoE
from engram.model.padding import Padding, check_token_mask, prepare, record
from engram.model.persistence import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, engram_table_key  # noqa: F401
from engram.model.v41_flavour import V41Layer, V41NgramHasher
from engram.tokenizer.compression import CompressedVocab


@dataclass
class ModelOutput:
    """What :meth:`EngramLM.forward` returns.

    logits: ``[B, T, V]`` (autocast dtype under autocast).
    loss: mean next-token cross-entropy over targets != -100 (fp32), or None without targets.
    aux_loss: router load-balancing loss averaged over MoE layers (fp32 scalar; 0 when dense).
    total_loss: the training objective ``loss + cfg.router_aux_coef * aux_loss`` (None without targets).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    total_loss: torch.Tensor | None


class Block(nn.Module):
    """[Engram] -> pre-norm attention -> pre-norm MLP or MoE, on an ``[B, T, M, D]`` residual state.

    With ``hc_mult > 1`` each sublayer is wrapped in a :class:`HyperConnection`; otherwise
    ``attn_hc``/``mlp_hc`` are None and the sublayers read branch 0 with a plain residual add.
    Engram, when present, adds its increment to the whole state (all branches), as in the reference.
    """

    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary, engram: Engram | None) -> None:
        super().__init__()
        D = cfg.d_model
        self.layer = layer
        self.engram = engram
        self.attn_norm = RMSNorm(D, cfg.norm_eps)
        self.attn = CausalSelfAttention(D, cfg.n_heads, rotary)
        self.mlp_norm = RMSNorm(D, cfg.norm_eps)
        self.is_moe = cfg.is_moe and layer >= cfg.first_dense_layers
        if self.is_moe:
            self.mlp: nn.Module = MoE(D, cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_top_k,
                                      cfg.expert_hidden, cfg.shared_hidden)
        else:
            self.mlp = SwiGLU(D, cfg.mlp_hidden)
        use_hc = cfg.hc_mult > 1
        self.attn_hc = HyperConnection(D, cfg.hc_mult, 2 * layer, dynamic=cfg.hc_dynamic) if use_hc else None
        self.mlp_hc = HyperConnection(D, cfg.hc_mult, 2 * layer + 1, dynamic=cfg.hc_dynamic) if use_hc else None

    def _sublayer(self, h_BTMD: torch.Tensor, hc: HyperConnection | None, fn) -> torch.Tensor:
        if hc is None:
            return h_BTMD + fn(h_BTMD[:, :, 0]).unsqueeze(2)
        x_BTD, coeffs = hc.width(h_BTMD)
        return hc.depth(h_BTMD, fn(x_BTD), coeffs)

    def forward(self, h_BTMD: torch.Tensor, rows_BTH: torch.Tensor | None = None,
                memory: MemoryProvider | None = None, *, kv: KVCache | None = None,
                conv_state: torch.Tensor | None = None, pad: Padding | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return ``(h_BTMD, aux_loss or None, new Engram conv state or None)``.

        An Engram block asks ``memory`` for the rows of ``rows_BTH`` here, right before its Engram runs,
        so a provider reading ahead lets the blocks before this one compute meanwhile. ``pad``: the
        padding of this chunk (None: every token live), see :mod:`engram.model.padding`.
        """
        new_conv = None
        live_BT = None if pad is None else pad.live_BT
        if self.engram is not None:
            emb = memory.rows(self.layer, rows_BTH)
            if kv is None:
                h_BTMD = h_BTMD + self.engram(h_BTMD, emb=emb, token_mask=live_BT)
            else:  # decoding: carry the ShortConv history across chunks
                inc, st = self.engram(h_BTMD, emb=emb, conv_state=conv_state, return_state=True, token_mask=live_BT)
                h_BTMD, new_conv = h_BTMD + inc, st["conv_state"]
        where = {} if pad is None else {"positions_BT": pad.pos_BT, "attn_mask_B1TS": pad.attn_B1TS}
        h_BTMD = self._sublayer(h_BTMD, self.attn_hc,
                                lambda x: self.attn(self.attn_norm(x), kv, self.layer, **where))
        aux: list[torch.Tensor] = []

        def mlp(x: torch.Tensor) -> torch.Tensor:
            if not self.is_moe:
                return self.mlp(self.mlp_norm(x))
            y, a = self.mlp(self.mlp_norm(x), live_BT)
            aux.append(a)
            return y

        h_BTMD = self._sublayer(h_BTMD, self.mlp_hc, mlp)
        return h_BTMD, (aux[0] if aux else None), new_conv


class EngramLM(nn.Module):
    """Decoder-only LM with optional Engram memory at ``cfg.engram.layer_ids``.

    Args:
        cfg: the model configuration.
        vocab: the tokenizer's compression map; required when ``cfg.engram`` is set (its
            original size must equal ``cfg.vocab_size``).
        tables: False builds the Engram layers without their tables (nothing allocated for them): the
            rows then come from a memory provider set from outside (:meth:`set_memory`, or ``memory=``
            per call; see ``engram.serve``).

    Attributes:
        hasher: :class:`NgramHasher` (plain attribute) or None without Engram.
        vocab: the :class:`CompressedVocab` or None.
        memory: the :class:`MemoryProvider` the Engram layers read rows from (default: their own tables).
    """

    def __init__(self, cfg: ModelConfig, vocab: CompressedVocab | None = None, *, tables: bool = True) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.has_tables = bool(tables) and cfg.engram is not None
        D, V = cfg.d_model, cfg.vocab_size
        self.hasher: NgramHasher | None = None
        self.vocab: CompressedVocab | None = None
        if cfg.engram is not None:
            if vocab is None:
                raise ValueError("cfg.engram is set, so EngramLM needs the tokenizer's CompressedVocab "
                                 "(vocab=CompressedVocab.from_pretrained(...)) to hash n-grams")
            if vocab.original_size != V:
                raise ValueError(f"vocab maps {vocab.original_size} token ids but cfg.vocab_size is {V}")
            self.vocab = vocab
            hasher_cls = V41NgramHasher if cfg.engram.flavour == "v41" else NgramHasher
            self.hasher = hasher_cls.from_config(cfg.engram, vocab)
            # Non-persistent: rebuilt from vocab.safetensors, and follows .to(device).
            self.register_buffer("vocab_lookup", torch.from_numpy(vocab.lookup.astype(np.int64)), persistent=False)
        self.tok_emb = nn.Embedding(V, D)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        blocks = []
        for i in range(cfg.n_layers):
            eng = None
            if cfg.engram is not None and i in cfg.engram.layer_ids and cfg.engram.flavour == "v41":
                e = cfg.engram
                eng = V41Layer(D, self.hasher.head_sizes(i), max_ngram_size=e.max_ngram_size,
                               n_head_per_ngram=e.n_head_per_ngram, n_embed_per_ngram=e.n_embed_per_ngram,
                               hc_mult=cfg.hc_mult, norm_eps=cfg.norm_eps, table_dtype=e.torch_table_dtype,
                               sparse=e.sparse, init_std=e.init_std, with_table=tables)
            elif cfg.engram is not None and i in cfg.engram.layer_ids:
                e = cfg.engram
                eng = Engram(D, self.hasher.head_sizes(i), max_ngram_size=e.max_ngram_size,
                             n_head_per_ngram=e.n_head_per_ngram, n_embed_per_ngram=e.n_embed_per_ngram,
                             hc_mult=cfg.hc_mult, kernel_size=e.kernel_size, conv_init=e.conv_init,
                             table_dtype=e.torch_table_dtype, sparse=e.sparse, init_std=e.init_std,
                             with_table=tables, gate=e.gate, short_conv=e.short_conv,
                             branch_gates=e.branch_gates)
            blocks.append(Block(cfg, i, self.rotary, eng))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if cfg.head_bias != "none":  # made here, not by nn.Linear: its init would draw and shift every later draw
            self.lm_head.bias = nn.Parameter(torch.zeros(V))  # 0, or the prior (set_head_prior)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.set_memory(None)
        self.reset_parameters()

    # -- memory ----------------------------------------------------------------------------------
    @property
    def memory(self) -> MemoryProvider | None:
        return self.__dict__["_memory"]

    def set_memory(self, provider: MemoryProvider | None) -> EngramLM:
        """Where the Engram layers' rows come from; None: the layers' own tables (None without tables).

        Kept outside the module tree (never a submodule, never in ``state_dict``): the provider is
        infrastructure, the model only calls ``provider.prepare`` and ``provider.rows``. Returns ``self``.
        """
        if provider is None and self.has_tables:
            provider = LocalMemory({blk.layer: blk.engram.table for blk in self.blocks if blk.engram is not None})
        elif provider is not None and not (callable(getattr(provider, "rows", None))
                                           and callable(getattr(provider, "prepare", None))):
            raise TypeError(f"a memory provider needs prepare() and rows() (see engram.memory.MemoryProvider), "
                            f"got {type(provider).__name__}")
        self.__dict__["_memory"] = provider
        return self

    # -- init / parameter groups ---------------------------------------------------------------
    def reset_parameters(self) -> None:
        """N(0, 0.02) for linears, N(0, ``embed_init_std``) for the token embedding (tied: also the output
        head); residual output projections get 0.02/sqrt(2*n_layers) (GPT-2), so the residual stream's variance
        does not grow with depth.
        Engram tables keep their own N(0, 1) init (the reference's); norms start at ones,
        hyper-connections at their static init and the Engram conv at its ``conv_init``."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        emb_w, emb_std = self.tok_emb.weight, self.cfg.embed_init_std
        with torch.no_grad():
            for mod in self.modules():  # the same draws in the same order whatever the stds
                if isinstance(mod, nn.Linear):  # a tied output head is the token embedding
                    nn.init.normal_(mod.weight, 0.0, emb_std if mod.weight is emb_w else std)
                    if mod.bias is not None:
                        mod.bias.zero_()
                elif isinstance(mod, nn.Embedding):
                    nn.init.normal_(mod.weight, 0.0, emb_std if mod is self.tok_emb else std)
                elif isinstance(mod, MoE):
                    mod.reset_parameters(std, out_std)
                elif isinstance(mod, HyperConnection):
                    mod.reset_parameters()
                elif isinstance(mod, RMSNorm):
                    mod.weight.fill_(1.0)
            for blk in self.blocks:
                outs = [blk.attn.out_proj]
                if isinstance(blk.mlp, SwiGLU):
                    outs.append(blk.mlp.down)
                elif blk.mlp.shared is not None:
                    outs.append(blk.mlp.shared.down)
                if isinstance(blk.engram, V41Layer):
                    blk.engram.init_value(out_std)  # its value rows write into the residual stream too
                elif blk.engram is not None:
                    outs.append(blk.engram.value_proj)  # also writes into the residual stream
                for lin in outs:
                    nn.init.normal_(lin.weight, 0.0, out_std)

    def set_head_prior(self, counts_V) -> EngramLM:
        """Set the output bias to the log unigram prior of token ``counts_V`` (one count per id; add-one
        smoothed, centred so the bias sums to 0). With the weights at init the logits are then ~the
        log prior: step 0 predicts the corpus's token frequencies. Returns ``self``."""
        if self.lm_head.bias is None:
            raise ValueError("this model has no output bias (model.head_bias='none')")
        counts = torch.as_tensor(counts_V, dtype=torch.float64).reshape(-1)
        if counts.numel() != self.lm_head.out_features or not bool((counts >= 0).all()):
            raise ValueError(f"set_head_prior needs {self.lm_head.out_features} non-negative counts, one per id; "
                             f"got {counts.numel()}")
        logp = torch.log((counts + 1) / (counts.sum() + counts.numel()))
        with torch.no_grad():
            self.lm_head.bias.copy_((logp - logp.mean()).to(self.lm_head.bias.dtype))
        return self

    def compile_engram(self, on: bool = True) -> EngramLM:
        """Run every Engram layer's post-lookup math through ``torch.compile`` while gradients are
        enabled (training); inference and ``no_grad`` evaluation stay eager. Returns ``self``."""
        for blk in self.blocks:
            if blk.engram is not None:
                blk.engram.compiled_mix = bool(on)
        return self

    def take_engram_tables(self) -> dict[int, nn.Module]:
        """Remove the Engram tables from the model and return them ``{layer: MultiHeadTable}``.

        For a provider that keeps the rows elsewhere (a row-sharded one keeps its slice and lets the rest
        go): afterwards the model is as if built with ``tables=False`` and needs :meth:`set_memory`.
        """
        if not self.has_tables:
            raise ValueError("this model holds no Engram tables to take")
        tables = {}
        for blk in self.blocks:
            if blk.engram is not None:
                tables[blk.layer], blk.engram.table = blk.engram.table, None
        self.has_tables = False
        self.__dict__["_memory"] = None
        return tables

    def engram_parameters(self) -> list[nn.Parameter]:
        """The memory tables' weights (for a sparse-row optimizer: ~5x lr, no weight decay)."""
        return [blk.engram.table.weight for blk in self.blocks
                if blk.engram is not None and blk.engram.table is not None]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (tied weights once); with :meth:`engram_parameters` a partition of ``parameters()``."""
        mem = {id(p) for p in self.engram_parameters()}
        return [p for p in self.parameters() if id(p) not in mem]

    # -- inputs ----------------------------------------------------------------------------------
    def _check_ids(self, idx_BT: torch.Tensor, offset: int = 0) -> None:
        if not isinstance(idx_BT, torch.Tensor):
            raise TypeError(f"token ids must be a torch.Tensor, got {type(idx_BT).__name__}")
        if idx_BT.is_floating_point() or idx_BT.is_complex() or idx_BT.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {idx_BT.dtype}")
        if idx_BT.dim() != 2:
            raise ValueError(f"token ids must be 2-D [batch, time], got shape {tuple(idx_BT.shape)}")
        B, T = idx_BT.shape
        if B == 0 or T == 0:
            raise ValueError(f"empty input: token ids have shape {tuple(idx_BT.shape)}")
        if offset + T > self.cfg.max_seq_len:
            what = f"{T} tokens" if offset == 0 else f"{offset} cached + {T} new tokens"
            raise ValueError(f"sequence too long: {what} > max_seq_len={self.cfg.max_seq_len}")
        lo, hi = torch.aminmax(idx_BT)
        if idx_BT.device.type != "cpu":  # no host sync per forward on an accelerator: the device raises
            torch._assert_async((lo >= 0) & (hi < self.cfg.vocab_size), "token id out of range")
            return
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {self.cfg.vocab_size})")

    @torch.no_grad()
    def engram_rows(self, idx_BT: torch.Tensor, state: DecodeState | None = None, *,
                    token_mask_BT: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Per-layer table row ids ``{layer: [B, T, H]}`` for token ids ``idx_BT`` (compress, then hash).

        Depends only on token ids (and ``token_mask_BT``, see :meth:`forward`), so a data loader can call
        it ahead of the forward pass. With ``state``, the ids of a chunk continuing that decode state (read,
        not advanced: the forward pass with ``cache=state`` advances it). Empty dict without Engram.
        """
        if self.hasher is None:
            return {}
        self._check_ids(idx_BT, 0 if state is None else state.length)
        if token_mask_BT is not None:
            check_token_mask(token_mask_BT, *idx_BT.shape)
        return self._rows(self._compress(idx_BT, token_mask_BT), state, token_mask_BT)

    def _compress(self, idx_BT: torch.Tensor, live_BT: torch.Tensor | None = None) -> torch.Tensor:
        comp_BT = self.vocab_lookup[idx_BT.to(self.vocab_lookup.device).long()]
        if live_BT is not None and not isinstance(self.hasher, V41NgramHasher):
            # demo flavour: a padding token hashes as the pad before a sequence start, so the first live
            # tokens after left padding hash exactly as at the start of their unpadded sequence
            comp_BT = comp_BT.masked_fill(~live_BT.to(comp_BT.device), self.hasher.pad_id)
        return comp_BT

    def _rows(self, comp_BT: torch.Tensor, state: DecodeState | None,
              live_BT: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        mask = self._hash_mask(live_BT)
        if state is None:
            return self.hasher.hash(comp_BT, validate=False, **mask)
        return self.hasher.window_rows(state.window, comp_BT, **mask)

    def _hash_mask(self, live_BT: torch.Tensor | None) -> dict:
        """The v41 hasher takes the mask itself (a dead token blocks its look-back); the demo one got pad ids."""
        return {"token_mask": live_BT} if live_BT is not None and isinstance(self.hasher, V41NgramHasher) else {}

    def _check_rows(self, rows: dict, B: int, T: int) -> None:
        want = sorted(self.hasher.layer_ids) if self.hasher is not None else []
        if sorted(rows) != want:
            raise ValueError(f"engram_rows must hold the Engram layers {want}, got keys {sorted(rows)}")
        for lay, r in rows.items():
            if not isinstance(r, torch.Tensor) or r.dim() != 3 or tuple(r.shape[:2]) != (B, T):
                shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"engram_rows[{lay}] must be a [B={B}, T={T}, H] tensor, got {shape}")

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                engram_rows: dict[int, torch.Tensor] | None = None, cache: DecodeState | None = None,
                memory: MemoryProvider | None = None, token_mask_BT: torch.Tensor | None = None) -> ModelOutput:
        """Logits for ``idx_BT`` (``[B, T]`` int), the loss against ``targets_BT`` (-100 = ignore).

        engram_rows: precomputed :meth:`engram_rows` (computed here when None; give the same mask).
        cache: a :class:`DecodeState` (see :meth:`new_decode_state`): the chunk continues the
            cached sequence and the cache is advanced past it.
        memory: the provider of the Engram rows for this call (default: :attr:`memory`). It is told
            every layer's row ids (``prepare``) before the first block runs.
        token_mask_BT: bool ``[B, T]``, False = padding. A left- or right-padded batch gives at every
            live token the logits of its sequence alone, unpadded (:mod:`engram.model.padding`); a cache
            remembers the mask, so left-padded prompts decode as if unpadded. Logits at padding are
            unspecified: set their targets to -100. All-True = None, bit for bit; a sequence with no
            live token is refused.
        """
        offset = 0 if cache is None else cache.kv.length
        self._check_ids(idx_BT, offset)
        B, T = idx_BT.shape
        if cache is not None and cache.kv.batch_size != B:
            raise ValueError(f"decode state is for batch size {cache.kv.batch_size}, got {B} sequences")
        pad = prepare(token_mask_BT, B, T, cache, idx_BT.device)
        live_BT = None if pad is None else pad.live_BT
        memory = self.memory if memory is None else memory
        if self.hasher is not None:
            if memory is None:
                raise ValueError("this model was built without its Engram tables (tables=False) and has no memory "
                                 "provider: set_memory(...) or pass memory= (rows from a store, see engram.serve)")
            comp_BT = self._compress(idx_BT, live_BT) if cache is not None or engram_rows is None else None
            if engram_rows is None:
                engram_rows = self._rows(comp_BT, cache, live_BT)
            else:
                self._check_rows(engram_rows, B, T)
            memory.prepare(engram_rows)
            if cache is not None:
                self.hasher.slide(cache.window, comp_BT, **self._hash_mask(live_BT))
        elif engram_rows:
            raise ValueError("engram_rows given to a model without Engram layers")

        M = self.cfg.hc_mult
        x_BTD = self.tok_emb(idx_BT)
        h_BTMD = x_BTD.unsqueeze(2).expand(B, T, M, x_BTD.shape[-1])  # the embedding feeds every branch
        aux_terms = []
        for blk in self.blocks:
            rows = engram_rows.get(blk.layer) if engram_rows else None
            conv = cache.conv.get(blk.layer) if cache is not None else None
            h_BTMD, aux, new_conv = blk(h_BTMD, rows, memory, kv=None if cache is None else cache.kv,
                                        conv_state=conv, pad=pad)
            if aux is not None:
                aux_terms.append(aux)
            if cache is not None and new_conv is not None:
                cache.conv[blk.layer] = new_conv
        if cache is not None:
            if pad is not None:
                record(cache, pad)
            cache.kv.advance(T)
        logits_BTV = self.lm_head(self.norm(h_BTMD.sum(dim=2)))
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else torch.zeros((), device=logits_BTV.device)

        loss = total = None
        if targets_BT is not None:
            self._check_targets(targets_BT, B, T)
            loss = F.cross_entropy(logits_BTV.float().reshape(B * T, -1), targets_BT.reshape(-1).long(),
                                   ignore_index=-100)
            total = loss + self.cfg.router_aux_coef * aux_loss
        return ModelOutput(logits=logits_BTV, loss=loss, aux_loss=aux_loss, total_loss=total)

    def _check_targets(self, targets_BT: torch.Tensor, B: int, T: int) -> None:
        if not isinstance(targets_BT, torch.Tensor) or targets_BT.is_floating_point() or targets_BT.is_complex():
            raise TypeError("targets must be an integer tensor")
        if tuple(targets_BT.shape) != (B, T):
            raise ValueError(f"targets must have the ids' shape {(B, T)}, got {tuple(targets_BT.shape)}")
        if targets_BT.device.type != "cpu":  # no host sync per training step on an accelerator: the device raises
            ok = (targets_BT == -100) | ((targets_BT >= 0) & (targets_BT < self.cfg.vocab_size))
            torch._assert_async(ok.all(), "target id out of range (use -100 to ignore a position)")
            return
        valid = targets_BT[targets_BT != -100]
        if valid.numel():
            lo, hi = (int(v) for v in torch.aminmax(valid))
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"target id {lo if lo < 0 else hi} is out of range [0, {self.cfg.vocab_size}) "
                                 f"(use -100 to ignore a position)")

    # -- decoding --------------------------------------------------------------------------------
    def new_decode_state(self, batch_size: int, max_len: int | None = None) -> DecodeState:
        """An empty :class:`DecodeState` for ``batch_size`` sequences of up to ``max_len`` tokens."""
        max_len = self.cfg.max_seq_len if max_len is None else int(max_len)
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={self.cfg.max_seq_len}], got {max_len}")
        kv = KVCache(self.cfg.n_layers, batch_size, self.cfg.n_heads, max_len, self.cfg.head_dim)
        window = self.hasher.new_window(batch_size) if self.hasher is not None else None
        return DecodeState(kv=kv, conv={}, window=window)

    def forward_step(self, idx_B1: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per sequence (``[B]`` or ``[B, 1]``) and return its next-token logits ``[B, V]``."""
        if isinstance(idx_B1, torch.Tensor) and idx_B1.dim() == 1:
            idx_B1 = idx_B1.unsqueeze(1)
        if isinstance(idx_B1, torch.Tensor) and idx_B1.dim() == 2 and idx_B1.shape[1] != 1:
            raise ValueError(f"forward_step takes one token per sequence, got shape {tuple(idx_B1.shape)}")
        return self.forward(idx_B1, cache=state).logits[:, -1]

    # -- persistence (engram.model.persistence) --------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, extra_files: dict | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (and ``vocab.safetensors`` with Engram), each
        atomically, then their checksums; see :func:`engram.model.persistence.save_pretrained`."""
        from engram.model.persistence import save_pretrained

        return save_pretrained(self, directory, extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                        tables: bool = True, verify: bool = True) -> EngramLM:
        """Load a model written by :meth:`save_pretrained`, its checksums verified first; ``tables=False``
        leaves the Engram tables on disk. See :func:`engram.model.persistence.load_pretrained` for the
        checks and errors."""
        from engram.model.persistence import load_pretrained

        return load_pretrained(cls, directory, map_location=map_location, tables=tables, verify=verify)
