"""Model components."""

from engram.model.engram import Engram, ShortConv

__all__ = ["Engram", "ShortConv"]
