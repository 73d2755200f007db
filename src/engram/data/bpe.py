"""Tokenizers for training: a byte-level BPE trained locally (the default), or any existing one.

The default BPE is trained with Hugging Face `tokenizers` on the *train* split only and cached
under ``<cache root>/bpe/<key>/`` where the key covers the corpus fingerprint, the vocabulary
size and `FORMAT_VERSION`. The directory holds a standard ``tokenizer.json`` (plus a small
``tokenizer_config.json`` naming the special tokens), so ``transformers.AutoTokenizer`` and
``engram.tokenizer.CompressedVocab.from_pretrained(dir)`` load it like any other tokenizer.

Training is deterministic: the same corpus gives a byte-identical ``tokenizer.json`` whatever
the thread count (checked by the tests; merge ties are broken by token id, not by hash order).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engram.atomic import atomic_write

if TYPE_CHECKING:
    from .corpus import Corpus

FORMAT_VERSION = 1
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
EOS_ID, PAD_ID = 0, 1
# Files of a tokenizer directory that can change how text is tokenised; model weights that
# may share the directory are not hashed (they can be gigabytes and do not matter here).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
# Fallback names of the end-of-text and padding tokens, for tokenizers that do not set them.
_EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")
_PAD_NAMES = (PAD_TOKEN, "<pad>")
_BATCH_DOCS = 64  # documents per training batch: lets `tokenizers` pre-tokenise a batch in parallel
# Training record kept next to our BPE (it holds a timing, so it is left out of the tokenizer's hash).
_BPE_META = "bpe_meta.json"


def log(msg: str) -> None:
    """Progress message for slow first runs (stderr, so stdout stays clean for results)."""
    print(f"[engram.data] {msg}", file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the data cache: `cache_dir`, else ``$ENGRAM_CACHE``, else ``~/.cache/engram``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ENGRAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engram"


class TokenCodec:
    """Uniform encode/decode over a `tokenizers.Tokenizer` or a `transformers` tokenizer.

    Encoding never produces special tokens: none are added, and a literal "<|endoftext|>" in a
    document is encoded as plain text, so `eos_id` in a token stream always marks a real
    document boundary. `backend` is the wrapped object (the codec changes that setting on it).
    """

    def __init__(self, backend, *, name: str, eos_id: int, pad_id: int):
        self.backend, self.name, self.eos_id, self.pad_id = backend, name, eos_id, pad_id
        import tokenizers

        self._raw = backend if isinstance(backend, tokenizers.Tokenizer) else None
        # A fast transformers tokenizer wraps a `tokenizers.Tokenizer`: encode through it directly
        # (batched, multi-threaded); decoding still goes through transformers, as users expect.
        self._fast = getattr(backend, "backend_tokenizer", None) if self._raw is None else self._raw
        if self._fast is not None:
            self._fast.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (every id the tokenizer can produce is below it)."""
        if self._raw is not None:
            return self._raw.get_vocab_size(with_added_tokens=True)
        return len(self.backend)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without special tokens."""
        if self._fast is not None:
            # encode_batch_fast skips character offsets (~30% less work); same ids.
            encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
            return [e.ids for e in encode(list(texts), add_special_tokens=False)]
        return [list(self.backend.encode(t, add_special_tokens=False, split_special_tokens=True)) for t in texts]

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without special tokens."""
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        """Text of a sequence of ids (special tokens kept, so EOS boundaries stay visible)."""
        ids = [int(i) for i in ids]
        if self._raw is not None:
            return self._raw.decode(ids, skip_special_tokens=False)
        return self.backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TokenCodec({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def build_bpe_trainer(vocab_size: int):
    """An untrained byte-level BPE `Tokenizer` and its `BpeTrainer` (GPT-2 style, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def train_bpe(texts: list[str], vocab_size: int = 8192):
    """Train a byte-level BPE on `texts`; returns a `tokenizers.Tokenizer` with EOS id 0 and pad id 1.

    The vocabulary can come out smaller than `vocab_size` on a small corpus (no pair left that
    occurs twice).
    """
    tok, trainer = build_bpe_trainer(vocab_size)
    batches = (texts[i:i + _BATCH_DOCS] for i in range(0, len(texts), _BATCH_DOCS))
    tok.train_from_iterator(batches, trainer=trainer, length=len(texts))
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != [EOS_ID, PAD_ID]:  # guards a change of `tokenizers` behaviour, not user error
        raise RuntimeError(f"special tokens got ids {got}, expected {[EOS_ID, PAD_ID]}")
    return tok


def bpe_dir(corpus: Corpus, vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache directory of the BPE for (corpus fingerprint, vocab size, format version)."""
    return cache_root(cache_dir) / "bpe" / f"v{FORMAT_VERSION}-{vocab_size}-{corpus.fingerprint()[:24]}"


def get_bpe(corpus: Corpus, vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None,
            *, progress: bool = True) -> Path:
    """Directory holding the BPE trained on `corpus.train`, training it on the first call only."""
    out = bpe_dir(corpus, vocab_size, cache_dir)
    if (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    n_chars = corpus.num_chars("train")
    if progress:
        log(f"training a byte-level BPE (vocab {vocab_size}) on {len(corpus.train)} train documents "
            f"({n_chars / 1e6:.1f} M chars); first run only, cached in {out}")
    t0 = time.perf_counter()
    tok = train_bpe([d.text for d in corpus.train], vocab_size)
    seconds = time.perf_counter() - t0
    if progress:
        log(f"BPE trained in {seconds:.1f} s: {tok.get_vocab_size()} ids")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
              "bos_token": None, "unk_token": None, "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000}
    meta = {"format_version": FORMAT_VERSION, "vocab_size_requested": vocab_size,
            "vocab_size": tok.get_vocab_size(), "corpus_fingerprint": corpus.fingerprint(),
            "corpus_source": corpus.source, "train_documents": len(corpus.train), "train_chars": n_chars,
            "train_seconds": round(seconds, 3)}
    atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    atomic_write(out / _BPE_META, json.dumps(meta, indent=2).encode())
    # tokenizer.json last: its presence is what marks the directory complete.
    atomic_write(out / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    return out


def tokenizer_fingerprint(spec: str | os.PathLike) -> str:
    """sha256 over the files that define a tokenizer (a dir's tokenizer files, or the single file)."""
    from engram.tokenizer.loading import resolve

    path = resolve(spec)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)
        and not p.name.startswith(".") and p.name != _BPE_META)
    h = hashlib.sha256(b"engram-tokenizer-v1\n")
    for p in files:
        h.update(f"{p.name}\t{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _special_ids(tok, spec: str) -> tuple[int, int]:
    """EOS and pad ids of a transformers tokenizer.

    Some tokenizers (Mistral's tekken files) load without `eos_token` set although the vocabulary
    has one, so well-known names are looked up next. Pad falls back to EOS: nothing trains on pads.
    """
    vocab = tok.get_vocab()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if eos is None:
        eos = next((vocab[t] for t in _EOS_NAMES if t in vocab), None)
    if eos is None:
        raise ValueError(f"tokenizer {spec!r} has no end-of-text token (eos_token is unset and its vocabulary has "
                         f"none of {', '.join(_EOS_NAMES)}); documents need one to be joined")
    if pad is None:
        pad = next((vocab[t] for t in _PAD_NAMES if t in vocab), eos)
    return int(eos), int(pad)


def get_tokenizer(spec: str | os.PathLike | None, corpus: Corpus | None = None, vocab_size: int = 8192,
                  cache_dir: str | os.PathLike | None = None, *, progress: bool = True
                  ) -> tuple[str, TokenCodec, int, int]:
    """The tokenizer to train with: ``(spec, codec, eos_id, pad_id)``.

    `spec` None trains (or loads from the cache) the default BPE on `corpus`, and the returned
    spec is its directory. Otherwise `spec` is a Hugging Face tokenizer directory, a tokenizer
    file or a bundled name (see `engram.tokenizer.BUNDLED`), returned as given. Either way the
    spec is what ``CompressedVocab.from_pretrained`` takes.
    """
    if spec is None:
        if corpus is None:
            raise ValueError("the default BPE tokenizer is trained on a corpus: pass corpus=load_corpus(...)")
        from tokenizers import Tokenizer

        d = get_bpe(corpus, vocab_size, cache_dir, progress=progress)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        return str(d), TokenCodec(tok, name=str(d), eos_id=EOS_ID, pad_id=PAD_ID), EOS_ID, PAD_ID
    from engram.tokenizer.loading import load_tokenizer

    spec = str(spec)
    tok = load_tokenizer(spec)
    eos, pad = _special_ids(tok, spec)
    return spec, TokenCodec(tok, name=spec, eos_id=eos, pad_id=pad), eos, pad
