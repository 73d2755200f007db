"""Engram: conditional memory via scalable n-gram lookup (DeepSeek, arXiv 2601.07372)."""

from engram.config import EngramConfig, engram_preset
from engram.hashing import NgramHasher
from engram.memory import MultiHeadTable
from engram.model import Engram, ShortConv
from engram.tokenizer import CompressedVocab

__all__ = ["CompressedVocab", "Engram", "EngramConfig", "MultiHeadTable", "NgramHasher", "ShortConv",
           "engram_preset"]
__version__ = "0.1.0"

# AutoConfig / AutoModelForCausalLM / pipeline know the "engram" model type once transformers loads its auto
# classes; transformers itself is not imported here (see engram.hf.hook).
from engram.hf.hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()
