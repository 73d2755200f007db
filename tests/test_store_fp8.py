"""fp8 stores: packed e4m3 rows + E8M0 scales on disk, dequantised on lookup to exactly the in-memory rows."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM
from engram.serve import export_tables, open_memory, read_manifest
from engram.serve.verify import verify_store_dir
from engram.store import CachedStore, DiskStore, RamStore, StoreChecksumError, StoreFormatError
from engram.store.format import FP8, read_header, write_store
from engram.store.fp8rows import Fp8Rows, dequantize_packed, open_rows, pack_fp8_rows
from engram.v41 import dequantize_fp8_rows, quantize_fp8_rows


def _table(R=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(R, d, generator=g) * torch.logspace(-3, 2, R).unsqueeze(1)  # scales spread over 2**-10..2**7
    t[5] = 0.0  # an all-zero row: the smallest scale
    return t


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    t = _table()
    q, s = quantize_fp8_rows(t)
    path = write_store(tmp_path_factory.mktemp("fp8") / "t.engram", (q, s), meta={"layer": 3})
    return path, q, s


def test_an_fp8_store_packs_values_and_scales_in_one_row_under_format_3(fp8_file, tmp_path):
    path, q, s = fp8_file
    h = read_header(path)
    assert (h.version, h.dtype, h.dim, h.row_bytes) == (3, FP8, 64, 64 + 2)
    assert path.stat().st_size == h.data_offset + 300 * 66
    with DiskStore(path, io="mmap") as disk:  # the disk tier serves packed rows, values then scales
        assert (disk.dtype, disk.dim) == (torch.uint8, 66)
        raw = disk.gather(torch.arange(300))
        assert torch.equal(raw, pack_fp8_rows(q, s))
        assert torch.equal(raw[:, 64:], s.view(torch.uint8))
    float_path = write_store(tmp_path / "f.engram", torch.randn(10, 64))  # float stores keep version 2
    assert read_header(float_path).version == 2


@pytest.mark.parametrize("io", ["mmap", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gather_equals_the_dequantised_in_memory_rows_bit_for_bit(fp8_file, io, dtype):
    path, q, s = fp8_file
    want = dequantize_fp8_rows(q, s, dtype)
    ids = torch.randint(0, 300, (700,), generator=torch.Generator().manual_seed(1))
    try:
        store = open_rows(path, dtype, io=io)
    except ValueError as e:  # io='direct' where O_DIRECT / io_uring is unavailable
        pytest.skip(str(e))
    with store:
        assert isinstance(store, Fp8Rows) and (store.dim, store.dtype, store.row_bytes) == (64, dtype, 66)
        assert torch.equal(_bits(store.gather(ids)), _bits(want[ids]))
        out = torch.empty(700, 64, dtype=dtype)
        assert store.gather_start(ids, out).result() is out and torch.equal(_bits(out), _bits(want[ids]))
        assert store.stats()["disk"]["bytes_read"] == 2 * 66 * torch.unique(ids).numel()
        # a cache holds packed rows (budget counted in stored bytes), dequantised on the way out
        for policy in ("lru", "lfu", "static"):
            prof = np.bincount(ids.numpy(), minlength=300) if policy == "static" else None
            cached = Fp8Rows(CachedStore(store.packed, 50 * 66, policy, profile=prof), 64, dtype, own=False)
            assert cached.packed.capacity == 50
            for chunk in ids.split(64):
                assert torch.equal(_bits(cached.gather(chunk)), _bits(want[chunk]))
        ram = Fp8Rows(RamStore(store.packed.gather(torch.arange(300))), 64, dtype)  # fp8 in RAM
        assert torch.equal(_bits(ram.gather(ids)), _bits(want[ids]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([32, 96]), st.integers(-20, 20))
def test_packed_dequantisation_is_the_v41_one(seed, d, log_scale):
    t = torch.randn(17, d, generator=torch.Generator().manual_seed(seed)) * 2.0 ** log_scale
    q, s = quantize_fp8_rows(t)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(_bits(dequantize_packed(pack_fp8_rows(q, s), d, dtype)),
                           _bits(dequantize_fp8_rows(q, s, dtype)))


def test_a_flipped_scale_byte_fails_the_row_checksum(fp8_file, tmp_path):
    path, q, s = fp8_file
    bad = tmp_path / "bad.engram"
    bad.write_bytes(path.read_bytes())
    h = read_header(bad)
    with open(bad, "r+b") as f:  # one scale byte of row 7: the values are intact, the row is not
        f.seek(h.data_offset + 7 * 66 + 65)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    with open_rows(bad, io="mmap") as store:
        assert torch.equal(store.gather(torch.tensor([6, 8])), dequantize_fp8_rows(q, s)[[6, 8]])
        with pytest.raises(StoreChecksumError, match="row 7"):
            store.gather(torch.tensor([6, 7]))


def test_the_fp8_writer_never_casts_and_needs_whole_scale_blocks(tmp_path):
    q, s = quantize_fp8_rows(torch.randn(4, 64))
    with pytest.raises(ValueError, match="quantise first"):
        write_store(tmp_path / "a", [torch.randn(4, 64)], num_rows=4, dim=64, dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="multiple of 32"):
        write_store(tmp_path / "b", [pack_fp8_rows(q, s)[:, :40]], num_rows=4, dim=40, dtype=FP8)
    with pytest.raises(ValueError, match=r"scales \[n, 2\]"):
        write_store(tmp_path / "c", [(q, s[:, :1])], num_rows=4, dim=64, dtype=FP8)
    with pytest.raises(ValueError, match="need dim="):
        write_store(tmp_path / "d", pack_fp8_rows(q, s), dtype=FP8)
    write_store(tmp_path / "e", [pack_fp8_rows(q, s)[:1], (q[1:], s[1:].view(torch.uint8))], num_rows=4, dim=64,
                dtype=FP8)
    with open_rows(tmp_path / "e", io="mmap") as store:
        assert torch.equal(store.gather(torch.arange(4)), dequantize_fp8_rows(q, s))
    assert not list(tmp_path.glob("*.tmp-*"))


def test_a_float_store_version_cannot_hold_fp8_rows(fp8_file, tmp_path):
    """The version says what a reader must understand: an fp8 header under version 2 is refused."""
    import struct

    from engram.store.checksum import crc32c

    path, _, _ = fp8_file
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 2)
    struct.pack_into("<I", data, 20, crc32c(bytes(data[24:24 + struct.unpack_from("<I", data, 12)[0]]),
                                            crc32c(bytes(data[8:20]))))
    (tmp_path / "v2.engram").write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match="must be format version 3"):
        read_header(tmp_path / "v2.engram")


# ------------------------------------------------------------------------------ export and serving

def _model(table_dtype="float32"):
    from engram.tokenizer import CompressedVocab

    eng = EngramConfig(engram_vocab_size=[53, 59], n_embed_per_ngram=64, n_head_per_ngram=2, layer_ids=[0, 2],
                       pad_id=0, kernel_size=3, table_dtype=table_dtype)
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=3, n_heads=4, mlp_hidden=48, max_seq_len=40, engram=eng)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedVocab(np.concatenate([np.arange(30), np.arange(18)]))).eval()
    with torch.no_grad():
        for blk in model.blocks:
            if blk.engram is not None:  # rows of many magnitudes, so the scales differ per block
                w = blk.engram.table.weight
                w.mul_(torch.logspace(-2, 2, w.shape[0]).unsqueeze(1).to(w.dtype))
    return model


def _dequantised_copy(model):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for blk in m.blocks:
            if blk.engram is not None:
                w = blk.engram.table.weight
                w.copy_(dequantize_fp8_rows(*quantize_fp8_rows(w), w.dtype))
    return m


@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
def test_served_eval_from_an_fp8_store_equals_the_dequantised_model(tmp_path, table_dtype):
    model = _model(table_dtype)
    model_dir = model.save_pretrained(tmp_path / "model")
    store = export_tables(model_dir, tmp_path / "fp8", dtype="fp8")  # streamed from the model directory
    again = export_tables(model, tmp_path / "fp8b", dtype="fp8")  # from the tables in memory: the same rows
    m = read_manifest(store)
    assert m["dtype"] == "float8_e4m3fn" and m["dim"] == 32
    assert m["weights"]["tables"] == read_manifest(again)["weights"]["tables"]
    assert m["weights"]["source_tables"] == read_manifest(export_tables(model, tmp_path / "plain"))["weights"]["tables"]
    for lay in (0, 2):
        assert read_header(store / f"layer_{lay}.engram").row_bytes == 33
    check = verify_store_dir(store, progress=False)
    assert check.ok and check.layers[0].bytes == model.blocks[0].engram.num_rows * 33
    ref = _dequantised_copy(model)
    batches = [(torch.randint(0, 48, (3, 12), generator=torch.Generator().manual_seed(s)),) * 2 for s in range(3)]
    with torch.no_grad():
        want_logits = ref(batches[0][0]).logits
    want = _eval(ref, batches)
    for kw in ({"memory": "disk", "store_dir": store}, {"memory": "disk", "store_dir": store, "cache_bytes": 2000},
               {"memory": "disk", "store_dir": store, "cache_bytes": 2000, "policy": "lfu"}):
        with open_memory(model_dir, **kw) as lm:
            assert lm.evaluate(batches) == want
            assert torch.equal(lm(batches[0][0]).logits, want_logits)
            tiers = lm.tier_stats()
            assert tiers["disk"]["bytes_read"] == 33 * tiers["disk"]["unique"] > 0
    # a model built without its tables: identified through its weights file's tables
    with open_memory(model_dir, "disk", store, model=EngramLM.from_pretrained(model_dir, tables=False)) as lm:
        assert lm.evaluate(batches) == want
    with pytest.raises(ValueError, match="export dtype"):
        export_tables(model, tmp_path / "x", dtype="int4")


def _eval(model, batches):
    total = n = 0
    with torch.no_grad():
        for x, y in batches:
            k = int((y != -100).sum())
            total += float(model(x, y).loss) * k
            n += k
    return total / n


def test_an_fp8_store_of_other_weights_is_refused(tmp_path):
    model = _model()
    model_dir = model.save_pretrained(tmp_path / "model")
    store = export_tables(model, tmp_path / "fp8", dtype="fp8")
    other = _model()
    with torch.no_grad():
        other.blocks[0].engram.table.weight[3] += 1
    other_dir = other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not this model's"):
        open_memory(other_dir, "disk", store)
    m = json.loads((store / "manifest.json").read_text())
    assert set(m["weights"]) == {"tables", "backbone", "source_tables"}
    with open_memory(model_dir, "disk", store):
        pass


def test_cli_export_memory_dtype_fp8_and_verify(tmp_path, capsys):
    from engram.cli import main

    model_dir = _model().save_pretrained(tmp_path / "model")
    assert main(["export-memory", "--model", str(model_dir), "--out", str(tmp_path / "s"), "--dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "float8_e4m3fn" in out and "layer 0:" in out
    assert main(["verify", str(tmp_path / "s"), "--no-progress"]) == 0
    assert ": OK, 2 layers" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export-memory", "--model", str(model_dir), "--out", str(tmp_path / "t"), "--dtype", "fp4"])
