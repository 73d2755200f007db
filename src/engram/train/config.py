"""Training configuration and the training-run presets (model + training together).

A run is fully described by `RunConfig` (model, training, data). Its presets are functions
registered in the one preset registry (`engram.config`) as kind ``"run"``, so a run directory can
record `preset + overrides` and the resolved config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

from engram.config import ConfigError, EngramConfig, ModelConfig, build_preset, register_preset

# The documented values of the options that take names (the CLI's --set checks them by these types).
EngramOptimizer = Literal["sparse_row_adam", "dense_adamw", "torch_sparse_adam"]
AutocastDtype = Literal["auto", "bfloat16", "float32"]
BackboneParallel = Literal["ddp", "fsdp"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Token budget = steps * batch_size * seq_len."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    engram_lr_mult: float = 5.0  # the paper: 5x learning rate, no weight decay for the tables
    # The tables' optimizer. sparse_row_adam: SparseRowAdam (dense-Adam-equivalent, touched rows only);
    # torch_sparse_adam: torch.optim.SparseAdam (lazy; dense row gradients are converted to sparse);
    # dense_adamw: torch AdamW over the whole table, which is then built with dense gradients
    # (the run records model.engram.sparse=false).
    engram_optimizer: EngramOptimizer = "sparse_row_adam"
    # Autocast dtype: "bfloat16", "float32", or "auto" = bf16 where this machine multiplies bf16
    # faster than fp32 (CPUs without native bf16 run it through a path ~50x slower than fp32).
    dtype: AutocastDtype = "auto"
    # torch.compile the Engram layers' post-lookup math (norms, gate, conv) for training steps:
    # fused forward/backward, ~40% less time in that part; costs ~15 s of compiling at start-up.
    compile_engram: bool = True
    seed: int = 0
    eval_every: int = 100
    eval_tokens: int = 65536
    ckpt_every: int = 200
    log_every: int = 10
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # How the backbone is spread over the ranks of a torchrun launch (the Engram tables are row-sharded
    # either way): "ddp" replicates it and its AdamW state on every rank; "fsdp" (FSDP2) shards both, so
    # a rank holds 1/W of them. No effect in one process; a resume may switch it (checkpoints reshard).
    backbone_parallel: BackboneParallel = "ddp"
    # A model directory (``save_pretrained``) whose weights a new run starts from instead of a fresh
    # initialisation: fine-tuning. Its config must match ``model`` and the data must use its tokenizer
    # (``data.tokenizer`` None adopts the saved one); the optimizer state starts fresh. Only step 0
    # reads it: a resumed run continues from its checkpoint.
    init_from: str | None = None

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first invalid setting."""
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_tokens", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name, choices in (("dtype", get_args(AutocastDtype)), ("engram_optimizer", get_args(EngramOptimizer)),
                              ("backbone_parallel", get_args(BackboneParallel))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"train.{name} must be one of {', '.join(map(repr, choices))}, "
                                  f"got {getattr(self, name)!r}")
        if self.init_from is not None and not str(self.init_from).strip():
            raise ConfigError("train.init_from must be a model directory or None, got an empty string")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1]")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class DataConfig:
    """Where tokens come from: None = the Python standard library source, BPE 8192."""

    data: list[str] | None = None
    tokenizer: str | None = None
    vocab_size: int = 8192
    val_permille: int = 50


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = ""

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len {self.train.seq_len} > model.max_seq_len {self.model.max_seq_len}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(model=ModelConfig.from_dict(dict(d["model"])), train=TrainConfig(**d["train"]),
                   data=DataConfig(**d["data"]), preset=d.get("preset", ""))


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.field=value`` strings, each value parsed by the field's declared type.

    Returns a new, validated RunConfig; ``cfg`` is left as it is. Types come from the dataclass
    annotations (see `engram.train.overrides`): ``train.steps=2.5`` or ``train.compile_engram=maybe``
    is a ConfigError naming the field, its type and the valid values, like any invalid setting.
    Setting a field of ``model.engram`` on a model without Engram starts from `EngramConfig`'s
    defaults; ``model.engram=None`` removes the memory.
    """
    import difflib

    from engram.train.overrides import describe_type, field_types, parse_value

    d = cfg.to_dict()
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.field=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        node, cls, parts = d, RunConfig, key.split(".")
        for i, p in enumerate(parts):
            types = field_types(cls)
            if p not in types or (i == 0 and p == "preset"):
                known = [n for n in types if n != "preset"]
                where = ".".join(parts[:i]) or "the config"
                close = difflib.get_close_matches(p, known, n=1)
                hint = f"; did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else ""
                what = "field" if i else "section"
                raise ConfigError(f"override {ov!r}: no config {what} {p!r} in {where} (valid: "
                                  f"{', '.join(known)}){hint}")
            tp = types[p]
            section = _section_type(tp)
            if i < len(parts) - 1:
                if section is None:
                    raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])} is a field, not a section")
                if node[p] is None:  # e.g. model.engram on a model without memory: start from the defaults
                    node[p] = section().to_dict()
                node, cls = node[p], section
                continue
            if section is not None:
                if raw.strip().lower() in ("none", "null") and section is not tp:
                    node[p] = None
                    continue
                raise ConfigError(f"override {ov!r}: {key} is {describe_type(section)}"
                                  + (", or None to drop it" if section is not tp else ""))
            try:
                node[p] = parse_value(raw, tp, key)
            except ConfigError as e:
                raise ConfigError(f"override {ov!r}: {e}") from None
    out = RunConfig.from_dict(d)
    out.validate()
    return out


def _section_type(tp):
    """The dataclass a field of type ``tp`` holds (``X`` for ``X | None``), or None for a plain value."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not None else [tp]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


# ------------------------------------------------------------------------------- init_from

# Model-config fields a fine-tune may change: they shape only the initialisation (overwritten by the
# loaded weights), the gradients' form, the loss weighting or the RoPE cache, not a weight.
INIT_FROM_FREE = ("max_seq_len", "router_aux_coef", "embed_init_std", "engram.sparse", "engram.init_std",
                  "engram.conv_init")


def saved_tokenizer(model_dir: str) -> str:
    """The tokenizer spec saved with a model (its ``tokenizer/`` folder, or the name in ``tokenizer.txt``)."""
    from pathlib import Path

    d = Path(model_dir)
    if (d / "tokenizer").is_dir():
        return str(d / "tokenizer")
    if (d / "tokenizer.txt").is_file():
        return (d / "tokenizer.txt").read_text().strip()
    raise ConfigError(f"train.init_from: {model_dir} has no saved tokenizer (neither tokenizer/ nor tokenizer.txt): "
                      f"set data.tokenizer")


def check_init_from(model_dir: str, model: ModelConfig, tokenizer_spec: str) -> None:
    """Refuse (ConfigError naming every differing field) a run whose resolved ``model`` config cannot take
    the weights saved in ``model_dir`` (another architecture, vocabulary size or Engram layout) or whose
    data uses another tokenizer than the model's (its ids would mean other tokens)."""
    from engram.data import tokenizer_fingerprint
    from engram.model.persistence import load_config

    try:
        saved = load_config(model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from: {e}") from None

    def diff(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
        name = prefix.rstrip(".")
        return [] if a == b or name in INIT_FROM_FREE else [f"model.{name}: {a!r} there vs {b!r} in this run"]

    diffs = diff(saved.to_dict(), model.to_dict(), "")
    own = saved_tokenizer(model_dir)
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer_spec):
        diffs.insert(0, f"data.tokenizer: {own!r} there vs {tokenizer_spec!r} in this run")
    if diffs:
        raise ConfigError(f"train.init_from: the model in {model_dir} has another config than this run's model; "
                          f"differing fields: " + "; ".join(diffs[:8]))


# ---------------------------------------------------------------------------------- presets

@register_preset("debug", "run", "a 2-layer model with a small Engram memory, 30 steps, seconds on a laptop")
def _debug() -> RunConfig:
    """Small enough for the test suite's golden loss curve and a first try of `engram train`."""
    eng = EngramConfig(engram_vocab_size=[2003, 2003], n_embed_per_ngram=32, n_head_per_ngram=4, layer_ids=[0],
                       conv_init="zero")
    model = ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=2, mlp_hidden=128, max_seq_len=64,
                        engram=eng)
    train = TrainConfig(steps=30, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=10,
                        eval_tokens=2048, ckpt_every=10, log_every=5, compile_engram=False)
    return RunConfig(model=model, train=train, preset="debug")


@register_preset("demo", "run", "the main job's 4-layer MoE (32 routed experts) and memory layout for "
                                 "`engram compare`, ~15 min on 2 cores")
def _demo() -> RunConfig:
    """The main job's MoE baseline; `engram compare` derives its iso-parameter Engram variant
    from `model.engram` (the memory layout) by moving routed experts into memory.

    Sized for ~15 minutes for both models, set-up included, on 2 CPU cores without native bf16:
    4 layers (the first dense), 144 steps of 32 x 128 tokens (0.59M tokens). fp32 is pinned so the
    result does not depend on whether a machine has bf16 instructions.
    """
    # init_std 0.1, not the reference's N(0, 1): at this scale unit-variance rows swamp the value
    # projection early in training (over 150 steps, validation loss 4.97 with std 1.0, 4.74 with 0.1).
    eng = EngramConfig(engram_vocab_size=[100003, 100003], n_embed_per_ngram=256, n_head_per_ngram=8,
                       layer_ids=[1], conv_init="zero", init_std=0.1)
    model = ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, mlp_hidden=768, max_seq_len=256,
                        n_routed_experts=32, n_shared_experts=1, moe_top_k=2, expert_hidden=256,
                        first_dense_layers=1, engram=eng)
    # compile_engram off: over 144 steps the ~15 s of compiling would cost more than it saves (~3 s).
    train = TrainConfig(steps=144, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=48,
                        eval_tokens=65536, ckpt_every=48, log_every=8, dtype="float32", compile_engram=False)
    return RunConfig(model=model, train=train, preset="demo")


def run_preset(name: str) -> RunConfig:
    """A fresh, validated RunConfig from a named training-run preset (ConfigError, a ValueError,
    listing the valid names for an unknown one)."""
    cfg = build_preset(name, "run")
    cfg.validate()
    return cfg
