"""``EngramHFConfig``: our :class:`~engram.config.ModelConfig` as a ``transformers`` config.

The fields of ``ModelConfig`` are the config's own attributes, so the ``config.json`` that
``engram train`` writes (``ModelConfig.to_dict()`` plus ``model_type``) is read by ``AutoConfig`` as it is,
and ``to_model_config()`` gives back exactly the ``ModelConfig`` the native loader would build.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from engram.config import ModelConfig
from engram.hf.hook import register_model
from engram.model.persistence import MODEL_TYPE

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class EngramHFConfig(PretrainedConfig):
    """A ``PretrainedConfig`` holding an :class:`EngramLM`'s :class:`ModelConfig` (its fields are attributes).

    Build it from a ``ModelConfig`` with :meth:`from_model_config`; ``AutoConfig.from_pretrained(dir)``
    reads a model directory's ``config.json``. The usual ``transformers`` names (``hidden_size``,
    ``num_hidden_layers``, ...) are aliases of ours. Building one also registers
    :class:`~engram.hf.EngramForCausalLM` with ``AutoModelForCausalLM`` (see :mod:`engram.hf.hook`).
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len", "intermediate_size": "mlp_hidden",
                     "rms_norm_eps": "norm_eps"}

    def __init__(self, **kwargs) -> None:
        defaults = ModelConfig().to_dict()
        for name in _FIELDS:
            setattr(self, name, kwargs.pop(name, defaults[name]))
        if isinstance(self.engram, dict) or self.engram is None:
            self.engram = dict(self.engram) if self.engram else None
        else:  # an EngramConfig
            self.engram = self.engram.to_dict()
        kwargs.setdefault("tie_word_embeddings", bool(self.tie_embeddings))
        super().__init__(**kwargs)
        register_model()

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> EngramHFConfig:
        """The config of an :class:`EngramLM` built from ``cfg`` (``kwargs``: ``transformers`` settings,
        e.g. ``eos_token_id``)."""
        return cls(**cfg.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """Our :class:`ModelConfig` (validated)."""
        cfg = ModelConfig.from_dict({name: getattr(self, name) for name in _FIELDS})
        cfg.validate()
        return cfg
