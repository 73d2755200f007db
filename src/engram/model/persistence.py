"""Saving and loading an EngramLM: safetensors weights + JSON config (+ the compressed vocabulary).

Every file is written under a temporary name and renamed over the target, and the directory's
checksum manifest (`engram.model.checksums`) is written last, so an interrupted save never leaves a
directory that loads. Loading verifies the checksums first, then checks every tensor's name, shape
and dtype against the saved config, and can leave the Engram tables on disk (``tables=False``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from engram.config import ModelConfig
from engram.model import checksums
from engram.tokenizer.compression import CompressedVocab

WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE = "model.safetensors", "config.json", "vocab.safetensors"
SHARD_DIR = "tables"  # the Engram table shards of a sharded-tables directory (engram.model.sharded_tables)
_FORMAT = "engram-lm"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# config.json also names the model for Hugging Face's AutoConfig / AutoModelForCausalLM (see engram.hf); a
# directory written before these keys existed has none and still loads here.
MODEL_TYPE = "engram"
_HF_CONFIG = {"model_type": MODEL_TYPE, "architectures": ["EngramForCausalLM"]}
# The tokenizer files saved under tokenizer/ are also written at the top level, where AutoTokenizer looks.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def engram_table_key(layer: int) -> str:
    """The state-dict / safetensors key of Engram layer ``layer``'s table."""
    return f"blocks.{layer}.engram.table.weight"


def _weights_to_save(model, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.cfg.tie_embeddings:  # safetensors refuses aliased tensors; the tie is rebuilt on load
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items() if k not in skip}


def _write_model_files(model, d: Path, extra_files: Mapping[str, bytes | str | os.PathLike] | None, *,
                       skip: set[str] | frozenset[str] = frozenset(), metadata: dict | None = None) -> None:
    """Write the weights (but ``skip``), config, vocabulary and ``extra_files`` of ``model`` into ``d``,
    each atomically; the caller unseals before and seals after."""
    from safetensors.torch import save_file

    from engram.atomic import atomic_path, atomic_write, write_json_atomic

    if model.vocab is not None:
        model.vocab.save(d / VOCAB_FILE)  # atomic on its own
    with atomic_path(d / WEIGHTS_FILE) as tmp:
        save_file(_weights_to_save(model, skip), str(tmp), metadata=metadata or {"format": _FORMAT})
    write_json_atomic(d / CONFIG_FILE, {**_HF_CONFIG, **model.cfg.to_dict()})
    extra_files = dict(extra_files or {})
    for name in _HF_TOKENIZER_FILES:
        if f"tokenizer/{name}" in extra_files:
            extra_files.setdefault(name, extra_files[f"tokenizer/{name}"])
    for rel, content in extra_files.items():
        dst = d / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dst, content if isinstance(content, bytes) else Path(content).read_bytes())


def save_pretrained(model, directory: str | os.PathLike,
                    extra_files: Mapping[str, bytes | str | os.PathLike] | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` (and ``vocab.safetensors`` with Engram), then
    ``checksums.json`` over every file of the directory.

    ``extra_files``: ``{relative name: bytes, or a path to copy}`` written with the model (its
    tokenizer, say) before the checksums, so they are verified on load like the weights. The tokenizer
    files under ``tokenizer/`` are also written at the top level, so ``AutoTokenizer`` and
    ``pipeline("text-generation")`` find them there (see :mod:`engram.hf`).
    Every file goes to a temporary name first and is then renamed over the target, and the old
    checksum manifest is removed before anything is written: an interrupted save leaves a directory
    that refuses to load rather than a mix of two saves.
    A model built with ``tables=False`` is saved without tables (load it back with ``tables=False``).
    The table shards of an earlier sharded save (:mod:`engram.model.sharded_tables`) are removed: the
    tables, if any, are now in the weights file.
    """
    import shutil

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    checksums.unseal(d)
    if (d / SHARD_DIR).is_dir():
        shutil.rmtree(d / SHARD_DIR)
    _write_model_files(model, d, extra_files)
    checksums.seal(d)
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` saved in ``directory`` (FileNotFoundError / ValueError when missing / invalid)."""
    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {d} (expected a directory written by save_pretrained)")
    try:
        raw = json.loads(cfg_path.read_text())
        model_type = raw.pop("model_type", MODEL_TYPE)
        raw.pop("architectures", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{cfg_path} is the config of a {model_type!r} model, not of an engram model")
        return ModelConfig.from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise ValueError(f"{cfg_path} is not a valid model config ({e})") from None


def _table_layers(d: Path) -> list[int]:
    """The Engram layer ids of the config in ``d``: the tensors a ``tables=False`` load leaves unread.
    Read before verifying, but the verification that uses them checks config.json too."""
    try:
        eng = json.loads((d / CONFIG_FILE).read_text()).get("engram")
        return [int(i) for i in eng["layer_ids"]] if isinstance(eng, dict) else []
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def load_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    tables: bool = True, verify: bool = True):
    """Load a model of class ``cls`` (:class:`EngramLM`) written by :func:`save_pretrained`.

    ``tables=False`` loads everything but the Engram tables (see ``EngramLM(tables=False)``):
    the file is opened lazily and the table tensors are never read, so a table larger than RAM
    costs nothing; only their shapes and dtypes are checked. A directory saved from such a model
    (no tables in the file) loads only this way.

    A sharded-tables directory (:mod:`engram.model.sharded_tables`) loads the same way: its tables are
    assembled from their shards, or left there with ``tables=False``.

    ``verify`` (default): every file is first checked against ``checksums.json``; with ``tables=False``
    the table bytes are not read, so not checked here (their reader checks them as it reads them:
    :func:`engram.model.table_rows.iter_table_rows`).
    A directory without the manifest (an unfinished save, or an older engram) is refused;
    ``verify=False`` loads it anyway, e.g. to re-save it.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt file or
    weights that do not fit the saved config.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"no {p.name} in {d} (expected a directory written by save_pretrained)")
    if verify:
        skip = () if tables else tuple(engram_table_key(i) for i in _table_layers(d))
        checksums.verify(d, skip_tensors=skip)
    cfg = load_config(d)
    vocab = None
    if cfg.engram is not None:
        if not (d / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"no {VOCAB_FILE} in {d}: the config has Engram layers, which need it")
        vocab = CompressedVocab.load(d / VOCAB_FILE)
    table_keys = {engram_table_key(i): i for i in (cfg.engram.layer_ids if cfg.engram is not None else [])}
    skipped: dict[str, tuple] = {}
    try:
        if tables:
            state = load_file(str(w_path), device=str(map_location))
        else:
            with safe_open(str(w_path), framework="pt", device=str(map_location)) as f:
                names = set(f.keys())
                state = {k: f.get_tensor(k) for k in names if k not in table_keys}
                for k in table_keys:
                    if k in names:
                        sl = f.get_slice(k)
                        dt = sl.get_dtype()
                        skipped[k] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(dt, dt))
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"{w_path} is not a readable safetensors file ({e})") from None
    if table_keys:
        _add_sharded_tables(d, table_keys, state, skipped, tables)
    if tables and table_keys and not any(k in state for k in table_keys):
        raise ValueError(f"{w_path} holds no Engram tables (saved from a model built with tables=False): "
                         f"load it with tables=False and serve the tables from a store (engram.serve)")
    model = cls(cfg, vocab, tables=tables)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for k, (shape, dtype) in skipped.items():
        eng = model.blocks[table_keys[k]].engram
        want = ((eng.num_rows, eng.head_dim), eng.table_dtype)
        if (shape, dtype) != want:
            raise ValueError(f"{w_path} does not match {cfg_path}: {k}: file {shape} {dtype} "
                             f"vs config {want[0]} {want[1]}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [f"{k}: file {tuple(state[k].shape)} {state[k].dtype} vs config {tuple(v.shape)} {v.dtype}"
           for k, v in expected.items() if k in state and (state[k].shape, state[k].dtype) != (v.shape, v.dtype)]
    if missing or unexpected or bad:
        raise ValueError(f"{w_path} does not match {cfg_path}: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]} shape mismatches={bad[:5]}")
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model.to(map_location)


def _add_sharded_tables(d: Path, table_keys: dict[str, int], state: dict, skipped: dict, tables: bool) -> None:
    """For a sharded-tables directory: put the tables assembled from their shards into ``state``
    (``tables``), or their shapes into ``skipped``; nothing for a directory of the single-file layout."""
    from engram.model import sharded_tables

    if not sharded_tables.is_sharded(d):
        return
    for key, lay in table_keys.items():
        _, (R, dim, dtype) = sharded_tables.check_shards(d, lay)
        if tables:  # the checksums of every shard were verified above (unless verify=False)
            state[key] = sharded_tables.load_table_rows(d, lay, 0, R, verify=False)
        else:
            skipped[key] = ((R, dim), dtype)
