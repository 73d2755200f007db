"""Nothing wrong is ever served: flipped row bytes fail every read path; stores belong to their model."""

# Shapes: N requested row ids, R rows in the table, d row width.

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.model import EngramLM
from engram.serve import export_tables, open_memory, open_store_dir, read_manifest
from engram.serve.export import MANIFEST, layer_file
from engram.serve.verify import verify_store_dir
from engram.store import checksum, native_io
from engram.store.cache import CachedStore
from engram.store.disk import DiskStore
from engram.store.format import StoreChecksumError, read_header, write_store
from test_offload_errors import cli_model  # noqa: F401  (the module fixture: a saved model, tokenizer, corpus)

pytestmark = pytest.mark.usefixtures("one_thread")

IOS = ["mmap"] + (["direct"] if native_io.available() else [])
R, D = 400, 24


def flip_bytes(path, rng, n, rows=None):
    """XOR a random nonzero byte into ``n`` random offsets of the row data (or of ``rows``); returns the
    sorted distinct rows hit."""
    h = read_header(path)
    hit = set()
    with open(path, "r+b") as f:
        for _ in range(n):
            r = int(rng.integers(h.num_rows)) if rows is None else int(rng.choice(rows))
            off = h.data_offset + r * h.row_bytes + int(rng.integers(h.row_bytes))
            f.seek(off)
            b = f.read(1)[0]
            f.seek(off)
            f.write(bytes([b ^ int(rng.integers(1, 256))]))
            hit.add(r)
    return sorted(hit)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def flipped(request, tmp_path_factory):
    """(path, clean table, flipped rows): a store of layer 7 with 12 seeded byte flips in its row data."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(R, D, generator=g).to(request.param)
    path = write_store(tmp_path_factory.mktemp("flip") / "layer_7.engram", table, meta={"layer": 7})
    bad = flip_bytes(path, np.random.default_rng(12), 12)
    return path, table, bad


def _raises_naming(fn, path, rows):
    with pytest.raises(StoreChecksumError, match="checksum mismatch in layer 7") as e:
        fn()
    assert str(path) in str(e.value) and e.value.layer == 7 and e.value.path == path
    assert set(e.value.rows) <= set(rows) and e.value.rows and e.value.count == len(rows)
    for r in e.value.rows[:3]:
        assert f"{r}" in str(e.value)
    return e.value


@pytest.mark.parametrize("io", IOS)
def test_every_read_of_a_flipped_row_fails_and_clean_rows_equal_the_table(flipped, io):
    path, table, bad = flipped
    assert len(bad) >= 10  # a few flips may share a row
    clean = np.setdiff1d(np.arange(R), bad)
    with DiskStore(path, io=io) as s:
        assert s.io == io
        for r in bad:  # alone, among clean rows, twice, via gather and gather_start
            ids = torch.tensor([int(clean[0]), r, r, int(clean[-1])])
            _raises_naming(lambda ids=ids: s.gather(ids), path, [r])
            _raises_naming(lambda ids=ids: s.gather_start(ids).result(), path, [r])
        _raises_naming(lambda: s.gather(torch.arange(R)), path, bad)
        ids = torch.from_numpy(clean[::-1].copy())
        assert torch.equal(s.gather(ids), table[ids])
        assert torch.equal(s.gather_start(ids).result(), table[ids])
        assert s.scan() == (len(bad), pytest.approx(np.asarray(bad)))


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("policy", ["lru", "lfu", "static"])
def test_cache_tiers_never_admit_or_serve_a_flipped_row(flipped, io, policy):
    path, table, bad = flipped
    clean = np.setdiff1d(np.arange(R), bad)
    with DiskStore(path, io=io) as s:
        # a static cache loads its hot rows once, checked: a profile ranking a flipped row fails to load
        if policy == "static":
            with pytest.raises(StoreChecksumError, match=f"row {bad[0]}"):
                CachedStore(s, 50 * s.row_bytes, "static", profile=np.asarray([bad[0], *clean[:10]]))
        prof = np.asarray(clean[:40]) if policy == "static" else None
        cache = CachedStore(s, 50 * s.row_bytes, policy, profile=prof)
        rng = np.random.default_rng(3)
        for _ in range(6):
            ids = torch.from_numpy(rng.choice(clean, 60))
            assert torch.equal(cache.gather(ids), table[ids])
            assert torch.equal(cache.gather_start(ids).result(), table[ids])
            r = int(rng.choice(bad))
            mixed = torch.cat([ids[:5], torch.tensor([r])])
            _raises_naming(lambda m=mixed: cache.gather(m), path, [r])
            _raises_naming(lambda m=mixed: cache.gather_start(m).result(), path, [r])
            assert r not in cache.resident_rows()
        assert torch.equal(cache.gather(torch.from_numpy(clean)), table[torch.from_numpy(clean)])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, R - 1), min_size=1, max_size=60), st.sampled_from(IOS))
def test_a_read_fails_exactly_when_it_touches_a_flipped_row(flipped_once, ids, io):
    path, table, bad, stores = flipped_once
    s = stores[io]
    rows = torch.tensor(ids)
    hit = sorted(set(ids) & set(bad))
    if hit:
        with pytest.raises(StoreChecksumError) as e:
            s.gather(rows)
        assert e.value.count == len(hit) and set(e.value.rows) <= set(hit)
    else:
        assert torch.equal(s.gather(rows).view(torch.int32), table[rows].view(torch.int32))


@pytest.fixture(scope="module")
def flipped_once(tmp_path_factory):
    table = torch.randn(R, D, generator=torch.Generator().manual_seed(1))
    path = write_store(tmp_path_factory.mktemp("prop") / "layer_7.engram", table, meta={"layer": 7})
    bad = flip_bytes(path, np.random.default_rng(5), 25)
    stores = {io: DiskStore(path, io=io) for io in IOS}
    yield path, table, bad, stores
    for s in stores.values():
        s.close()


def test_python_fallback_gives_the_same_checksums(monkeypatch):
    rows = np.random.default_rng(0).integers(-2**15, 2**15, (37, 13), dtype=np.int16)
    native = checksum.row_crcs(rows)
    sums = native.copy()
    sums[[4, 30]] ^= 1
    pos = np.arange(36, -1, -1)
    want = checksum.mismatches(rows[::-1].copy(), sums, pos)
    monkeypatch.setattr(checksum._native, "load", lambda: None)
    assert np.array_equal(checksum.row_crcs(rows), native)
    assert checksum.mismatches(rows[::-1].copy(), sums, pos)[0] == want[0] == 2
    assert sorted(checksum.mismatches(rows[::-1].copy(), sums, pos)[1].tolist()) == sorted(want[1].tolist())


# ------------------------------------------------------------------------------------ store directories

def _bare(model):
    """``model`` without its tables (the backbone only), as a serving-only model directory holds it."""
    bare = EngramLM(model.cfg, model.vocab, tables=False).eval()
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if ".engram.table." not in k})
    return bare


@pytest.mark.parametrize("io", IOS)
def test_offloaded_serving_and_a_ram_tier_loaded_from_a_store_refuse_flipped_rows(tmp_path, tiny, io):
    model = tiny.model()
    store = export_tables(model, tmp_path / "store")
    x = tiny.ids(2, 12)
    rows = model.engram_rows(x)
    used = model.blocks[2].engram.flat_rows(rows[2]).reshape(-1).unique().numpy()
    flip_bytes(store / layer_file(2), np.random.default_rng(0), 1, rows=used[:1])
    model_dir = model.save_pretrained(tmp_path / "model")
    for prefetch in (True, False):
        with open_memory(model_dir, "disk", store, io=io, prefetch=prefetch) as lm:
            msg = rf"layer_2\.engram: checksum mismatch in layer 2, row {used[0]} \(1 of \d+ rows read\)"
            with pytest.raises(StoreChecksumError, match=msg):
                lm(x)
            clean = next(c for c in (tiny.ids(2, 6, seed=9 + k) for k in range(50))  # ids that miss the flip
                         if used[0] not in model.blocks[2].engram.flat_rows(model.engram_rows(c)[2]).reshape(-1))
            with torch.no_grad():
                assert torch.equal(lm(clean).logits, model(clean).logits)
    # A RAM tier loaded from the store (the weights file holds no tables) is checked once, as it loads.
    _bare(model).save_pretrained(tmp_path / "bare")
    with pytest.raises(StoreChecksumError, match=f"layer 2, row {used[0]} "):
        open_memory(tmp_path / "bare", "ram", store)


def test_engram_verify_finds_every_flip_and_every_damaged_part(tmp_path, tiny, capsys):
    from engram.cli import main

    model = tiny.model()
    store = export_tables(model, tmp_path / "store")
    assert verify_store_dir(store).ok
    assert main(["verify", str(store)]) == 0
    assert "OK, 2 layers" in capsys.readouterr().out
    rng = np.random.default_rng(7)
    bad = {lay: flip_bytes(store / layer_file(lay), rng, 6) for lay in (0, 2)}
    report = verify_store_dir(store)
    assert {lc.layer: lc.bad_rows for lc in report.layers} == bad
    assert main(["verify", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: store ") and err.count("\n") == 1
    for lay, rows in bad.items():
        assert f"layer {lay} (layer_{lay}.engram): {len(rows)} rows fail their checksum: " \
               f"{', '.join(map(str, rows))}" in err
    # a damaged header, a manifest digest that is not the file's, a missing file: each named
    export_tables(model, store)
    with open(store / layer_file(0), "r+b") as f:
        f.seek(30)
        f.write(b"#")
    m = read_manifest(store)
    m["weights"]["tables"]["2"] = "sha256:" + "0" * 64
    (store / MANIFEST).write_text(json.dumps(m))
    report = verify_store_dir(store)
    assert [lc.ok for lc in report.layers] == [False, False]
    assert "header checksum mismatch" in report.layers[0].problem
    assert "table digest" in report.layers[1].problem
    (store / layer_file(2)).unlink()
    assert "missing" in verify_store_dir(store).layers[1].problem


def test_a_store_of_other_weights_is_refused(tmp_path, tiny):
    """One training step later (or earlier) the tables differ: refused, whichever way the model is given."""
    model = tiny.model()
    store = export_tables(model, tmp_path / "store")
    stepped = tiny.model()
    with torch.no_grad():  # one sparse step: a few rows of one table move by a little
        stepped.blocks[2].engram.table.weight[[3, 40]] -= 1e-3 * torch.ones(2, stepped.blocks[2].engram.head_dim)
    with pytest.raises(ValueError, match=rf"store {store} was exported from weights \w+ \(layer 2 table\), the "
                                         r"model \(its tables in memory\) has \w+"):
        open_store_dir(store, stepped)
    stepped_dir = stepped.save_pretrained(tmp_path / "stepped")
    with pytest.raises(ValueError, match=r"layer 2 table.*stepped.model\.safetensors"):
        open_memory(stepped_dir, "disk", store)
    # The same weights pass, from memory, from the weights file, and (no tables anywhere) by the backbone.
    open_store_dir(store, model)
    open_memory(model.save_pretrained(tmp_path / "same"), "disk", store).close()
    _bare(model).save_pretrained(tmp_path / "bare")
    open_memory(tmp_path / "bare", "disk", store).close()
    moved = _bare(model)
    with torch.no_grad():
        next(p for n, p in moved.named_parameters() if "norm" in n).add_(1e-3)
    moved.save_pretrained(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"backbone \w+, the model \(.*moved.*\) has \w+ and no tables"):
        open_memory(tmp_path / "moved", "disk", store)
    # a manifest of the previous version (no weights identity) is refused with the fix
    m = read_manifest(store)
    m["version"] = 1
    del m["weights"]
    (store / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="manifest version 1.*export the store again"):
        open_store_dir(store, model)


@pytest.mark.parametrize("io", ["mmap", "auto"])
def test_cli_eval_of_a_corrupted_store_exits_nonzero_naming_the_rows(cli_model, capsys, monkeypatch, io):  # noqa: F811
    from engram.cli import main

    monkeypatch.setenv("ENGRAM_CACHE", str(cli_model / "cache"))
    model, store = str(cli_model / "model"), cli_model / f"store-{io}"
    assert main(["export-memory", "--model", model, "--out", str(store)]) == 0
    R = read_header(store / "layer_1.engram").num_rows
    rng = np.random.default_rng(11)
    bad = set(flip_bytes(store / "layer_1.engram", rng, 12))  # anywhere, then enough that the eval meets some
    bad |= set(flip_bytes(store / "layer_1.engram", rng, 60, rows=np.arange(0, R, 4)))
    capsys.readouterr()
    ev = ["eval", "--model", model, "--data", str(cli_model / "corpus"), "--batch-size", "2", "--seq-len", "16",
          "--eval-tokens", "128", "--memory", "disk", "--store", str(store), "--io", io]
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch in layer 1" in err and "layer_1.engram" in err and "val loss" not in err
    named = [int(t) for t in err.split(" row")[1].split("(")[0].replace("s ", "").replace("and", ",").split(",")
             if t.strip().isdigit()]
    assert named and set(named) <= bad
    assert main(["verify", str(store)]) == 2
    assert f"{len(bad)} rows fail their checksum" in capsys.readouterr().err
