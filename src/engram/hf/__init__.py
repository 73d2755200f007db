"""Hugging Face ``transformers`` integration: :class:`EngramHFConfig` and :class:`EngramForCausalLM`.

``import engram`` is enough for ``AutoConfig`` / ``AutoModelForCausalLM`` / ``pipeline`` to know the
``"engram"`` model type, without importing ``transformers`` itself (seconds): the classes are registered
when ``transformers`` loads its auto-config module (:mod:`engram.hf.hook`). Names here are resolved on
first use for the same reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engram.hf.hook import register

if TYPE_CHECKING:
    from engram.hf.cache import EngramCache
    from engram.hf.configuration import EngramHFConfig
    from engram.hf.modeling import EngramForCausalLM

__all__ = ["EngramCache", "EngramForCausalLM", "EngramHFConfig", "register"]

_LAZY = {"EngramHFConfig": "engram.hf.configuration", "EngramForCausalLM": "engram.hf.modeling",
         "EngramCache": "engram.hf.cache"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        register()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
