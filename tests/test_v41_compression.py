"""V4.1 vocabulary compression on a tokenizer.json built here, and on the bundled Tekken."""

import re
import unicodedata

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models

from engram.config import ConfigError
from engram.v41 import compressed_token_map

# byte-level token strings ("Ġ" is a space, "Ċ" a newline, "Ã"/"Ä" lone lead bytes of UTF-8)
PIECES = ["<pad>", "<s>", "the", "Ġthe", "The", "THE", "ĠThe", "cafÃ©", "cafe", "Ġ", "ĠĠ", "Ċ", "Ã", "Ä", "ĠĊĠ",
          "ï¬ģ", "fi", "Â½"]
ADDED = ["<|end|>", "  X"]  # one special, one plain added token: both get ids after the model vocabulary
# what each id decodes to alone (stated here, not asked of the library)
DECODED = ["<pad>", "<s>", "the", " the", "The", "THE", " The", "café", "cafe", " ", "  ", "\n", "\ufffd", "\ufffd",
           " \n ", "ﬁ", "fi", "½", "<|end|>", "  X"]


@pytest.fixture
def tokenizer_json(tmp_path):
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(PIECES)}, unk_token="<pad>"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(ADDED[0], special=True)])
    tok.add_tokens([ADDED[1]])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def fold(text: str) -> str:
    """The folding, from its description: NFKC, NFD, drop combining marks, lowercase, one
    space per whitespace run, trim unless the whole text is that one space."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if unicodedata.category(c) != "Mn").lower()
    s = re.sub(r"[ \t\r\n]+", " ", s)
    return s if s == " " else s.strip()


def expected_map() -> list[int]:
    keys: dict[str, int] = {}
    out = []
    for tid, text in enumerate(DECODED):
        raw = (PIECES + ADDED)[tid]
        key = raw if "\ufffd" in text else (fold(text) or text)
        out.append(keys.setdefault(key, len(keys)))
    return out


def test_map_matches_the_folding_rules(tokenizer_json):
    got = compressed_token_map(tokenizer_json)
    assert got.dtype == np.int64 and len(got) == len(PIECES) + len(ADDED)  # added tokens included
    assert got.tolist() == expected_map()
    # the same thing spelled out
    assert got.tolist() == [0, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 5, 6, 4, 7, 7, 8, 9, 10]


def test_what_merges_and_what_stays_apart(tokenizer_json):
    m = compressed_token_map(tokenizer_json)
    ids = {p: i for i, p in enumerate(PIECES + ADDED)}
    assert len({m[ids[p]] for p in ("the", "Ġthe", "The", "THE", "ĠThe")}) == 1  # case and spaces fold
    assert m[ids["cafÃ©"]] == m[ids["cafe"]]  # accents strip
    assert m[ids["ï¬ģ"]] == m[ids["fi"]]  # NFKC splits the ligature
    assert m[ids["Ġ"]] == m[ids["Ċ"]] != m[ids["<pad>"]]  # a lone space stays a space, not ""
    assert m[ids["Ã"]] != m[ids["Ä"]]  # byte fragments keep their own ids
    assert m[ids["  X"]] != m[ids["<|end|>"]]


def test_size_is_checked_against_the_config(tokenizer_json):
    assert compressed_token_map(tokenizer_json, expected_size=11).max() == 10
    with pytest.raises(ConfigError, match="compresses to 11 ids.*engram_compressed_vocab_size=12"):
        compressed_token_map(tokenizer_json, expected_size=12)
    with pytest.raises(ConfigError, match="cannot load a tokenizer.json"):
        compressed_token_map(tokenizer_json.parent / "absent.json")
    assert compressed_token_map(tokenizer_json.parent).tolist() == expected_map()  # a directory works


@pytest.mark.slow
def test_bundled_tekken_agrees_with_the_demo_compression(tmp_path, tekken):
    """On Tekken the backend decode equals the `transformers` decode id for id, so both
    flavours compress alike; the V4.1 map must then reproduce the demo's exactly."""
    from engram.tokenizer.loading import load_tokenizer

    path = tmp_path / "tokenizer.json"
    load_tokenizer("mistral-tekken").backend_tokenizer.save(str(path))
    m = compressed_token_map(path, expected_size=tekken.num_compressed)
    assert len(m) == 131072 and m.max() + 1 == 93285
    np.testing.assert_array_equal(m, tekken.lookup)
    first = np.maximum.accumulate(np.concatenate([[-1], m[:-1]]))
    assert (m <= first + 1).all()  # numbered in order of first appearance
