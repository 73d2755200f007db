"""V4.1's vocabulary compression: one compressed id per tokenizer id, from tokenizer.json.

Tokens that read the same after Unicode folding, accent stripping, lowercasing and whitespace
folding (" The", "the", "THE") share a compressed id, so the n-gram memory sees one n-gram
where the tokenizer has several. Compressed ids are numbered in order of first appearance
while walking the token ids upward.

What differs from the demo flavour (`engram.tokenizer.compression`): the demo decodes each id
through a `transformers` tokenizer object, as DeepSeek's demo does; V4.1 decodes through the
raw `tokenizers` backend, which is what V4.1's training decoded with. The wrapper may post-
process a single-token decode (cleaning up spaces, dropping a leading space; it varies by
tokenizer class and library version), the backend does not, so the two can merge differently
and give a different compressed size. On the bundled Tekken vocabulary they agree id for id
(a test checks it), so the difference shows only where the wrapper rewrites. That size is
load-bearing in V4.1: the hash multipliers are bounded by it and it is written in the config
(`engram_compressed_vocab_size`), so a tokenizer that compresses to another size would address
every table row wrongly; `compressed_token_map` refuses it instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engram.config import ConfigError

# Private-use character: a token that is exactly one (folded) space must stay a space through
# Strip, or it would become the empty string and merge with unrelated tokens.
_LONE_SPACE = "\ue000"
_REPLACEMENT = "\ufffd"  # what a decode of a partial UTF-8 byte token contains


def _folding_normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _LONE_SPACE),
        normalizers.Strip(),
        normalizers.Replace(_LONE_SPACE, " "),
    ])


def _token_count(tok) -> int:
    """Ids 0..n-1 to map: the model vocabulary and every added token, whichever reaches further."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def compressed_token_map(tokenizer_json_path: str | os.PathLike, expected_size: int | None = None) -> np.ndarray:
    """Compressed id of every token id (int64, length = vocabulary incl. added tokens).

    Each id is decoded alone, special tokens kept, by the raw `tokenizers` backend, then folded
    (NFKC, NFD, strip accents, lowercase, whitespace runs to one space, trim; a lone space
    stays). A decode containing U+FFFD is a fragment of a multi-byte character: it is keyed
    by its raw token string so distinct byte pieces never merge; a decode that folds to
    nothing keeps its raw text as key.

    expected_size: the config's `engram_compressed_vocab_size`; any other size raises
    ConfigError naming both, because every hash would land on the wrong rows.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_json_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for unreadable files
        raise ConfigError(f"cannot load a tokenizer.json from {path}: {e}") from None
    normalizer = _folding_normalizer()
    first_id: dict[str, int] = {}
    map_V = np.empty(_token_count(tok), dtype=np.int64)
    for tid in range(len(map_V)):
        text = tok.decode([tid], skip_special_tokens=False)
        if _REPLACEMENT in text:
            key = tok.id_to_token(tid) or text
        else:
            key = normalizer.normalize_str(text) or text
        map_V[tid] = first_id.setdefault(key, len(first_id))
    size = len(first_id)
    if expected_size is not None and size != expected_size:
        raise ConfigError(
            f"{path} compresses to {size} ids but the config says engram_compressed_vocab_size={expected_size}; "
            f"hashing with the wrong tokenizer would address every Engram row wrongly"
        )
    return map_V
