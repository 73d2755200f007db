"""The settings of DeepSeek-V4.1's Engram flavour, read from a released-style config.json.

Field names are the released ones (`engram_layer_ids`, `engram_num_embeddings`, ...), so a
checkpoint's config loads without renaming. Only the fields the Engram path needs are kept;
everything else in the file (attention, MoE, vision) is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from engram.config import ConfigError

FP8_BLOCK = 32  # channels per power-of-two scale in the fp8 tables

_INT_LISTS = ("engram_layer_ids", "engram_num_embeddings")
_POSITIVE_INTS = ("hidden_size", "hc_mult", "engram_max_ngram_size", "engram_vocab_size", "engram_n_heads",
                  "engram_head_dim", "engram_compressed_vocab_size")


@dataclass
class V41Config:
    """Engram settings of a DeepSeek-V4.1 checkpoint.

    engram_layer_ids: the transformer layers that carry an Engram (released: [1, 14]).
    engram_num_embeddings: table rows per Engram layer, in `engram_layer_ids` order; equals the
        sum of that layer's bucket primes (the hasher checks it).
    engram_vocab_size: the bucket primes are the consecutive primes drawn from here upward.
    engram_max_ngram_size: N; orders 2..N are hashed, each with `engram_n_heads` heads.
    engram_head_dim: width of one table row (a multiple of 32, the fp8 scale block).
    engram_pad_id: tokenizer id that fills look-back slots with no usable history.
    engram_compressed_vocab_size: size of the compressed vocabulary; the hash multipliers are
        bounded by it, so the tokenizer must produce exactly this many compressed ids.
    hc_mult: number of parallel residual streams (hyper-connections).
    rms_norm_eps: the model's epsilon, used as given (the released value is 1e-20), which is why
        it defaults to that when a file omits it.
    """

    hidden_size: int
    hc_mult: int
    engram_layer_ids: list[int]
    engram_num_embeddings: list[int]
    engram_max_ngram_size: int
    engram_vocab_size: int
    engram_n_heads: int
    engram_head_dim: int
    engram_pad_id: int
    engram_compressed_vocab_size: int
    rms_norm_eps: float = 1e-20

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_hash_cols(self) -> int:
        """Row ids per token and layer: one per (order, head)."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    def layer_index(self, layer_id: int) -> int:
        """Position of a transformer layer among the Engram layers (its slot in hash output)."""
        if layer_id not in self.engram_layer_ids:
            raise ConfigError(f"layer {layer_id} has no Engram; engram_layer_ids is {self.engram_layer_ids}")
        return self.engram_layer_ids.index(layer_id)

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is missing a sane value."""
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in _INT_LISTS:
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ConfigError(f"{name} must be a list of integers, got {v!r}")
        if not self.engram_layer_ids:
            raise ConfigError("engram_layer_ids is empty: this config has no Engram layers")
        if len(set(self.engram_layer_ids)) != len(self.engram_layer_ids) or min(self.engram_layer_ids) < 0:
            raise ConfigError(f"engram_layer_ids must be distinct non-negative ids, got {self.engram_layer_ids}")
        if len(self.engram_num_embeddings) != len(self.engram_layer_ids):
            raise ConfigError(
                f"engram_num_embeddings has {len(self.engram_num_embeddings)} entries but engram_layer_ids has "
                f"{len(self.engram_layer_ids)}; one table size per Engram layer"
            )
        if min(self.engram_num_embeddings) < 1:
            raise ConfigError(f"engram_num_embeddings must be positive, got {self.engram_num_embeddings}")
        if self.engram_max_ngram_size < 2:
            raise ConfigError(f"engram_max_ngram_size must be >= 2, got {self.engram_max_ngram_size}")
        if self.engram_head_dim % FP8_BLOCK:
            raise ConfigError(f"engram_head_dim must be a multiple of {FP8_BLOCK}, got {self.engram_head_dim}")
        if isinstance(self.engram_pad_id, bool) or not isinstance(self.engram_pad_id, int) or self.engram_pad_id < 0:
            raise ConfigError(f"engram_pad_id must be a non-negative integer, got {self.engram_pad_id!r}")
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"rms_norm_eps must be a finite number >= 0, got {eps!r}")
        self.rms_norm_eps = float(eps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> V41Config:
        """Build from a released config dict: flat, or composite with the fields under `text_config`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        if "engram_layer_ids" not in d and isinstance(d.get("text_config"), dict):
            d = d["text_config"]
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"config lacks {', '.join(missing)} (needed by the V4.1 Engram)")
        return cls(**{f.name: d[f.name] for f in fields if f.name in d})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> V41Config:
        """Read a checkpoint's config.json (the file itself or the directory holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config file at {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return cls.from_dict(d)
