"""The id map an Engram model hashes through: the tokenizer's compressed vocabulary, or the identity."""

from __future__ import annotations

import os

import numpy as np

from engram.config import ModelConfig
from engram.tokenizer.compression import CompressedVocab


def identity_vocab(vocab_size: int) -> CompressedVocab:
    """The map that leaves every id as it is: an Engram layer then hashes raw tokenizer ids."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return CompressedVocab(np.arange(vocab_size, dtype=np.int64), source="identity")


def model_vocab(cfg: ModelConfig, tokenizer_spec: str | os.PathLike) -> CompressedVocab | None:
    """The vocabulary map a model of ``cfg`` is built with: None without Engram, the identity over
    ``cfg.vocab_size`` ids with ``engram.compress=False`` (the ablation without vocabulary compression),
    else the tokenizer's compression (``tokenizer_spec`` as ``CompressedVocab.from_pretrained`` takes it).

    The map is saved with the model (``vocab.safetensors``), so whatever loads the model later
    (generation, evaluation, export, serving) hashes the same ids without knowing the switch.
    """
    if cfg.engram is None:
        return None
    if not cfg.engram.compress:
        return identity_vocab(cfg.vocab_size)
    return CompressedVocab.from_pretrained(tokenizer_spec)
