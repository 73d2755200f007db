"""Configuration dataclasses and the one registry of named presets.

`EngramConfig` describes one Engram memory (hashing + module), `ModelConfig` the whole language
model; the training configs live in `engram.train.config`. Every preset is a plain function of no
arguments, so a run can record `preset name + overrides` and rebuild the exact config.

Presets come in two kinds that share one namespace, so a name never means two things:
``"engram"`` presets build an `EngramConfig` (named ``engram-*``; `engram hash`, the demo tour)
and ``"run"`` presets build a whole training run, a `RunConfig` (`engram train`, `engram compare`;
registered by `engram.train.config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch


class UserError(Exception):
    """A mistake in what the user asked for (an argument, a setting, an input file), as opposed to
    a bug: the `engram` command prints it as one line instead of a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid setting, override or preset name. Also a ValueError, the type callers that
    validate configs catch."""


# Settings that take one of a few names: the annotation lists them, for validation and `--set`.
TableDtype = Literal["float32", "bfloat16"]
ConvInit = Literal["zero", "default"]
GateMode = Literal["context", "fixed"]
BranchGates = Literal["per_branch", "shared"]
Flavour = Literal["demo", "v41"]
HeadBias = Literal["none", "zero", "log_prior"]


@dataclass
class EngramConfig:
    """Engram memory settings (the reference demo's defaults, minus the tokenizer).

    engram_vocab_size: target rows per head for each n-gram order 2..N (heads get the next
        distinct primes at or above it).
    pad_id: padding id in the *original* tokenizer's id space (compressed at build time).

    Ablation switches (the defaults are the paper's Engram; each other value removes one component,
    and the parameters it would use, so parameter counts stay honest):
    compress: False hashes raw tokenizer ids (the vocabulary map is the identity) instead of
        the compressed, canonicalised ones.
    gate: ``"fixed"`` drops the context-aware gate: every gate is exactly 1 (``u = value``) and the
        key projection and key/query norms are absent.
    short_conv: False drops the causal short convolution (``out = u``) and its parameters.
    branch_gates: with ``hc_mult > 1``, ``"per_branch"`` gives each residual branch its own key
        projection and gate (the paper's multi-branch integration); ``"shared"`` computes one gate
        from the branch-mean hidden state with one key projection and applies it to every branch.
        It has no effect with ``gate="fixed"``.

    flavour: ``"demo"`` (DeepSeek's public demo: key/value projections with biases, per-branch
        norms, a short conv) or ``"v41"`` (the released DeepSeek-V4.1 layer: one fused bias-free
        key/value projection, a gate weighted by ``q_weight * k_weight``, no conv; its hashing's
        look-back is position-indexed and stops at dead tokens). Both use the same tables, so every
        memory provider serves either. The V4.1 layer has no ablation switches: ``gate`` and
        ``branch_gates`` must keep their defaults, and ``short_conv``, ``kernel_size`` and
        ``conv_init`` are unused.
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    conv_init: ConvInit = "zero"
    table_dtype: TableDtype = "float32"
    sparse: bool = True
    init_std: float = 1.0  # table rows start N(0, init_std^2); 1.0 is nn.Embedding's (the reference's)
    compress: bool = True
    gate: GateMode = "context"
    short_conv: bool = True
    branch_gates: BranchGates = "per_branch"
    flavour: Flavour = "demo"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first inconsistent setting."""
        if self.max_ngram_size < 2:
            raise ConfigError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ConfigError(
                f"engram_vocab_size needs {self.max_ngram_size - 1} sizes (orders 2..{self.max_ngram_size}), "
                f"got {len(self.engram_vocab_size)}"
            )
        if self.n_head_per_ngram < 1:
            raise ConfigError(f"n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        for n, s in enumerate(self.engram_vocab_size, start=2):
            if s < self.n_head_per_ngram:
                raise ConfigError(
                    f"engram_vocab_size for order {n} ({s}) is smaller than n_head_per_ngram "
                    f"({self.n_head_per_ngram}); each head needs a table of its own"
                )
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ConfigError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be divisible by n_head_per_ngram "
                f"({self.n_head_per_ngram})"
            )
        if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids):
            raise ConfigError(f"layer_ids must be non-empty and distinct, got {self.layer_ids}")
        if self.table_dtype not in get_args(TableDtype):
            raise ConfigError(f"table_dtype must be 'float32' or 'bfloat16', got {self.table_dtype!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")
        if self.conv_init not in get_args(ConvInit):
            raise ConfigError(f"conv_init must be 'zero' or 'default', got {self.conv_init!r}")
        for name in ("compress", "short_conv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.gate not in get_args(GateMode):
            raise ConfigError(f"gate must be one of 'context' (the context-aware gate) or 'fixed' (every gate 1), "
                              f"got {self.gate!r}")
        if self.branch_gates not in get_args(BranchGates):
            raise ConfigError(f"branch_gates must be one of 'per_branch' (one key projection and gate per residual "
                              f"branch) or 'shared' (one for all branches), got {self.branch_gates!r}")
        if self.flavour not in get_args(Flavour):
            raise ConfigError(f"flavour must be one of 'demo' (the public demo's layer) or 'v41' (the released "
                              f"DeepSeek-V4.1 layer), got {self.flavour!r}")
        if self.flavour == "v41" and (self.gate != "context" or self.branch_gates != "per_branch"):
            raise ConfigError(f"the v41 flavour has no ablation switches: gate must be 'context' and branch_gates "
                              f"'per_branch', got gate={self.gate!r}, branch_gates={self.branch_gates!r}")

    @property
    def ablated(self) -> bool:
        """Whether any Engram-layer switch (gate, short_conv, branch_gates) differs from the paper's
        default; such layers compute their mixing with the eager torch path. Never for the v41
        flavour, which has no such switches."""
        if self.flavour == "v41":
            return False
        return self.gate != "context" or not self.short_conv or self.branch_gates != "per_branch"

    @property
    def torch_table_dtype(self) -> torch.dtype:
        return getattr(torch, self.table_dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EngramConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown EngramConfig fields: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------ presets

PRESET_KINDS = {"engram": "Engram-layer", "run": "training-run"}


@dataclass(frozen=True)
class Preset:
    """A named config factory: ``build()`` returns a fresh config of the preset's ``kind``."""

    name: str
    kind: str  # a key of PRESET_KINDS
    description: str  # one line, shown by `engram ... --help` after "NAME: "
    build: Callable[[], Any]


_PRESETS: dict[str, Preset] = {}


def register_preset(name: str, kind: str, description: str) -> Callable:
    """Decorator: register a no-argument config function as preset ``name`` of ``kind``.

    Names are unique across kinds; registering a name again is an error unless it is the same
    function (a module reloaded).
    """
    if kind not in PRESET_KINDS:
        raise ValueError(f"preset kind must be one of {', '.join(PRESET_KINDS)}, got {kind!r}")
    if not description or "\n" in description:
        raise ValueError(f"preset {name!r} needs a one-line description")

    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        old = _PRESETS.get(name)
        if old is not None and (old.build.__module__, old.build.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"preset name {name!r} is already taken by the {PRESET_KINDS[old.kind]} preset "
                             f"{old.build.__module__}.{old.build.__qualname__}")
        _PRESETS[name] = Preset(name, kind, description, fn)
        return fn

    return register


def presets(kind: str | None = None) -> dict[str, Preset]:
    """The registered presets of ``kind`` (all of them for None), by name, in registration order.

    Run presets register when `engram.train.config` is imported (this module sits below the trainer
    and never imports it); `engram.train.config.run_preset` and the CLI import it first.
    """
    if kind is not None and kind not in PRESET_KINDS:
        raise ValueError(f"preset kind must be one of {', '.join(PRESET_KINDS)}, got {kind!r}")
    return {n: p for n, p in _PRESETS.items() if kind is None or p.kind == kind}


def build_preset(name: str, kind: str) -> Any:
    """A fresh config from preset ``name``, which must be of ``kind``; ConfigError (a ValueError)
    listing the valid names of that kind otherwise."""
    valid = presets(kind)
    if name not in valid:
        other = _PRESETS.get(name)
        hint = f" ({name!r} is a {PRESET_KINDS[other.kind]} preset)" if other is not None else ""
        raise ConfigError(f"unknown {PRESET_KINDS[kind]} preset {name!r}{hint}; valid: {', '.join(valid)}")
    return valid[name].build()


@register_preset("engram-reference", "engram",
                 "the reference demo's memory, layers 1 and 15, orders 2-3, 8 heads x ~646k rows x 64 dims per order")
def _engram_reference() -> EngramConfig:
    return EngramConfig()


@register_preset("engram-debug", "engram", "tiny, layer 1, 4 heads x ~4k rows x 16 dims per order, built at once")
def _engram_debug() -> EngramConfig:
    return EngramConfig(engram_vocab_size=[4099, 4099], n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=[1])


@register_preset("engram-demo", "engram",
                 "the `engram demo` tour's memory, layers 1 and 3, 8 heads x ~50k rows x 32 dims per order")
def _engram_demo() -> EngramConfig:
    return EngramConfig(engram_vocab_size=[50021, 50021], n_embed_per_ngram=256, layer_ids=[1, 3])


@dataclass
class ModelConfig:
    """Decoder-only LM: RMSNorm, RoPE, SDPA attention, SwiGLU or MoE, optional hyper-connections
    (``hc_mult`` residual branches) and Engram memory at ``engram.layer_ids``.

    MoE: layers ``>= first_dense_layers`` use ``n_shared_experts`` always-on experts plus
    ``moe_top_k`` of ``n_routed_experts`` routed ones (of width ``expert_hidden``); the shared experts
    are ``shared_expert_hidden`` wide each (None: ``expert_hidden``), which lets an iso-parameter
    comparison trade always-on parameters against memory. With ``n_routed_experts == 0`` every layer
    is a dense SwiGLU of width ``mlp_hidden``.
    ``router_aux_coef`` weights the load-balancing loss (mean over MoE layers) in the objective.

    Hyper-connections: ``hc_mult > 1`` keeps that many residual branches with learned static
    mixing weights; ``hc_dynamic`` adds the paper's input-dependent part (zero-initialised).
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_hidden: int = 768
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # The token embedding's init std (linears keep 0.02). Larger and untied, the circuit that copies from the
    # context (induction) forms far sooner: benchmarks/bench_induction.py.
    embed_init_std: float = 0.02
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    moe_top_k: int = 2
    expert_hidden: int = 256
    shared_expert_hidden: int | None = None
    first_dense_layers: int = 1
    router_aux_coef: float = 0.01
    hc_mult: int = 1
    hc_dynamic: bool = False
    # A learned bias on the output logits. "log_prior" starts it at the train split's log unigram frequencies
    # (add-one, centred; set by the trainer), so step 0 already predicts the unigram distribution: a baseline
    # that does not spend its first steps learning token frequencies (benchmarks/RESULTS.md, the demo pair).
    head_bias: HeadBias = "none"
    engram: EngramConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first inconsistent setting."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "max_seq_len", "hc_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.embed_init_std > 0:
            raise ConfigError(f"embed_init_std must be > 0, got {self.embed_init_std}")
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ConfigError(f"d_model ({self.d_model}) must split into {self.n_heads} heads of even width")
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            raise ConfigError("expert counts must be >= 0")
        if self.is_moe and not 1 <= self.moe_top_k <= self.n_routed_experts:
            raise ConfigError(f"moe_top_k must be in [1, n_routed_experts={self.n_routed_experts}], "
                             f"got {self.moe_top_k}")
        if self.is_moe and self.expert_hidden < 1:
            raise ConfigError(f"expert_hidden must be >= 1, got {self.expert_hidden}")
        if self.shared_expert_hidden is not None and (isinstance(self.shared_expert_hidden, bool)
                                                      or not isinstance(self.shared_expert_hidden, int)
                                                      or self.shared_expert_hidden < 1):
            raise ConfigError(f"shared_expert_hidden must be an integer >= 1 or None (= expert_hidden), "
                              f"got {self.shared_expert_hidden!r}")
        if self.first_dense_layers < 0:
            raise ConfigError(f"first_dense_layers must be >= 0, got {self.first_dense_layers}")
        if self.router_aux_coef < 0:
            raise ConfigError(f"router_aux_coef must be >= 0, got {self.router_aux_coef}")
        if self.head_bias not in get_args(HeadBias):
            raise ConfigError(f"head_bias must be one of {', '.join(map(repr, get_args(HeadBias)))}, "
                              f"got {self.head_bias!r}")
        if self.engram is not None:
            bad = [i for i in self.engram.layer_ids if not 0 <= i < self.n_layers]
            if bad:
                raise ConfigError(f"engram.layer_ids {bad} are not layers of a {self.n_layers}-layer model")

    @property
    def shared_hidden(self) -> int:
        """The width of one shared expert: ``shared_expert_hidden``, or ``expert_hidden`` when None."""
        return self.expert_hidden if self.shared_expert_hidden is None else self.shared_expert_hidden

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def engram_preset(name: str) -> EngramConfig:
    """A fresh EngramConfig from a named Engram-layer preset (``engram-*``)."""
    return build_preset(name, "engram")
