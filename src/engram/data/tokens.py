"""Token streams on disk, training batches and validation windows.

Each split is tokenised once, its documents joined with the EOS id between them, and stored as
a memory-mapped ``.npy`` (uint16 when every id fits, else uint32) under
``<cache root>/tokens/<key>/`` with the key covering the corpus fingerprint, the tokenizer
fingerprint, the `tokenizers` version and `FORMAT_VERSION`. Files are written to a temporary
name and renamed, and ``meta.json`` is written last: a crash never leaves a cache that loads.

`BatchSampler` draws training windows as a pure function of (seed, step), so a resumed run
replays the exact batches from its step alone. `val_batches` gives fixed validation windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_path, atomic_write

from .bpe import TokenCodec, cache_root, get_tokenizer, log, tokenizer_fingerprint
from .corpus import Corpus, Document, load_corpus

FORMAT_VERSION = 1
ENCODE_CHUNK_DOCS = 256  # documents per `encode_batch` call: parallel enough, bounded memory for id lists
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(codec: TokenCodec, docs: Sequence[Document], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """Ids of all documents in order, with `eos_id` between consecutive documents."""
    limit = np.iinfo(dtype).max
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    for i in range(0, len(docs), ENCODE_CHUNK_DOCS):
        for ids in codec.encode_batch([d.text for d in docs[i:i + ENCODE_CHUNK_DOCS]]):
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and (arr.max() > limit or arr.min() < 0):
                raise ValueError(f"tokenizer {codec.name!r} produced id {int(arr.max())}, outside {dtype} "
                                 f"(vocab_size {codec.vocab_size})")
            if parts:
                parts.append(eos)
            parts.append(arr.astype(dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=arr.dtype, shape=arr.shape)
        out[:] = arr
        out.flush()
        del out  # close the map before the rename


def tokens_dir(corpus: Corpus, tokenizer_fp: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache directory of the token streams for (corpus, tokenizer, tokenizers version, format)."""
    import tokenizers

    key = hashlib.sha256(f"{corpus.fingerprint()}\n{tokenizer_fp}\n{tokenizers.__version__}".encode()).hexdigest()
    return cache_root(cache_dir) / "tokens" / f"v{FORMAT_VERSION}-{key[:24]}"


def _load_cached(out: Path) -> tuple[np.memmap, np.memmap, dict] | None:
    """The cached streams when complete and consistent with their meta, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        arrays = [np.load(out / f"{s}.npy", mmap_mode="r") for s in SPLITS]
        consistent = all(arr.shape == (meta[f"{s}_tokens"],) and str(arr.dtype) == meta["dtype"]
                         for s, arr in zip(SPLITS, arrays, strict=True))
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or foreign files: rebuild
        return None
    return (arrays[0], arrays[1], meta) if consistent else None


def load_tokens(corpus: Corpus, codec: TokenCodec, tokenizer_spec: str, cache_dir: str | os.PathLike | None = None,
                *, progress: bool = True) -> tuple[np.memmap, np.memmap, dict]:
    """``(train_tokens, val_tokens, meta)``: read-only memmaps, tokenising on the first call only.

    `tokenizer_spec` is what `codec` was loaded from; its files' hash is part of the cache key.
    """
    tok_fp = tokenizer_fingerprint(tokenizer_spec)
    out = tokens_dir(corpus, tok_fp, cache_dir)
    cached = _load_cached(out)
    if cached is not None:
        return cached
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(codec.vocab_size)
    if progress:
        log(f"tokenising {len(corpus.train)} train + {len(corpus.val)} val documents with {codec.name}; "
            f"first run only, cached in {out}")
    t0 = time.perf_counter()
    meta = {"format_version": FORMAT_VERSION, "corpus_fingerprint": corpus.fingerprint(),
            "corpus_source": corpus.source, "tokenizer": tokenizer_spec, "tokenizer_fingerprint": tok_fp,
            "vocab_size": codec.vocab_size, "dtype": dtype.name, "eos_id": codec.eos_id, "pad_id": codec.pad_id}
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        arr = encode_documents(codec, docs, codec.eos_id, dtype)
        _save_npy_atomic(out / f"{split}.npy", arr)
        meta.update({f"{split}_tokens": int(arr.size), f"{split}_documents": len(docs),
                     f"{split}_chars": corpus.num_chars(split)})
    meta["encode_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write(out / "meta.json", json.dumps(meta, indent=2).encode())  # last: marks the cache complete
    if progress:
        log(f"tokenised in {meta['encode_seconds']:.1f} s: {meta['train_tokens']:,} train and "
            f"{meta['val_tokens']:,} val tokens ({dtype.name})")
    loaded = _load_cached(out)
    if loaded is None:
        raise RuntimeError(f"token cache {out} was just written but does not load back")
    return loaded


def _check_window(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.ndim != 1:
        raise ValueError(f"{what} tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{what} split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                         f"{seq_len + 1}: use a smaller seq_len or a larger corpus")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx_BW = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win_BW = torch.from_numpy(np.asarray(tokens[idx_BW], dtype=np.int64))
    return win_BW[:, :-1].contiguous(), win_BW[:, 1:].contiguous()  # y is x shifted by one


class StepSampler:
    """What every training sampler shares: batches indexed by step, so ``next()`` is ``batch_at(step)`` then
    one step on, and the state to resume is ``{"seed", "step"}``. Subclasses set ``seed`` and ``step`` and
    define ``batch_at``."""

    seed: int
    step: int

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the current step; then advance one step."""
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Everything needed to resume: ``{"seed", "step"}``."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step (the saved seed replaces the current one)."""
        missing = {"seed", "step"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.seed, self.step = int(state["seed"]), int(state["step"])


class BatchSampler(StepSampler):
    """Random training windows; the batch of step i depends only on (seed, i).

    Each batch holds `batch_size` windows of ``seq_len + 1`` tokens starting at offsets drawn by
    ``np.random.default_rng([seed, step])``; ``next()`` returns ``(x_BT, y_BT)`` int64 tensors
    with ``y_BT[:, t] == x_BT[:, t + 1]`` along the stream, and advances the step.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, step: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0 or step < 0:
            raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
        _check_window(tokens, seq_len, "train")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.step = int(seed), int(step)

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets of the batch at `step`, shape [batch_size]."""
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step`, without changing the sampler's position."""
        return _windows(self.tokens, self.starts(step), self.seq_len)


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                max_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: non-overlapping windows of ``seq_len + 1`` tokens, evenly strided.

    As many windows as fit, capped at ``max_tokens // seq_len`` (at least one), spread over the
    whole split so the estimate does not come from its first documents only. The last batch
    can be smaller than `batch_size`. The same arguments always give the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_window(tokens, seq_len, "validation")
    n = len(tokens)
    n_win = n // (seq_len + 1)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None for all), got {max_tokens}")
        n_win = min(n_win, max(1, max_tokens // seq_len))
    # Stride >= seq_len + 1 because n_win * (seq_len + 1) <= n: windows never overlap.
    stride = (n - seq_len - 1) // (n_win - 1) if n_win > 1 else 0
    starts = np.arange(n_win, dtype=np.int64) * stride
    return [_windows(tokens, starts[i:i + batch_size], seq_len) for i in range(0, n_win, batch_size)]


@dataclass
class DataBundle:
    """Everything training needs from the data side.

    `tokenizer_spec` is what ``CompressedVocab.from_pretrained`` takes; `tokenizer` encodes and
    decodes; `train`/`val` are read-only memmaps of token ids.
    """

    tokenizer_spec: str
    tokenizer: TokenCodec
    train: np.ndarray
    val: np.ndarray
    eos_id: int
    pad_id: int
    meta: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def prepare_data(data: list[str] | str | None = None, tokenizer: str | None = None, vocab_size: int = 8192,
                 cache_dir: str | os.PathLike | None = None, val_permille: int = 50, *,
                 progress: bool = True) -> DataBundle:
    """Corpus -> tokenizer -> cached token streams, in one call.

    Defaults: the standard library source of the running Python, and a byte-level BPE of
    `vocab_size` ids trained on its train split. The first run trains and tokenises (seconds,
    reported on stderr); later runs load from the cache (`cache_root`).
    """
    corpus = load_corpus(data, val_permille)
    spec, codec, eos_id, pad_id = get_tokenizer(tokenizer, corpus, vocab_size, cache_dir, progress=progress)
    train, val, meta = load_tokens(corpus, codec, spec, cache_dir, progress=progress)
    return DataBundle(tokenizer_spec=spec, tokenizer=codec, train=train, val=val, eos_id=eos_id, pad_id=pad_id,
                      meta=meta)
