"""`engram import-v41`: a V4.1-layout checkpoint's Engram tables streamed into a store, served exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engram.config import ConfigError
from engram.serve import read_manifest
from engram.serve.v41 import open_v41_store
from engram.serve.v41_import import find_prefix, import_v41
from engram.serve.verify import verify_store_dir
from engram.store.format import read_header
from engram.v41 import V41Config, V41Engram, V41Hasher, dequantize_fp8_rows
from make_v41_checkpoint import write_checkpoint  # benchmarks/ is on the test path (pyproject)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("v41") / "ckpt"
    write_checkpoint(d, "tiny", seed=3)
    return d


def _tensors(ckpt, prefix=""):
    wmap = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]

    def get(key):
        with safe_open(ckpt / wmap[prefix + key], "pt") as f:
            return f.get_tensor(prefix + key)
    return get


def _in_memory(ckpt, cfg, lay, prefix=""):
    """The reference: the layer loaded whole from the checkpoint, its fp8 table in memory."""
    get = _tensors(ckpt, prefix)
    m = V41Engram(cfg, lay)
    names = ("embed.weight", "embed.scale", "wkv.weight", "q_weight", "k_weight")
    m.load_state_dict({n: get(f"layers.{lay}.engram.{n}") for n in names})
    return m.eval()


def _inputs(cfg, seed, B=2, T=9):
    g = torch.Generator().manual_seed(seed)
    token_map = np.arange(64) % cfg.engram_compressed_vocab_size
    ids = torch.randint(0, 64, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.15
    rows = V41Hasher(cfg, token_map).hash(ids, mask)
    streams = torch.randn(B, T, cfg.hc_mult, cfg.hidden_size, generator=g)
    return rows, streams, mask


def test_import_then_serve_from_the_store_equals_the_in_memory_layers(ckpt, tmp_path):
    out = import_v41(ckpt, tmp_path / "store", chunk_rows=37)  # several chunks per table
    cfg = V41Config.from_pretrained(ckpt)
    m = read_manifest(out)
    assert (m["flavour"], m["dtype"], m["dim"], m["key_prefix"]) == ("v41", "float8_e4m3fn", 64, "")
    assert [m["layers"][str(i)]["num_rows"] for i in cfg.engram_layer_ids] == cfg.engram_num_embeddings
    assert verify_store_dir(out, progress=False).ok
    get = _tensors(ckpt)
    with open_v41_store(out, io="mmap") as served:
        assert served.layer_ids == cfg.engram_layer_ids
        for lay in cfg.engram_layer_ids:
            q, s = get(f"layers.{lay}.engram.embed.weight"), get(f"layers.{lay}.engram.embed.scale")
            ids = torch.arange(q.shape[0])
            assert torch.equal(served.stores[lay].gather(ids).view(torch.int32),
                               dequantize_fp8_rows(q, s).view(torch.int32))
            ref = _in_memory(ckpt, cfg, lay)
            for seed in range(3):
                rows, streams, mask = _inputs(cfg, seed)
                li = cfg.layer_index(lay)
                with torch.no_grad():
                    want = ref(streams, rows[:, :, li], mask)
                got = served(lay, streams, rows[:, :, li], mask)
                assert torch.equal(got, want)
                assert not torch.equal(got, streams)  # the memory did change the streams
        assert served.stats()[cfg.engram_layer_ids[0]]["disk"]["bytes_read"] > 0


def test_chunking_and_key_prefix_do_not_change_the_store(ckpt, tmp_path):
    a = import_v41(ckpt, tmp_path / "a", chunk_rows=1000)
    b = import_v41(ckpt, tmp_path / "b", chunk_rows=1)
    assert read_manifest(a)["weights"] == read_manifest(b)["weights"]
    hf = tmp_path / "hf"  # a transformers save names them model.layers.{i}.engram.*
    write_checkpoint(hf, "tiny", seed=3, prefix="model.")
    c = import_v41(hf, tmp_path / "c", layers=[3])
    mc = read_manifest(c)
    assert mc["key_prefix"] == "model." and sorted(mc["layers"]) == ["3"]
    assert mc["weights"]["tables"]["3"] == read_manifest(a)["weights"]["tables"]["3"]
    assert read_header(c / "layer_3.engram").meta["source_key"] == "model.layers.3.engram.embed.weight"
    cfg = V41Config.from_pretrained(hf)
    rows, streams, mask = _inputs(cfg, 5)
    with open_v41_store(c, io="mmap", cache_bytes=66 * 40) as served:  # through a cache of packed rows
        ref = _in_memory(hf, cfg, 3, prefix="model.")
        for _ in range(2):
            got = served(3, streams, rows[:, :, 1], mask)
            with torch.no_grad():
                assert torch.equal(got, ref(streams, rows[:, :, 1], mask))
        assert served.stats()[3]["cache"]["hits"] > 0
        with pytest.raises(ValueError, match="not in this store"):
            served(1, streams, rows[:, :, 0], mask)


def test_find_prefix_wants_one_table_per_layer():
    wm = {"layers.1.engram.embed.weight": "a", "model.layers.3.engram.embed.weight": "b"}
    assert find_prefix(wm, [1]) == "" and find_prefix(wm, [3]) == "model."
    with pytest.raises(ConfigError, match="different key prefixes"):
        find_prefix(wm, [1, 3])
    with pytest.raises(ConfigError, match="no table of Engram layer 2"):
        find_prefix(wm, [2])
    with pytest.raises(ConfigError, match="no table"):
        find_prefix({"xlayers.1.engram.embed.weight": "a"}, [1])


def test_a_checkpoint_that_does_not_match_its_config_is_refused_and_the_old_store_kept(ckpt, tmp_path):
    good = import_v41(ckpt, tmp_path / "store")
    before = read_manifest(good)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["engram_head_dim"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"the config says \[420, 32\]"):
        import_v41(bad, good)
    assert read_manifest(good) == before and verify_store_dir(good, progress=False).ok
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["layers.3.engram.embed.scale"]
    shutil.copy(ckpt / "config.json", bad / "config.json")
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ConfigError, match="needs its scales"):
        import_v41(bad, tmp_path / "x")
    with pytest.raises(ConfigError, match="layer 2 has no Engram"):
        import_v41(ckpt, tmp_path / "x", layers=[2])
    assert not (tmp_path / "x").exists()


def test_an_interrupted_import_leaves_the_previous_store(ckpt, tmp_path, monkeypatch):
    import engram.serve.v41_import as imp

    good = import_v41(ckpt, tmp_path / "store")
    before = read_manifest(good)
    real, calls = imp.write_store, []

    def dying(path, pieces, **kw):
        calls.append(path)
        if len(calls) == 2:
            next(iter(pieces))
            raise KeyboardInterrupt
        return real(path, pieces, **kw)
    monkeypatch.setattr(imp, "write_store", dying)
    with pytest.raises(KeyboardInterrupt):
        import_v41(ckpt, good)
    assert read_manifest(good) == before and verify_store_dir(good, progress=False).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_an_engramlm_refuses_a_v41_store(ckpt, tmp_path, tiny):
    from engram.serve import open_store_dir

    out = import_v41(ckpt, tmp_path / "store")
    with pytest.raises(ValueError, match="engram import-v41"):
        open_store_dir(out, tiny.model())


def test_cli_import_v41(ckpt, tmp_path, capsys):
    from engram.cli import main

    assert main(["import-v41", str(ckpt), "--out", str(tmp_path / "s"), "--chunk-mb", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "layer 1:" in out and "layer 3:" in out and "float8_e4m3fn" in out
    assert main(["verify", str(tmp_path / "s"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["import-v41", str(tmp_path / "nope"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["import-v41", str(ckpt), "--out", str(tmp_path / "t"), "--layers", "7"]) == 2
    assert "layer 7 has no Engram" in capsys.readouterr().err
