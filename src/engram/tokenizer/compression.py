"""Vocabulary compression: a surjective map from tokenizer ids to compressed ids.

Tokens that differ only in Unicode form, accents, case or surrounding whitespace ("The",
" the", "THE", ...) share one compressed id, so the n-gram memory sees canonical n-grams.
The map is built exactly as DeepSeek's reference builds it (decode each id alone, keep special
tokens, normalise with Hugging Face `tokenizers` normalizers, number keys in first-seen order).

Shapes: ids of any shape; `lookup_V` has one entry per original id (V = original vocab size).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "engram-compressed-vocab"
VERSION = "1"
_SENTINEL = "\ue000"  # private-use char: lets a lone space survive the Strip step


def make_normalizer():
    """The reference normaliser: NFKC -> NFD -> strip accents -> lowercase -> fold whitespace.

    A token that is exactly one (folded) space must stay a space rather than be stripped to
    nothing, hence the sentinel swap around `Strip`.
    """
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def build_lookup(tokenizer) -> tuple[np.ndarray, list[str]]:
    """Build (lookup_V, keys) from a `transformers` tokenizer.

    lookup_V[i] is the compressed id of original id i; keys[c] is the canonical text of
    compressed id c. Ids that decode to text with U+FFFD (partial UTF-8 byte tokens) keep their
    raw token string as key, so distinct byte pieces are never merged.
    """
    normalizer = make_normalizer()
    vocab_size = len(tokenizer)
    key_to_new: dict[str, int] = {}
    keys: list[str] = []
    lookup_V = np.empty(vocab_size, dtype=np.int64)
    for tid in range(vocab_size):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.convert_ids_to_tokens(tid)
        else:
            norm = normalizer.normalize_str(text)
            key = norm if norm else text
        nid = key_to_new.get(key)
        if nid is None:
            nid = len(keys)
            key_to_new[key] = nid
            keys.append(key)
        lookup_V[tid] = nid
    return lookup_V, keys


@dataclass
class MergedGroup:
    """One compressed id and the original tokens that map to it."""

    compressed_id: int
    key: str
    original_ids: list[int]
    original_tokens: list[str]


class CompressedVocab:
    """A surjective id map `original id -> compressed id`.

    `lookup` is an int64 numpy array over the original vocabulary; `len(vocab)` is the
    compressed size. Call it (or `compress`) on ids of any shape; negative ids (padding
    conventions such as -100) pass through unchanged.
    """

    def __init__(self, lookup: np.ndarray, *, keys: list[str] | None = None, source: str = "",
                 tokenizer=None):
        lookup = np.ascontiguousarray(lookup, dtype=np.int64)
        _validate_lookup(lookup, "lookup")
        self.lookup = lookup
        self.num_compressed = int(lookup.max()) + 1 if lookup.size else 0
        self.keys = keys
        self.source = source
        self.tokenizer = tokenizer
        self._torch_lookup: dict = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tokenizer, *, source: str = "") -> CompressedVocab:
        """Build from an already-loaded `transformers` tokenizer."""
        lookup, keys = build_lookup(tokenizer)
        return cls(lookup, keys=keys, source=source or getattr(tokenizer, "name_or_path", ""),
                   tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, trust_remote_code: bool = False) -> CompressedVocab:
        """Build from a tokenizer (directory, tokenizer file or bundled name), offline.

        A file saved by `save` (``*.safetensors``) is loaded instead of rebuilt.
        """
        p = Path(str(path))
        if p.suffix == ".safetensors":
            return cls.load(p)
        from .loading import load_tokenizer

        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return cls.from_tokenizer(tok, source=str(path))

    # -- use -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_compressed

    @property
    def original_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def ratio(self) -> float:
        """Fraction of the vocabulary removed by compression: 1 - |compressed| / |original|."""
        return 1.0 - self.num_compressed / self.original_size

    def compress(self, ids):
        """Map original ids (list, numpy array or torch tensor, any shape) to compressed ids."""
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency of the package
            torch = None
        if torch is not None and isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise TypeError(f"token ids must be integers, got a tensor of {ids.dtype}")
            ids = ids.long()
            self._check_range(int(ids.max()) if ids.numel() else -1)
            table = self._torch_lookup.get(ids.device)
            if table is None:
                table = torch.from_numpy(self.lookup).to(ids.device)
                self._torch_lookup[ids.device] = table
            return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got an array of {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        self._check_range(int(arr.max()) if arr.size else -1)
        return np.where(arr >= 0, self.lookup[np.maximum(arr, 0)], arr)

    __call__ = compress

    def _check_range(self, max_id: int) -> None:
        if max_id >= self.original_size:
            raise IndexError(
                f"token id {max_id} is out of range for a vocabulary of {self.original_size} ids"
            )

    def groups(self) -> list[MergedGroup]:
        """All compressed ids that merge more than one original id, largest first."""
        counts = np.bincount(self.lookup, minlength=self.num_compressed)
        order = np.argsort(-counts, kind="stable")
        members: dict[int, list[int]] = {}
        multi = set(int(c) for c in np.nonzero(counts > 1)[0])
        for tid, c in enumerate(self.lookup.tolist()):
            if c in multi:
                members.setdefault(c, []).append(tid)
        out = []
        for c in order.tolist():
            if counts[c] <= 1:
                break
            ids = members[c]
            # Without the tokenizer (a map loaded from disk) the members are shown by id.
            toks = ([self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
                    if self.tokenizer is not None else [f"#{i}" for i in ids])
            key = self.keys[c] if self.keys is not None else ""
            out.append(MergedGroup(c, key, ids, toks))
        return out

    def stats(self, top: int = 10) -> dict:
        """Compression ratio and the `top` largest merged groups (the paper's case study)."""
        groups = self.groups()
        sizes = Counter(len(g.original_ids) for g in groups)
        return {
            "source": self.source,
            "original_size": self.original_size,
            "compressed_size": self.num_compressed,
            "ratio": self.ratio,
            "merged_groups": len(groups),
            "group_size_histogram": dict(sorted(sizes.items())),
            "top_groups": [
                {"compressed_id": g.compressed_id, "key": g.key, "size": len(g.original_ids),
                 "tokens": g.original_tokens}
                for g in groups[:top]
            ],
        }

    def fingerprint(self) -> str:
        """sha256 of the lookup table: identifies the map independently of file names."""
        return hashlib.sha256(self.lookup.astype("<i8").tobytes()).hexdigest()

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save the map as a small safetensors file (int32 ids + metadata), atomically."""
        from safetensors.numpy import save_file

        from engram.atomic import atomic_path

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"compressed vocab files end in .safetensors, got {path.name!r}")
        meta = {
            "format": FORMAT, "version": VERSION, "source": self.source,
            "original_size": str(self.original_size), "compressed_size": str(self.num_compressed),
            "sha256": self.fingerprint(),
        }
        if self.keys is not None:  # canonical texts, so stats work without the tokenizer
            meta["keys"] = json.dumps(self.keys, ensure_ascii=False)
        with atomic_path(path) as tmp:  # a crash never leaves a half-written file under `path`
            save_file({"lookup": self.lookup.astype(np.int32)}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompressedVocab:
        """Load a map written by `save`, verifying its format and checksum."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compressed vocab file at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                lookup = f.get_tensor("lookup").astype(np.int64)
        except Exception as e:  # safetensors raises several types for damaged files
            raise ValueError(f"{path} is not a readable compressed vocab file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} file (format={meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} has version {meta.get('version')!r}; this code reads {VERSION!r}")
        keys = json.loads(meta["keys"]) if "keys" in meta else None
        vocab = cls(lookup, source=meta.get("source", ""), keys=keys)
        if (str(vocab.original_size) != meta.get("original_size") or vocab.fingerprint() != meta.get("sha256")
                or (keys is not None and len(keys) != len(vocab))):
            raise ValueError(f"{path} is corrupted: its checksum or size does not match its header")
        return vocab


def _validate_lookup(lookup: np.ndarray, what: str) -> None:
    if lookup.ndim != 1 or lookup.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {lookup.shape}")
    if lookup.min() < 0:
        raise ValueError(f"{what} has negative compressed ids")
    # First-seen numbering: each new id is exactly one more than the largest seen so far,
    # which also makes the map surjective onto [0, max].
    running_max = np.maximum.accumulate(lookup)
    prev = np.concatenate([[-1], running_max[:-1]])
    if np.any(lookup > prev + 1):
        raise ValueError(f"{what} is not numbered in first-seen order (not a valid compression map)")
