"""Data pipeline: corpus discovery and split, BPE training and cache, token cache, batch sampling.

Everything runs on small synthetic corpora in tmp dirs with the cache pointed at tmp_path; the
standard library corpus is only discovered (listed), never read or trained on here.
"""

import json
import os
import random

import numpy as np
import pytest
import torch

from engram.data import (
    EOS_ID,
    PAD_ID,
    BatchSampler,
    get_bpe,
    get_tokenizer,
    load_corpus,
    prepare_data,
    stdlib_files,
    token_dtype,
    val_batches,
)
from engram.data import bpe as bpe_mod
from engram.data import tokens as tokens_mod

WORDS = ("def class return import self value data token memory engram hash table lookup gate "
         "résumé naïve 日本 λ café the of and to in is for with").split()


def write_corpus(root, n_docs=40, seed=0):
    """`n_docs` small text files of pseudo-code built from WORDS (deterministic)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(5, 30)):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))))
        (root / f"doc{i:03d}.{rng.choice(['txt', 'md', 'py'])}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "small")


@pytest.fixture(scope="module")
def small_corpus(small_dir):
    return load_corpus([str(small_dir)])


@pytest.fixture(scope="module")
def bpe_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# -- corpus ------------------------------------------------------------------------------------
def test_stdlib_discovery():
    files = stdlib_files()
    names = [n for n, _ in files]
    assert len(files) > 500  # CPython ships ~1,800 .py files
    assert all(n.endswith(".py") for n in names)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for _, p in files)
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "json/decoder.py" in names and "os.py" in names
    assert [n for n, _ in stdlib_files()] == names


def test_split_stable_order_independent_and_non_empty(small_dir):
    files = sorted(str(p) for p in small_dir.iterdir())
    a = load_corpus(files)
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    b = load_corpus(shuffled)
    assert a.train and a.val
    assert [d.name for d in a.train] == [d.name for d in b.train]
    assert [d.name for d in a.val] == [d.name for d in b.val]
    assert a.fingerprint() == b.fingerprint()
    # A folder gives names relative to its parent ("small/doc000.txt"), stable across calls.
    c = load_corpus([str(small_dir)])
    assert c.train and c.val and all(d.name.startswith("small/") for d in c.documents)
    assert load_corpus([str(small_dir)]).fingerprint() == c.fingerprint()
    assert load_corpus([str(small_dir)], val_permille=200).fingerprint() != c.fingerprint()


def test_split_guarantees_both_sides(tmp_path):
    for i in range(2):
        (tmp_path / f"f{i}.txt").write_text(f"text {i}\n")
    for permille in (0, 1000):
        c = load_corpus([str(tmp_path)], val_permille=permille)
        assert len(c.train) == 1 and len(c.val) == 1
    with pytest.raises(ValueError, match="val_permille"):
        load_corpus([str(tmp_path)], val_permille=1001)


def test_single_document_is_cut_at_a_line_break(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    c = load_corpus([str(tmp_path / "one.txt")], val_permille=100)
    (tr,), (va,) = c.train, c.val
    assert tr.text + va.text == text and tr.text.endswith("\n")
    assert 0.05 < len(va.text) / len(text) < 0.15


def test_jsonl_documents_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "second", "id": 7}\n{"text": "third"}\n')
    (tmp_path / "note.md").write_text("# a note\n")
    c = load_corpus([str(good), str(tmp_path / "note.md")])
    assert sorted(d.name for d in c.documents) == ["good.jsonl:1", "good.jsonl:3", "good.jsonl:4", "note.md"]
    assert {d.text for d in c.documents} == {"first", "second", "third", "# a note\n"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_corpus([str(bad)])
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: .*\"text\" field"):
        load_corpus([str(bad)])
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"line 1: \"text\" must be a string"):
        load_corpus([str(bad)])


def test_empty_corpus_missing_path_binary_and_bad_utf8(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus([str(empty)])
    (empty / "blank.txt").write_text("")
    (empty / "image.bin").write_bytes(b"\x89PNG\0\0\0")
    with pytest.raises(ValueError, match="empty"):
        load_corpus([str(empty)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus([str(tmp_path / "nope")])
    (empty / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (empty / "ok.txt").write_text("fine\n")
    c = load_corpus([str(empty)])
    assert any("\ufffd" in d.text for d in c.documents)
    assert [s.endswith("image.bin") for s in c.skipped] == [True]


# -- BPE ------------------------------------------------------------------------------------------
def test_bpe_deterministic_cached_and_special_ids(small_corpus, bpe_cache, tmp_path, monkeypatch):
    d1 = get_bpe(small_corpus, 512, bpe_cache, progress=False)
    d2 = get_bpe(small_corpus, 512, tmp_path, progress=False)  # a second, independent training
    assert (d1 / "tokenizer.json").read_bytes() == (d2 / "tokenizer.json").read_bytes()

    mtime = (d1 / "tokenizer.json").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(bpe_mod, "train_bpe", no_training)
    assert get_bpe(small_corpus, 512, bpe_cache, progress=False) == d1
    assert (d1 / "tokenizer.json").stat().st_mtime_ns == mtime

    spec, codec, eos, pad = get_tokenizer(None, small_corpus, 512, bpe_cache, progress=False)
    assert spec == str(d1) and (eos, pad) == (EOS_ID, PAD_ID) == (0, 1)
    assert codec.backend.token_to_id("<|endoftext|>") == 0 and codec.backend.token_to_id("<|pad|>") == 1
    assert codec.vocab_size <= 512


def test_bpe_round_trip_and_byte_coverage(small_corpus, bpe_cache):
    _, codec, _, _ = get_tokenizer(None, small_corpus, 512, bpe_cache, progress=False)
    for text in ["def f(self):\n    return  self.value  # café\n", "unseen: Ω ∑ 🚀 \t\r\n\x00 ẞ", ""]:
        ids = codec.encode(text)
        assert codec.decode(ids) == text
        assert EOS_ID not in ids and PAD_ID not in ids
    # A literal end-of-text string in a document is text, never the EOS id.
    ids = codec.encode("a<|endoftext|>b")
    assert EOS_ID not in ids and codec.decode(ids) == "a<|endoftext|>b"


def test_bpe_loads_through_transformers_and_compressed_vocab(small_corpus, bpe_cache):
    from engram.tokenizer import CompressedVocab

    spec, codec, _, _ = get_tokenizer(None, small_corpus, 512, bpe_cache, progress=False)
    vocab = CompressedVocab.from_pretrained(spec)
    assert vocab.original_size == codec.vocab_size and 0 < len(vocab) <= codec.vocab_size
    # The same directory as a user-given tokenizer goes through transformers and agrees.
    spec2, hf_codec, eos, pad = get_tokenizer(spec)
    assert spec2 == spec and (eos, pad) == (0, 1)
    text = small_corpus.train[0].text
    assert hf_codec.encode(text) == codec.encode(text)
    assert hf_codec.decode(hf_codec.encode(text)) == text


# -- token cache ------------------------------------------------------------------------------------
def test_token_cache_contents_dtype_and_hit(small_dir, tmp_path, monkeypatch):
    data = prepare_data([str(small_dir)], vocab_size=512, cache_dir=tmp_path, progress=False)
    corpus = load_corpus([str(small_dir)])
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        expected = []
        for i, d in enumerate(docs):
            expected += ([EOS_ID] if i else []) + data.tokenizer.encode(d.text)
        got = getattr(data, split)
        assert got.tolist() == expected
        assert int((np.asarray(got) == EOS_ID).sum()) == len(docs) - 1
        assert data.meta[f"{split}_tokens"] == len(expected) and data.meta[f"{split}_documents"] == len(docs)
    assert data.meta["dtype"] == "uint16" and data.vocab_size == data.tokenizer.vocab_size

    def no_encoding(*a, **k):
        raise AssertionError("re-tokenised although the cache holds these tokens")

    monkeypatch.setattr(tokens_mod, "encode_documents", no_encoding)
    again = prepare_data([str(small_dir)], vocab_size=512, cache_dir=tmp_path, progress=False)
    assert np.array_equal(again.train, data.train) and again.meta == data.meta


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(131072) == np.uint32


def _token_files(cache):
    return sorted(p.name for p in (cache / "tokens").rglob("*") if p.is_file())


def test_token_cache_write_is_atomic(small_dir, tmp_path, monkeypatch):
    real_replace = os.replace

    def crash_on_npy(src, dst):  # the process "dies" just before the array would be published
        if str(dst).endswith(".npy"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(tokens_mod.os, "replace", crash_on_npy)
    with pytest.raises(OSError, match="simulated crash"):
        prepare_data([str(small_dir)], vocab_size=512, cache_dir=tmp_path, progress=False)
    assert _token_files(tmp_path) == []  # no final file and no temporary left behind
    monkeypatch.setattr(tokens_mod.os, "replace", real_replace)

    # Failing after the train split was written: no meta.json, so nothing loads as complete.
    real_encode, calls = tokens_mod.encode_documents, []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while encoding val")
        return real_encode(*a, **k)

    monkeypatch.setattr(tokens_mod, "encode_documents", fail_second)
    with pytest.raises(RuntimeError, match="simulated failure"):
        prepare_data([str(small_dir)], vocab_size=512, cache_dir=tmp_path, progress=False)
    assert _token_files(tmp_path) == ["train.npy"]
    monkeypatch.setattr(tokens_mod, "encode_documents", real_encode)
    data = prepare_data([str(small_dir)], vocab_size=512, cache_dir=tmp_path, progress=False)
    assert _token_files(tmp_path) == ["meta.json", "train.npy", "val.npy"]
    assert len(data.val) == data.meta["val_tokens"] > 0


# -- batches ----------------------------------------------------------------------------------------
def arange_tokens(n):
    return np.arange(n, dtype=np.uint32)  # every token is its own position: shifts are easy to check


def test_batch_sampler_pure_function_of_seed_and_step():
    tokens = arange_tokens(5000)
    s = BatchSampler(tokens, batch_size=4, seq_len=16, seed=3)
    batches = [s.next() for _ in range(5)]
    for i, (x_BT, y_BT) in enumerate(batches):
        assert x_BT.dtype == y_BT.dtype == torch.int64 and x_BT.shape == y_BT.shape == (4, 16)
        assert torch.equal(y_BT, x_BT + 1)  # y is x shifted by one along the stream
        assert int(x_BT.min()) >= 0 and int(y_BT.max()) < len(tokens)
        fresh = BatchSampler(tokens, batch_size=4, seq_len=16, seed=3).batch_at(i)
        assert torch.equal(fresh[0], x_BT) and torch.equal(fresh[1], y_BT)
    assert not torch.equal(BatchSampler(tokens, 4, 16, seed=4).batch_at(0)[0], batches[0][0])
    assert s.state_dict() == {"seed": 3, "step": 5}


def test_batch_sampler_resume_from_state_dict():
    tokens = arange_tokens(3000)
    a = BatchSampler(tokens, 8, 32, seed=11)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(3)]
    b = BatchSampler(tokens, 8, 32, seed=0)
    b.load_state_dict(state)
    for x_BT, y_BT in expected:
        x2, y2 = b.next()
        assert torch.equal(x2, x_BT) and torch.equal(y2, y_BT)
    with pytest.raises(KeyError, match="step"):
        b.load_state_dict({"seed": 1})


def test_batch_sampler_edges_and_errors():
    tokens = arange_tokens(17)  # exactly one window of seq_len + 1
    x_BT, y_BT = BatchSampler(tokens, 3, 16).next()
    assert (x_BT[:, 0] == 0).all() and (y_BT[:, -1] == 16).all()
    with pytest.raises(ValueError, match="fewer than one window"):
        BatchSampler(arange_tokens(16), 3, 16)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        BatchSampler(tokens, 3, 0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(tokens, 0, 4)
    # Works on a uint16 memmap straight from disk, as training does.
    s = BatchSampler(np.arange(100, dtype=np.uint16), 2, 8, seed=5)
    assert s.next()[0].dtype == torch.int64


def test_val_batches_fixed_non_overlapping_and_spread():
    tokens = arange_tokens(10_000)
    a = val_batches(tokens, batch_size=4, seq_len=32, max_tokens=32 * 10)
    b = val_batches(tokens, batch_size=4, seq_len=32, max_tokens=32 * 10)
    assert [x.shape[0] for x, _ in a] == [4, 4, 2]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya, xa + 1)
    starts = sorted(int(s) for x, _ in a for s in x[:, 0])
    assert all(s2 - s1 >= 33 for s1, s2 in zip(starts, starts[1:], strict=False))  # windows of 33 never overlap
    assert starts[0] == 0 and starts[-1] + 33 > 9_000  # spread over the whole split
    every = val_batches(tokens, 64, 32)  # no cap: as many windows as fit
    assert sum(x.shape[0] for x, _ in every) == 10_000 // 33
    with pytest.raises(ValueError, match="validation split has 10 tokens"):
        val_batches(arange_tokens(10), 2, 16)
    with pytest.raises(ValueError, match="max_tokens"):
        val_batches(tokens, 2, 16, max_tokens=0)


def test_meta_json_is_valid(small_dir, tmp_path):
    data = prepare_data([str(small_dir)], vocab_size=512, cache_dir=tmp_path, progress=False)
    (meta_path,) = (tmp_path / "tokens").rglob("meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta == data.meta
    assert {"train_tokens", "val_tokens", "dtype", "vocab_size", "train_documents", "val_documents"} <= set(meta)


def test_codec_over_a_slow_tokenizer_passes_the_right_flags():
    from engram.data import TokenCodec

    class SlowTokenizer:  # stands in for a non-fast transformers tokenizer (no backend_tokenizer)
        def __len__(self):
            return 300

        def encode(self, text, add_special_tokens=True, split_special_tokens=False):
            assert add_special_tokens is False and split_special_tokens is True
            return list(text.encode())

        def decode(self, ids, skip_special_tokens=True):
            assert skip_special_tokens is False
            return bytes(ids).decode()

    codec = TokenCodec(SlowTokenizer(), name="slow", eos_id=299, pad_id=299)
    assert codec.vocab_size == 300 and codec.encode_batch(["ab", "c"]) == [[97, 98], [99]]
    assert codec.decode(codec.encode("héllo")) == "héllo"
