"""Tokenizer side of Engram: offline loading and vocabulary compression."""

from .compression import CompressedVocab, MergedGroup, build_lookup, make_normalizer
from .loading import BUNDLED, bundled_path, load_tokenizer

__all__ = ["BUNDLED", "CompressedVocab", "MergedGroup", "build_lookup", "bundled_path", "load_tokenizer",
           "make_normalizer"]
