"""Sharded-tables model directories: tables written in row shards by any number of writers, read back by
any row ranges (other readers, ranges across shard files, empty ones) bit for bit, loaded, exported and
served exactly like the single-file directory of the same weights; damage and bad tilings are refused."""

# Shapes: R rows of one layer's table, d row width.

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.model import EngramLM, checksums, generate
from engram.model import sharded_tables as sht
from engram.model.persistence import WEIGHTS_FILE, engram_table_key

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (0, 2)


def _model(tiny, table_dtype="float32", seed=0):
    """Tables of 173 and 211 rows: neither 2, 3 nor 4 writers or readers divide them."""
    cfg = tiny.cfg(table_dtype)
    eng = replace(cfg.engram, max_ngram_size=4, n_head_per_ngram=1, n_embed_per_ngram=8,
                  engram_vocab_size=[53, 59, 61])
    return tiny.model(table_dtype, seed=seed, engram=eng)


def _table(model, layer):
    return model.blocks[layer].engram.table.weight.detach()


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def saved(request, tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("sharded")
    model = _model(tiny, request.param)
    dirs = {"one": model.save_pretrained(root / "one")}
    for w in (2, 3):
        dirs[w] = sht.save_sharded(model, root / f"s{w}", w)
    return model, dirs


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x5A
    path.write_bytes(bytes(data))


def _data_offset(path, key):
    """Byte offset of ``key``'s first byte in a safetensors file."""
    head = path.read_bytes()
    n = int.from_bytes(head[:8], "little")
    return 8 + n + json.loads(head[8:8 + n])[key]["data_offsets"][0]


def test_split_rows_is_the_distributed_sharding_rule():
    from engram.distributed.sharding import row_bounds

    for R in (0, 1, 2, 5, 173, 211):
        for w in range(1, 9):
            assert sht.split_rows(R, w) == row_bounds(R, w)


def test_layout_shards_tile_each_table_unevenly_and_every_file_is_checksummed(saved):
    model, dirs = saved
    for w in (2, 3):
        d = dirs[w]
        shards = sht.describe(d)
        assert sorted(shards) == list(LAYERS)
        for lay in LAYERS:
            R = _table(model, lay).shape[0]
            bounds = sht.split_rows(R, w)
            assert shards[lay] == [[bounds[p], bounds[p + 1]] for p in range(w)]
            assert len({b - a for a, b in shards[lay]}) == 2  # uneven: the sizes do not divide
            assert sht.table_shape(d, lay) == tuple(_table(model, lay).shape)
        from safetensors import safe_open

        with safe_open(str(d / WEIGHTS_FILE), "pt") as f:
            assert not any(".engram.table." in k for k in f.keys())
        listed = checksums.read_manifest(d)["files"]
        on_disk = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
        assert sorted(listed) == [p for p in on_disk if p != checksums.MANIFEST_FILE]
        with safe_open(str(d / sht.shard_file(2, bounds[1], bounds[2])), "pt") as f:
            assert f.metadata() == {"format": "engram-table-shard", "layer": "2", "start": str(bounds[1]),
                                    "end": str(bounds[2]), "total_rows": str(R)}


def _ranges(R):
    """Every reader's range for 1..4 readers, ranges across shard boundaries, and empty ones."""
    out = [(a, b) for m in range(1, 5) for a, b in zip(sht.split_rows(R, m), sht.split_rows(R, m)[1:], strict=False)]
    return out + [(0, 0), (R, R), (R // 2, R // 2), (R // 2 - 3, R // 2 + 4), (1, R - 1), (R - 1, R), (0, 1)]


def test_any_reader_ranges_equal_the_table_bit_for_bit(saved):
    model, dirs = saved
    for d in dirs.values():
        for lay in LAYERS:
            full = _table(model, lay)
            for a, b in _ranges(full.shape[0]):
                got = sht.load_table_rows(d, lay, a, b)
                assert got.dtype == full.dtype and torch.equal(got.view(torch.uint8), full[a:b].view(torch.uint8))
            pieces = list(sht.iter_table_rows(d, lay))
            assert torch.equal(torch.cat(pieces), full)
    with pytest.raises(ValueError, match=r"rows \[5, 999\) are not a range"):
        sht.load_table_rows(dirs[3], 0, 5, 999)


def test_from_pretrained_sharded_equals_single_file(saved, tiny):
    model, dirs = saved
    x = tiny.ids()
    want = model(x).logits
    for w in (2, 3):
        loaded = EngramLM.from_pretrained(dirs[w])
        assert torch.equal(loaded(x).logits, want)
        bare = EngramLM.from_pretrained(dirs[w], tables=False)
        assert not bare.has_tables
        assert bare.state_dict().keys() <= model.state_dict().keys()


def test_a_sharded_save_replaces_any_earlier_save_of_the_directory(saved, tmp_path, tiny):
    model, dirs = saved
    d = _copy(dirs[3], tmp_path)
    sht.save_sharded(model, d, 2)  # other cuts than the 3-way save's: those shards are gone
    assert sht.describe(d) == sht.describe(dirs[2])
    model.save_pretrained(d)  # back to one file: no shards left to confuse a reader
    assert not (d / sht.SHARD_DIR).exists() and not sht.is_sharded(d)
    assert torch.equal(EngramLM.from_pretrained(d)(tiny.ids()).logits, model(tiny.ids()).logits)


def test_seal_refuses_a_gap_an_overlap_or_a_stray_shard(saved, tmp_path):
    model, dirs = saved
    d = _copy(dirs[3], tmp_path)
    a, b = sht.describe(d)[0][1]
    moved = tmp_path / "aside"
    (d / sht.shard_file(0, a, b)).rename(moved)
    with pytest.raises(ValueError, match=rf"layer 0: rows \[{a}, {b}\) of 173 are in no shard"):
        sht.seal(d)
    assert not (d / checksums.MANIFEST_FILE).exists()
    moved.rename(d / sht.shard_file(0, a, b))
    sht.save_table_shard(d, 0, 0, 87, 173, _table(model, 0)[:87])  # a 2-way cut beside the 3-way one
    with pytest.raises(ValueError, match=r"layer 0: shards .* overlap \(rows \[0, 58\) are in both\)"):
        sht.seal(d)
    (d / sht.shard_file(0, 0, 87)).unlink()
    R = _table(model, 2).shape[0]
    last = sht.describe(d)[2][-1]
    (d / sht.shard_file(2, *last)).unlink()
    with pytest.raises(ValueError, match=rf"layer 2: rows \[{last[0]}, {R}\) of {R} are in no shard"):
        sht.seal(d)
    sht.save_table_shard(d, 2, last[0], last[1], R, _table(model, 2)[last[0]:])
    sht.save_table_shard(d, 1, 0, 3, 3, torch.zeros(3, 8, dtype=_table(model, 0).dtype))
    with pytest.raises(ValueError, match=r"shards of layers \[1\], which have no Engram table"):
        sht.seal(d)
    (d / sht.shard_file(1, 0, 3)).unlink()
    sht.save_table_shard(d, 2, last[0], last[1], R + 1, _table(model, 2)[last[0]:])  # claims another total
    with pytest.raises(ValueError, match="disagree on the table"):
        sht.seal(d)
    sht.save_table_shard(d, 2, last[0], last[1], R, _table(model, 2)[last[0]:])
    sht.seal(d)
    assert torch.equal(EngramLM.from_pretrained(d).blocks[2].engram.table.weight, _table(model, 2))
    with pytest.raises(ValueError, match=r"rows \[0, 5\) need a \[5, d\] tensor"):
        sht.save_table_shard(d, 0, 0, 5, 173, torch.zeros(4, 8))
    assert sht.save_table_shard(d, 0, 173, 173, 173, torch.zeros(0, 8)) is None  # a rank owning no rows


def test_a_missing_added_or_damaged_shard_is_refused_on_load(saved, tmp_path):
    model, dirs = saved
    d = _copy(dirs[2], tmp_path)
    first, second = (sht.shard_file(0, a, b) for a, b in sht.describe(d)[0])
    key = engram_table_key(0)
    _flip(d / second, _data_offset(d / second, key) + 5)
    with pytest.raises(ValueError, match=f"{second} is corrupted: the sha256 of tensor '{key}' does not match"):
        EngramLM.from_pretrained(d)
    bare = EngramLM.from_pretrained(d, tables=False)  # leaves the tables unread, so unchecked here
    assert not bare.has_tables
    with pytest.raises(ValueError, match=rf"{second} is corrupted: the sha256 of rows \[87, 173\) of tensor"):
        sht.load_table_rows(d, 0, 80, 90)
    assert torch.equal(sht.load_table_rows(d, 0, 0, 87), _table(model, 0)[:87])  # the intact shard reads
    _flip(d / second, _data_offset(d / second, key) + 5)  # undone
    (d / first).unlink()
    for load in (lambda: EngramLM.from_pretrained(d), lambda: EngramLM.from_pretrained(d, tables=False)):
        with pytest.raises(ValueError, match=f"{first} is missing"):
            load()
    with pytest.raises(ValueError, match=r"layer 0: rows \[0, 87\) of 173 are in no shard"):
        sht.load_table_rows(d, 0, 90, 100)
    shutil.copy(dirs[2] / first, d / first)
    shutil.copy(dirs[3] / sht.shard_file(2, 0, 71), d / sht.shard_file(2, 0, 71))  # put there after the save
    with pytest.raises(ValueError, match="not covered by"):
        EngramLM.from_pretrained(d, tables=False)


def test_blocks_let_a_reader_check_only_what_it_reads(tiny, tmp_path, monkeypatch):
    """With checksum blocks of 3 rows, a range reads (and checks) only the blocks it touches: a damaged row
    elsewhere goes unseen by it, and every range touching that row's block is refused."""
    monkeypatch.setattr(checksums, "_BLOCK_BYTES", 100)  # rows of 32 bytes: 3 rows a block
    model = _model(tiny)
    d = sht.save_sharded(model, tmp_path / "m", 2)
    key, shard = engram_table_key(2), sht.shard_file(2, 106, 211)
    piece = next(p for p in checksums.read_manifest(d)["files"][shard]["pieces"] if p["name"] == key)
    assert piece["block_rows"] == 3 and len(piece["blocks"]) == 35
    _flip(d / shard, _data_offset(d / shard, key) + 32 * 10 + 7)  # row 106 + 10, in the block of rows [115, 118)
    full = _table(model, 2)
    for a, b in [(0, 106), (100, 115), (118, 211), (106, 115), (118, 119)]:
        assert torch.equal(sht.load_table_rows(d, 2, a, b), full[a:b])
    for a, b in [(100, 116), (116, 117), (115, 116), (117, 150), (0, 211)]:
        with pytest.raises(ValueError, match=rf"sha256 of rows \[115, 118\) of tensor '{key}' does not match"):
            sht.load_table_rows(d, 2, a, b)


def test_export_of_a_sharded_directory_is_the_single_file_export(saved, tmp_path, monkeypatch):
    """Same rows, same row checksums, same manifest digests: the layer files are byte-identical but for
    the random export id (and the header checksum that covers it); streamed in bounded pieces."""
    import engram.serve.export as export
    from engram.serve import export_tables, read_manifest

    model, dirs = saved
    row_bytes = 8 * _table(model, 0).element_size()
    monkeypatch.setattr(export, "_PIECE_BYTES", 10 * row_bytes)
    seen = []
    real = export.iter_table_rows
    monkeypatch.setattr(export, "iter_table_rows", lambda *a, **kw: (seen.append(p.shape[0]) or p
                                                                      for p in real(*a, **kw)))
    stores = {k: export_tables(d, tmp_path / f"store-{k}") for k, d in dirs.items()}
    assert seen and max(seen) <= 10 and sum(seen) == 3 * (173 + 211)  # never a whole table at once
    ref = read_manifest(stores["one"])
    for k in (2, 3):
        m = read_manifest(stores[k])
        assert {**m, "export_id": ""} == {**ref, "export_id": ""}
        for lay in LAYERS:
            name = export.layer_file(lay)
            a = (stores[k] / name).read_bytes().replace(m["export_id"].encode(), ref["export_id"].encode())
            b = (stores["one"] / name).read_bytes()
            assert len(a) == len(b) and a[:20] + a[24:] == b[:20] + b[24:]


def test_serving_a_sharded_directory_equals_the_model(saved, tmp_path, tiny):
    from engram.serve import export_tables, open_memory

    model, dirs = saved
    store = export_tables(dirs[3], tmp_path / "store")
    prompt = tiny.ids(2, 5, seed=3)
    want_logits, want = model(tiny.ids()).logits, generate(model, prompt, 8, temperature=0)
    for memory, kw in (("disk", {"store_dir": store}), ("ram", {})):
        lm = open_memory(dirs[3], memory, **kw)
        try:
            assert torch.equal(lm(tiny.ids()).logits, want_logits)
            assert torch.equal(lm.generate(prompt, 8, temperature=0), want)
        finally:
            lm.close()
    other = export_tables(dirs["one"], tmp_path / "other")  # the identity check reads the shards: same weights
    open_memory(dirs[2], "disk", store_dir=other).close()
    retrained = sht.save_sharded(_model(tiny, str(model.cfg.engram.table_dtype), seed=5), tmp_path / "m5", 2)
    with pytest.raises(ValueError, match=r"was exported from weights \w+ \(layer 0 table\)"):
        open_memory(retrained, "disk", store_dir=other)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(R=st.integers(1, 40), writers=st.integers(1, 5), readers=st.integers(1, 5), block=st.sampled_from([0, 40, 70]),
       piece_rows=st.sampled_from([None, 1, 3]), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_any_writers_any_readers(R, writers, readers, block, piece_rows, bf16, seed, monkeypatch):
    """Written by any number of writers (some owning nothing), read by any number of readers, with or
    without checksum blocks, in pieces of any size (smaller than a block: checked as they stream): every
    reader gets exactly its rows, together they get the table, and a damaged row is refused to every
    range that reads it."""
    monkeypatch.setattr(checksums, "_BLOCK_BYTES", block or checksums._BLOCK_BYTES)
    table = torch.randn(R, 4, generator=torch.Generator().manual_seed(seed))
    table = table.to(torch.bfloat16) if bf16 else table
    kw = {} if piece_rows is None else {"piece_bytes": piece_rows * 4 * table.element_size()}

    def read(d, a, b):
        pieces = list(sht.iter_table_rows(d, 7, a, b, **kw))
        assert all(p.shape[0] <= (piece_rows or R) for p in pieces)
        return torch.cat(pieces) if pieces else table[:0]

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        wb = sht.split_rows(R, writers)
        for p in range(writers):
            sht.save_table_shard(d, 7, wb[p], wb[p + 1], R, table[wb[p]:wb[p + 1]])
        checksums.seal(d)
        assert sht.table_shape(d, 7) == (R, 4)
        rb = sht.split_rows(R, readers)
        parts = [sht.load_table_rows(d, 7, rb[m], rb[m + 1]) for m in range(readers)]
        assert all(p.shape[0] == rb[m + 1] - rb[m] for m, p in enumerate(parts))
        assert torch.equal(torch.cat(parts).view(torch.uint8), table.view(torch.uint8))
        rng = np.random.default_rng(seed)
        a, b = sorted(rng.integers(0, R + 1, 2).tolist())
        assert torch.equal(read(d, a, b).view(torch.uint8), table[a:b].view(torch.uint8))
        row = int(rng.integers(0, R))  # damage one row: every range that reads it is refused
        w = next(p for p in range(writers) if wb[p] <= row < wb[p + 1])
        f = d / sht.shard_file(7, wb[w], wb[w + 1])
        _flip(f, _data_offset(f, engram_table_key(7)) + (row - wb[w]) * 4 * table.element_size())
        with pytest.raises(ValueError, match="is corrupted"):
            read(d, row, row + 1)
        with pytest.raises(ValueError, match="is corrupted"):
            read(d, 0, R)


def test_cli_exports_and_serves_a_sharded_directory(tmp_path, capsys, monkeypatch):
    """`engram export-memory` on a directory written in 3 shards, then `engram generate --memory disk`
    on it: the same text as the single-file directory of the same weights, tables in RAM."""
    from engram.cli import main
    from engram.config import EngramConfig, ModelConfig
    from engram.data.bpe import train_bpe
    from engram.tokenizer.compression import CompressedVocab

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    tok = train_bpe([" ".join(f"the cat {w} sat on the mat {i % 13}." for i, w in enumerate("abc" * 40))] * 4,
                    vocab_size=300)
    V = tok.get_vocab_size()
    files = {"tokenizer/tokenizer.json": tok.to_str().encode(),
             "tokenizer/tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}).encode()}
    eng = EngramConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1],
                       pad_id=1)
    torch.manual_seed(0)
    model = EngramLM(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48, max_seq_len=64,
                                 engram=eng), CompressedVocab(np.arange(V) % 200))
    one = str(model.save_pretrained(tmp_path / "one", extra_files=files))
    sharded = str(sht.save_sharded(model, tmp_path / "sharded", 3, extra_files=files))
    gen = ["generate", "--prompt", "the cat sat", "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*gen, "--model", one]) == 0
    want = capsys.readouterr().out
    assert want.strip()
    assert main(["export-memory", "--model", sharded, "--out", str(tmp_path / "store")]) == 0
    assert "layer 1:" in capsys.readouterr().out
    assert main([*gen, "--model", sharded, "--memory", "disk", "--store", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out == want
    assert main([*gen, "--model", sharded]) == 0  # the tables assembled from their shards
    assert capsys.readouterr().out == want
