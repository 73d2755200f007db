"""Offloaded inference: tables exported to a store directory, served from RAM / disk / cache, bit-identical outputs."""

# Shapes: B batch, T time, H hash heads, d row width, V vocabulary, R table rows.

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.config import EngramConfig
from engram.memory import LocalMemory, MemoryProvider
from engram.model import EngramLM
from engram.serve import access_profiles, export_tables, open_memory, open_store_dir, read_manifest
from engram.serve.export import MANIFEST, co_access_layouts, layer_file
from engram.store.base import DiskStore, RamStore, StoreFormatError
from engram.tokenizer import CompressedVocab

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def saved(request, tmp_path_factory, tiny):
    return tiny.Saved(tmp_path_factory.mktemp(f"offload-{request.param}"), request.param)


# ------------------------------------------------------------------------------------ model integration

def test_flat_rows_and_store_gather_equal_table_lookup(tiny):
    model = tiny.model()
    rows = model.engram_rows(tiny.ids())
    for blk in model.blocks:
        if blk.engram is None:
            continue
        flat = blk.engram.flat_rows(rows[blk.layer])
        got = RamStore(blk.engram.table.weight).gather(flat.reshape(-1)).view(*flat.shape, -1)
        assert torch.equal(got, blk.engram.table(rows[blk.layer]))
        with pytest.raises(ValueError, match="last dimension"):
            blk.engram.flat_rows(rows[blk.layer][..., :1])


def test_memory_provider_is_set_from_outside_and_asked_per_layer(tiny):
    """The model asks its provider for rows, layer by layer, after telling it every layer's ids."""
    model = tiny.model()
    x = tiny.ids()
    tables = {blk.layer: blk.engram.table for blk in model.blocks if blk.engram is not None}

    class Recording(MemoryProvider):
        def __init__(self):
            self.calls = []

        def prepare(self, rows):
            self.calls.append(("prepare", sorted(rows)))
            self.prepared = rows

        def rows(self, layer, rows_BTH):
            assert rows_BTH is self.prepared[layer]  # the very ids it was told about
            self.calls.append(("rows", layer))
            return tables[layer].weight[rows_BTH + tables[layer].offsets]

    rec = Recording()
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(model(x, memory=rec).logits, ref)
        assert rec.calls == [("prepare", sorted(tables)), *(("rows", lay) for lay in sorted(tables))]
        assert isinstance(model.memory, LocalMemory)  # a per-call provider leaves the model's alone
        bare = EngramLM(model.cfg, model.vocab, tables=False).eval()
        bare.load_state_dict(model.state_dict(), strict=False)
        assert bare.memory is None
        with pytest.raises(ValueError, match="no memory provider"):
            bare(x)
        assert torch.equal(bare.set_memory(rec)(x).logits, ref)
        with pytest.raises(TypeError, match="prepare"):
            bare.set_memory(object())
        with pytest.raises(ValueError, match="must hold the Engram layers"):
            model(x, engram_rows={0: model.engram_rows(x)[0]})
    assert "_memory" not in dict(model.named_children()) and not any("memory" in k for k in model.state_dict())


def test_engram_rows_with_state_reads_without_advancing(tiny):
    model = tiny.model()
    x = tiny.ids(2, 9)
    full = model.engram_rows(x)
    state = model.new_decode_state(2)
    with torch.no_grad():
        model(x[:, :4], cache=state)
        window = state.window.copy()
        chunk = model.engram_rows(x[:, 4:7], state=state)
        one = model.engram_rows(x[:, 4:5], state=state)
    assert np.array_equal(state.window, window) and state.length == 4
    for lay in full:
        assert torch.equal(chunk[lay], full[lay][:, 4:7])
        assert torch.equal(one[lay], full[lay][:, 4:5])


def test_from_pretrained_without_tables_never_reads_them(tmp_path, monkeypatch, tiny):
    import safetensors

    model = tiny.model()
    model.save_pretrained(tmp_path)
    read: list[str] = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, k):
            read.append(k)
            return self.inner.get_tensor(k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    bare = EngramLM.from_pretrained(tmp_path, tables=False)
    monkeypatch.undo()
    assert read and not any(".engram.table." in k for k in read)
    assert not bare.has_tables and bare.engram_parameters() == []
    assert all(blk.engram.table is None for blk in bare.blocks if blk.engram is not None)
    full_sd = model.state_dict()
    for k, v in bare.state_dict().items():
        assert torch.equal(v, full_sd[k]), k
    with pytest.raises(ValueError, match="without its Engram tables"):
        bare(tiny.ids())
    # Saved without tables: loads only with tables=False.
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="holds no Engram tables"):
        EngramLM.from_pretrained(tmp_path / "bare")
    assert EngramLM.from_pretrained(tmp_path / "bare", tables=False).cfg == model.cfg
    # A table that does not fit the config is still caught without being read.
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["engram"]["engram_vocab_size"] = [61, 59]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json is truncated or altered"):  # the checksums see it first
        EngramLM.from_pretrained(tmp_path, tables=False)
    with pytest.raises(ValueError, match="does not match"):
        EngramLM.from_pretrained(tmp_path, tables=False, verify=False)


# ------------------------------------------------------------------------------------ export

def test_export_writes_layers_and_manifest_matching_the_model(saved):
    m = read_manifest(saved.store_dir)
    assert sorted(m["layers"], key=int) == ["0", "2"] and m["dtype"] == saved.model.cfg.engram.table_dtype
    stores = open_store_dir(saved.store_dir, saved.model, verify="full")
    try:
        for lay, s in stores.items():
            w = saved.model.blocks[lay].engram.table.weight.detach()
            assert isinstance(s, DiskStore) and s.num_rows == w.shape[0]
            assert torch.equal(s.gather(torch.arange(s.num_rows)).view(torch.uint8), w.view(torch.uint8))
    finally:
        for s in stores.values():
            s.close()
    # Exporting the in-memory model gives the same rows (the headers differ only by the export id).
    again = export_tables(saved.model, saved.model_dir.parent / "store2")
    assert read_manifest(again)["weights"] == m["weights"]  # the same weights, whichever way exported
    for lay in (0, 2):
        with DiskStore.open(saved.store_dir / layer_file(lay)) as a, DiskStore.open(again / layer_file(lay)) as b:
            assert torch.equal(a.gather(torch.arange(a.num_rows)).view(torch.uint8),
                               b.gather(torch.arange(b.num_rows)).view(torch.uint8))


def test_store_of_another_model_or_export_is_rejected(tmp_path, tiny):
    model = tiny.model()
    d = export_tables(model, tmp_path / "a")
    other = tiny.model(seed=1, max_seq_len=32)
    with pytest.raises(ValueError, match=r"does not fit this model: model config differs \(max_seq_len"):
        open_store_dir(d, other)
    with pytest.raises(ValueError, match="head_sizes|num_rows|config"):
        open_store_dir(d, tiny.model(engram=EngramConfig(engram_vocab_size=[61, 59], n_embed_per_ngram=16,
                                                         n_head_per_ngram=2, layer_ids=[0, 2], pad_id=0)))
    # Same config, other weights: the recorded identity of the exported weights tells.
    retrained = tiny.model(seed=5)
    retrained.save_pretrained(tmp_path / "m5")
    with pytest.raises(ValueError, match=r"was exported from weights \w+ \(layer 0 table\), the model \(its tables"):
        open_store_dir(d, retrained)
    with pytest.raises(ValueError, match=r"was exported from weights \w+ \(layer 0 table\).*m5.*model.safetensors"):
        open_memory(tmp_path / "m5", "disk", d)
    # A layer file from another export cannot be mixed in.
    d2 = export_tables(model, tmp_path / "b")
    shutil.copyfile(d2 / layer_file(2), d / layer_file(2))
    with pytest.raises(StoreFormatError, match="export_id"):
        open_store_dir(d, model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store_dir(tmp_path / "nope", model)


def test_interrupted_export_keeps_the_old_store_or_leaves_none(tmp_path, monkeypatch, tiny):
    import engram.serve.export as export

    model, other = tiny.model(), tiny.model(seed=1)
    d = export_tables(model, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    calls = []

    def failing_write_store(path, *a, **kw):
        calls.append(path)
        if len(calls) % 2 == 0:
            raise OSError(28, "No space left on device (simulated)")
        return real(path, *a, **kw)

    real = export.write_store
    monkeypatch.setattr(export, "write_store", failing_write_store)
    # over an existing store: the new one is staged next to it, so the old one stays whole
    with pytest.raises(OSError, match="simulated"):
        export_tables(other, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging directory left behind
    open_store_dir(d, model)
    # into a new directory: no manifest, so nothing half-written ever opens
    with pytest.raises(OSError, match="simulated"):
        export_tables(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_store_dir(tmp_path / "fresh", model)
    monkeypatch.undo()
    # a successful export over the old store replaces it whole
    export_tables(other, d)
    with pytest.raises(ValueError):
        open_store_dir(d, model)
    open_store_dir(d, other)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(d)


# ------------------------------------------------------------------------------------ bit-identical serving

def _needs_cache(policy):
    if policy is not None:
        pytest.importorskip("engram.store.cache", reason="CachedStore (engram.store.cache) not available yet")


MEMORY = [("ram", 0.0, None), ("disk", 0.0, None), ("ram", 0.1, "lru")] + [
    ("disk", frac, pol) for pol in ("lru", "lfu", "static") for frac in (0.02, 0.3)]


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "sync"])
@pytest.mark.parametrize("memory,frac,policy", MEMORY, ids=[f"{m}-{p or 'nocache'}-{f}" for m, f, p in MEMORY])
def test_offloaded_outputs_are_bit_identical(saved, memory, frac, policy, prefetch, tiny):
    _needs_cache(policy)
    profile = None
    if policy == "static":
        profile = access_profiles(saved.model, saved.profile_batches)
    cache_bytes = int(frac * tiny.table_bytes(saved.model))
    with open_memory(saved.model_dir, memory, saved.store_dir if memory == "disk" else None,
                     cache_bytes=cache_bytes, policy=policy or "lru", profile=profile, prefetch=prefetch,
                     sync_rows=0) as lm:  # every request through the prefetcher when it is on
        assert not lm.model.has_tables
        assert torch.equal(lm(saved.idx).logits, saved.logits)
        assert torch.equal(lm.generate(saved.prompt, 8, temperature=0), saved.greedy)
        got = lm.generate(saved.prompt, 8, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(7))
        assert torch.equal(got, saved.sampled)
        assert lm.evaluate(iter(saved.batches)) == saved.loss
        # Decode steps on given text (teacher forcing): a prefill chunk, then one token at a time.
        x = saved.idx
        ref_state, state = saved.model.new_decode_state(x.shape[0]), lm.model.new_decode_state(x.shape[0])
        for a, b in [(0, 3), *((t, t + 1) for t in range(3, x.shape[1]))]:
            with torch.no_grad():
                want = saved.model(x[:, a:b], cache=ref_state).logits
            assert torch.equal(lm(x[:, a:b], cache=state).logits, want)
        tiers = lm.tier_stats()
    top = next(iter(tiers))
    assert top == ("cache" if policy else memory)
    assert tiers[top]["requested"] > 0
    for c in tiers.values():
        assert c["hits"] + c["misses"] == c["unique"] <= c["requested"]
    if policy:
        assert tiers[memory]["requested"] == tiers["cache"]["misses"]  # misses are passed on to the next tier


def test_a_loaded_model_can_share_its_backbone_with_the_served_memory(saved, tiny):
    """open_memory(model=...): the model (tables and all) serves through a store; its outputs are unchanged,
    its own tables unused; a model of another config or vocabulary is refused."""
    profile = access_profiles(saved.model, saved.profile_batches)
    with open_memory(saved.model_dir, "disk", saved.store_dir, cache_bytes=int(0.1 * tiny.table_bytes(saved.model)),
                     policy="static", profile=profile, model=saved.model) as lm:
        assert lm.model is saved.model
        tables = [p.detach().clone() for p in saved.model.engram_parameters()]
        with torch.no_grad():
            for p in saved.model.engram_parameters():
                p.zero_()  # not read by the served path: still the stored rows
            try:
                assert torch.equal(lm(saved.idx).logits, saved.logits)
                assert torch.equal(lm.generate(saved.prompt, 8, temperature=0), saved.greedy)
            finally:
                for p, t in zip(saved.model.engram_parameters(), tables, strict=True):
                    p.copy_(t)
        assert lm.tier_stats()["cache"]["requested"] > 0
    assert torch.equal(saved.model(saved.idx).logits, saved.logits)  # closing leaves the model as it was
    with pytest.raises(ValueError, match="does not have the config saved"):
        open_memory(saved.model_dir, "ram", model=tiny.model(saved.model.cfg.engram.table_dtype, d_model=64))
    other = EngramLM(saved.model.cfg, CompressedVocab(np.arange(tiny.V) % 31)).eval()
    with pytest.raises(ValueError, match="compresses the vocabulary differently"):
        open_memory(saved.model_dir, "ram", model=other)
    with pytest.raises(ValueError, match="must be an EngramLM"):
        open_memory(saved.model_dir, "ram", model=object())


_BUILT: dict = {}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 20),
       frac=st.just(0.0) | st.floats(0.02, 0.5),
       policy=st.sampled_from(["lru", "lfu"]), layout=st.booleans())
def test_random_sequences_through_a_disk_cache_are_bit_identical(tmp_path_factory, tiny, seed, B, T, frac, policy,
                                                                  layout):
    pytest.importorskip("engram.store.cache", reason="CachedStore (engram.store.cache) not available yet")
    if "prop" not in _BUILT:  # built once: hypothesis calls this test many times
        root = tmp_path_factory.mktemp("prop")
        s = _BUILT["prop"] = tiny.Saved(root, "bfloat16")
        # the same tables with rows in co-access order (profiled on other ids than the test's)
        s.laid_dir = export_tables(s.model, root / "laid", layouts=co_access_layouts(s.model, s.profile_batches))
    s = _BUILT["prop"]
    with open_memory(s.model_dir, "disk", s.laid_dir if layout else s.store_dir,
                     cache_bytes=int(frac * tiny.table_bytes(s.model)),
                     policy=policy) as lm:
        for k in range(3):  # several passes: the cache state carries over
            x = tiny.ids(B, T, seed=seed + k)
            with torch.no_grad():
                assert torch.equal(lm(x).logits, s.model(x).logits)
