"""Model components: the Engram block, the backbone (layers, MoE, hyper-connections), the LM, decoding and
parameter accounting. Nothing here knows where Engram rows live (see :mod:`engram.memory`)."""

from engram.model.engram import Engram, ShortConv

__all__ = ["Engram", "ShortConv"]

from engram.model.generation import DecodeState, generate  # noqa: E402
from engram.model.hyper import HyperConnection  # noqa: E402
from engram.model.layers import KVCache, RMSNorm, Rotary, SwiGLU  # noqa: E402
from engram.model.moe import MoE  # noqa: E402
from engram.model.params import count_params, iso_engram_config  # noqa: E402
from engram.model.transformer import EngramLM, ModelOutput  # noqa: E402

__all__ += ["DecodeState", "EngramLM", "HyperConnection", "KVCache", "ModelOutput", "MoE", "RMSNorm", "Rotary",
            "SwiGLU", "count_params", "generate", "iso_engram_config"]
