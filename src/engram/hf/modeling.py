"""``EngramForCausalLM``: an :class:`~engram.model.EngramLM` behind ``transformers``' ``PreTrainedModel``.

Loading and saving go through our own persistence, not ``transformers``' weight loader: the checksums of a
model directory are verified, the tokenizer travels with the weights, and the Engram tables are kept one
safetensors file each (the sharded-tables layout of :mod:`engram.model.sharded_tables`), which the native
``EngramLM.from_pretrained``, the store export and the servers all read. ``generate()`` runs through
``GenerationMixin`` on our decode state (:class:`~engram.hf.cache.EngramCache`): KV cache, incremental
n-gram hashing and ShortConv history, as :func:`engram.model.generate` uses them.
"""

# Shapes: B batch, T time, V vocabulary.

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from engram.hf.cache import EngramCache
from engram.hf.configuration import EngramHFConfig
from engram.model import EngramLM
from engram.tokenizer.compression import CompressedVocab

# Files of a model directory that are not weights but belong with them (re-saved by save_pretrained).
_COMPANION_FILES = ("tokenizer.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                    "tokenizer/special_tokens_map.json")
# from_pretrained keywords that transformers' auto classes and pipeline() pass and that mean nothing here.
_IGNORED = {"_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "attn_implementation",
            "low_cpu_mem_usage", "use_safetensors", "output_loading_info", "code_revision", "key_mapping",
            "tp_plan", "weights_only", "use_kernels"}
_HUB = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM over an :class:`EngramLM` (``self.model``): same weights, same logits.

    ``forward`` follows ``transformers``' conventions: ``labels`` are the input ids (shifted inside, -100
    ignored), ``past_key_values`` an :class:`EngramCache`. An ``attention_mask`` with zeros marks padding
    (e.g. prompts of different lengths, left-padded as ``generate()`` wants them): it becomes
    :class:`EngramLM`'s ``token_mask_BT``, so each row computes what it would alone, unpadded.

    Build one around a model with ``EngramForCausalLM(config, lm=model)`` (``config`` from
    :meth:`EngramHFConfig.from_model_config`), or from a config alone with ``vocab=`` when it has Engram.
    """

    config_class = EngramHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = None  # EngramLM ties its own embeddings

    def __init__(self, config: EngramHFConfig, lm: EngramLM | None = None, *,
                 vocab: CompressedVocab | None = None) -> None:
        super().__init__(config)
        self.model = lm if lm is not None else EngramLM(config.to_model_config(), vocab)
        self._source_dir: Path | None = None  # the directory loaded from: its tokenizer is saved with the model
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: :class:`EngramLM` initialises itself, and loading never starts from random weights."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is our decode state, made in forward (see EngramCache)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_emb

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: EngramCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` ``[B, T]``; with ``past_key_values`` the ids continue the cached sequences.

        ``labels``: ``[B, T]`` like the ids; the loss is the next-token cross-entropy (``labels[:, 1:]``
        against the logits before them, -100 ignored) plus the router's load-balancing term with MoE,
        i.e. the training objective of :class:`EngramLM`. ``logits_to_keep``: only the last k positions'
        logits (0: all). ``attention_mask``: ``[B, T]``, or ``[B, cached + T]`` as ``generate()`` passes it
        (its last T columns are this chunk's; the cache remembers the earlier ones); zeros are padding,
        whose labels should be -100.
        """
        if inputs_embeds is not None:
            raise ValueError("EngramForCausalLM takes input_ids, not inputs_embeds: Engram hashes the token ids")
        if input_ids is None:
            raise ValueError("input_ids are required")
        token_mask_BT = _token_mask(attention_mask, input_ids, past_key_values)
        if past_key_values is None and use_cache and labels is None:
            past_key_values = EngramCache(self.model.new_decode_state(input_ids.shape[0]))
        targets_BT = None
        if labels is not None:  # HF's labels are the inputs; ours are the next tokens
            targets_BT = torch.full_like(labels, -100)
            targets_BT[:, :-1] = labels[:, 1:]
        out = self.model(input_ids, targets_BT, cache=None if past_key_values is None else past_key_values.state,
                         token_mask_BT=token_mask_BT)
        logits_BTV = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=out.total_loss, logits=logits_BTV, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: EngramCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      logits_to_keep: int | None = None, **kwargs) -> dict:
        """Only the tokens the cache has not seen (all of them on the first step)."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        inputs = {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": use_cache,
                  "attention_mask": attention_mask}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    # -- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: EngramHFConfig | None = None, tables: bool = True, verify: bool = True,
                        **kwargs) -> EngramForCausalLM:
        """Load a model directory (``engram train``'s ``RUN_DIR/model``, or one :meth:`save_pretrained`
        wrote; a Hub repo id is downloaded first) with :meth:`EngramLM.from_pretrained`: checksums
        verified, the Engram tables from either layout. ``dtype`` / ``torch_dtype`` and ``device_map``
        (one device) are applied after loading; ``tables`` / ``verify`` as in ``EngramLM.from_pretrained``.
        """
        if model_args:
            raise TypeError(f"EngramForCausalLM.from_pretrained takes no positional model arguments, "
                            f"got {len(model_args)}")
        dtype = kwargs.pop("dtype", None)
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        device = kwargs.pop("device_map", None)
        hub = {k: kwargs.pop(k) for k in _HUB if k in kwargs}
        if kwargs.pop("quantization_config", None) is not None:
            raise ValueError("EngramForCausalLM does not support quantization_config")
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise TypeError(f"EngramForCausalLM.from_pretrained got unexpected arguments {unknown}")
        d = _local_dir(pretrained_model_name_or_path, hub)
        if isinstance(device, dict) and len(set(device.values())) > 1:
            raise ValueError("EngramForCausalLM loads onto one device: give device_map as a single device")
        if isinstance(device, dict):
            device = next(iter(device.values()), None)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(device, int):
            device = torch.device("cuda", device)
        lm = EngramLM.from_pretrained(d, map_location=device or "cpu", tables=tables, verify=verify)
        if config is None:
            config = cls.config_class.from_pretrained(d)
        if config.to_model_config() != lm.cfg:
            raise ValueError(f"the config given does not describe the model in {d}")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            lm = lm.to(dtype)
        model = cls(config, lm=lm)
        model._source_dir = d
        gen = d / "generation_config.json"
        if gen.is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(d)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                        push_to_hub: bool = False, **kwargs) -> None:
        """Write a model directory that both loaders read: ``model.safetensors`` (all but the Engram
        tables), each Engram table in its own ``tables/layer_<L>.rows-0-<R>.safetensors``, ``config.json``
        (with ``model_type``), ``generation_config.json``, the vocabulary, the tokenizer of the directory
        this model was loaded from, and ``checksums.json`` over all of them, written last.
        ``transformers``' sharding and serialisation options do not apply and are ignored."""
        if push_to_hub:
            raise ValueError("save the directory, then push it with model.push_to_hub(repo_id)")
        if not is_main_process:
            return
        import json

        from engram.model import sharded_tables

        d = Path(save_directory)
        extra: dict = {name: self._source_dir / name for name in _COMPANION_FILES
                       if self._source_dir is not None and (self._source_dir / name).is_file()}
        if self.can_generate() and self.generation_config is not None:
            extra["generation_config.json"] = (json.dumps(self.generation_config.to_diff_dict(), indent=2,
                                                          sort_keys=True) + "\n").encode()
        if self.model.has_tables:
            sharded_tables.save_sharded(self.model, d, writers=1, extra_files=extra)
        else:
            self.model.save_pretrained(d, extra_files=extra)


def _token_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor,
                cache: EngramCache | None) -> torch.Tensor | None:
    """The chunk's bool padding mask from ``transformers``' 0/1 ``attention_mask`` (None: no mask)."""
    if attention_mask is None:
        return None
    B, T = input_ids.shape
    past = 0 if cache is None else cache.get_seq_length()
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
        want = f"[{B}, {T}]" + (f" or [{B}, {past + T}]" if past else "")
        raise ValueError(f"attention_mask must be {want} (1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:].to(input_ids.device).bool()


def _local_dir(name: str | os.PathLike, hub: dict) -> Path:
    """``name`` if it is a directory, else the local snapshot of the Hub repository it names."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name), **{k: v for k, v in hub.items() if v is not None}))
