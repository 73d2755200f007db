"""Vocabulary compression: hand-checked golden map, bundled tokenizers, persistence, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.tokenizer import CompressedVocab, make_normalizer
from engram.tokenizer.compression import FORMAT

# A tiny byte-level BPE vocabulary (GPT-2 byte alphabet: "Ġ" is a space, "Ã" is byte 0xC3 ...)
# whose compressed map can be worked out by hand from the reference rules.
TINY_VOCAB = [
    "<pad>",  # 0 special, kept as text            -> key "<pad>"            -> 0
    "The",  # 1                                      -> "the"                -> 1
    "Ġthe",  # 2 " the"                              -> "the"                -> 1
    "THE",  # 3                                      -> "the"                -> 1
    "the",  # 4                                      -> "the"                -> 1
    "Ġ",  # 5 " "  (lone space survives the strip)   -> " "                  -> 2
    "ĠĠ",  # 6 "  " (whitespace run folds)          -> " "                  -> 2
    "ĉ",  # 7 "\t"                                   -> " "                  -> 2
    "Ċ",  # 8 "\n"                                   -> " "                  -> 2
    "Ã",  # 9 lone byte 0xC3 decodes to U+FFFD      -> raw token "Ã"        -> 3
    "Ã©",  # 10 "é"  (accent stripped)              -> "e"                  -> 4
    "e",  # 11                                       -> "e"                  -> 4
    "Ãī",  # 12 "É"                                 -> "e"                  -> 4
    "ï¬ģ",  # 13 "ﬁ" ligature, NFKC                  -> "fi"                 -> 5
    "fi",  # 14                                      -> "fi"                 -> 5
    "Ġċ",  # 15 " \x0b": normalises to "" -> original text " \x0b"         -> 6
    "ĠÃ",  # 16 " " + byte 0xC3 -> U+FFFD            -> raw token "ĠÃ"       -> 7
]
TINY_EXPECTED = [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 5, 5, 6, 7]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TINY_VOCAB)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>"])
    d = tmp_path_factory.mktemp("tiny_tok")
    tok.save(str(d / "tokenizer.json"))
    return d


def test_tiny_vocab_matches_hand_derived_map(tiny_tokenizer_dir):
    vocab = CompressedVocab.from_pretrained(tiny_tokenizer_dir)
    assert vocab.lookup.tolist() == TINY_EXPECTED
    assert len(vocab) == 8
    assert vocab.keys == ["<pad>", "the", " ", "Ã", "e", "fi", " \x0b", "ĠÃ"]
    # the single-file form goes through the same loader
    assert np.array_equal(CompressedVocab.from_pretrained(tiny_tokenizer_dir / "tokenizer.json").lookup,
                          vocab.lookup)


def test_normalizer_rules():
    norm = make_normalizer().normalize_str
    assert norm("  Héllo\t\nWORLD ") == "hello world"
    assert norm(" ") == " " and norm("\t\t") == " "  # lone (folded) space survives
    assert norm("\u00a0") == " "  # NFKC turns NBSP into a space
    assert norm("ﬁ") == "fi"
    assert norm("\x0b") == ""  # stripped to nothing: the caller falls back to the raw text


def test_bundled_tekken_golden(tekken):
    # Golden values of the bundled Tekken 131k vocabulary (mistral-common's tekken_240911.json).
    assert tekken.original_size == 131072
    assert len(tekken) == 93285
    assert tekken.fingerprint() == TEKKEN_SHA256
    tok = tekken.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ["The", "Ġthe", "the", "ĠThe", "THE"]]
    assert len(set(tekken.lookup[ids].tolist())) == 1
    # special tokens keep their own ids and stay distinct
    assert len(set(tekken.lookup[:3].tolist())) == 3


def test_bundled_sentencepiece():
    sp = CompressedVocab.from_pretrained("mistral-sp")
    assert sp.original_size == 32768 and len(sp) == 21831
    # byte-fallback pieces decode to U+FFFD alone, so each keeps its own id
    tok = sp.tokenizer
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(0x80, 0x100)]
    assert len(set(sp.lookup[byte_ids].tolist())) == 128


def test_surjective_first_seen_order(tekken):
    lk = tekken.lookup
    assert np.array_equal(np.unique(lk), np.arange(len(tekken)))
    first = np.full(len(tekken), -1)
    seen_order = [c for c in lk.tolist() if first[c] < 0 and not first.__setitem__(c, 1)]
    assert seen_order == list(range(len(tekken)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 131071), min_size=0, max_size=40))
def test_compress_numpy_torch_negative_passthrough(tekken, ids):
    a = np.array(ids, dtype=np.int64)
    out = tekken(a)
    for x, y in zip(ids, out.tolist(), strict=True):
        assert y == (x if x < 0 else int(tekken.lookup[x]))
    assert torch.equal(tekken(torch.tensor(a)), torch.from_numpy(out))


def test_compress_errors(tekken):
    with pytest.raises(IndexError, match="out of range"):
        tekken(np.array([131072]))
    with pytest.raises(TypeError, match="integers"):
        tekken(np.array([1.0]))
    with pytest.raises(TypeError, match="integers"):
        tekken(torch.tensor([1.5]))


def test_save_load_roundtrip_and_damage(tekken, tmp_path):
    p = tekken.save(tmp_path / "vocab.safetensors")
    assert p.stat().st_size < 2_500_000  # small beside a model: int32 ids + the canonical keys
    back = CompressedVocab.from_pretrained(p)
    assert np.array_equal(back.lookup, tekken.lookup) and len(back) == len(tekken)
    assert back.keys == tekken.keys
    assert back.stats(top=1)["top_groups"][0]["key"] == " "

    raw = bytearray(p.read_bytes())
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        CompressedVocab.load(trunc)

    flipped = tmp_path / "flip.safetensors"
    raw[-8] ^= 0x01  # one bit in the last ids
    flipped.write_bytes(raw)
    with pytest.raises(ValueError, match="corrupted|first-seen"):
        CompressedVocab.load(flipped)

    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"lookup": np.zeros(3, np.int32)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match=FORMAT):
        CompressedVocab.load(other)
    with pytest.raises(ValueError, match=".safetensors"):
        tekken.save(tmp_path / "vocab.npy")


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        CompressedVocab.from_pretrained(tmp_path / "missing")
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="cannot tell"):
        CompressedVocab.from_pretrained(junk)
    bad_json = tmp_path / "x.json"
    bad_json.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="neither"):
        CompressedVocab.from_pretrained(bad_json)


def test_stats_case_study(tekken):
    s = tekken.stats(top=3)
    assert s["compressed_size"] == 93285 and abs(s["ratio"] - (1 - 93285 / 131072)) < 1e-12
    sizes = [g["size"] for g in s["top_groups"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1
    assert s["top_groups"][0]["key"] == " "  # all whitespace runs are one token


TEKKEN_SHA256 = "3de524c9e69d493c3e9ab5a0a16acb88a10f204e77f5b1372503f75e17800ac6"
