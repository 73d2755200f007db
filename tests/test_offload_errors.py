"""Offloaded inference: fetch errors, store checks, shutdown, the command line and decode-sized requests."""

# Shapes: B batch, T time, H hash heads, d row width, V vocabulary, R table rows.

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM
from engram.serve import OffloadedLM, open_memory
from engram.store import blockdev
from engram.store.base import RamStore
from engram.store.prefetch import CancelledError
from engram.tokenizer.compression import CompressedVocab

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ errors and shutdown

class FlakyStore:
    """Wraps a store; gathers raise `error` once `ok_calls` have succeeded, or block on `gate`."""

    def __init__(self, inner, ok_calls=0, error=None, gate=None):
        self.inner, self.ok_calls, self.error, self.gate = inner, ok_calls, error, gate
        self.calls = 0
        self.entered = threading.Event()  # set once a gather has started

    num_rows = property(lambda self: self.inner.num_rows)
    dim = property(lambda self: self.inner.dim)
    dtype = property(lambda self: self.inner.dtype)

    def gather(self, rows_N, out_Nd=None):
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.error is not None and self.calls > self.ok_calls:
            raise self.error
        return self.inner.gather(rows_N, out_Nd)

    def stats(self):
        return self.inner.stats()

    def reset_stats(self):
        self.inner.reset_stats()

    def close(self):
        self.inner.close()


def bare_and_stores(model):
    bare = EngramLM(model.cfg, model.vocab, tables=False).eval()
    sd = {k: v for k, v in model.state_dict().items() if ".engram.table." not in k}
    bare.load_state_dict(sd, strict=not model.cfg.tie_embeddings)
    return bare, {b.layer: RamStore(b.engram.table.weight) for b in model.blocks if b.engram is not None}


@pytest.mark.parametrize("prefetch", [True, False])
def test_fetch_errors_surface_in_the_caller(prefetch, tiny):
    model = tiny.model()
    bare, stores = bare_and_stores(model)
    stores[2] = FlakyStore(stores[2], ok_calls=1, error=OSError(5, "Input/output error (simulated)"))
    with OffloadedLM(bare, stores, prefetch=prefetch, sync_rows=0) as lm:
        with torch.no_grad():
            assert torch.equal(lm(tiny.ids()).logits, model(tiny.ids()).logits)
        with pytest.raises(OSError, match="simulated"):
            lm(tiny.ids())
        with pytest.raises(OSError, match="simulated"):
            lm.generate(tiny.ids(1, 4), 3, temperature=0)


def test_wrapper_checks_its_stores(tiny):
    model = tiny.model()
    bare, stores = bare_and_stores(model)
    with pytest.raises(ValueError, match="exactly the Engram layers"):
        OffloadedLM(bare, {0: stores[0]})
    with pytest.raises(ValueError, match="store of Engram layer 2"):
        OffloadedLM(bare, {0: stores[0], 2: RamStore(stores[2].table[:-1])})
    with pytest.raises(ValueError, match="store of Engram layer 2"):
        OffloadedLM(bare, {0: stores[0], 2: RamStore(stores[2].table.to(torch.bfloat16))})
    with pytest.raises(ValueError, match="no Engram layers"):
        OffloadedLM(EngramLM(tiny.cfg(engram=None)), {})


def test_open_memory_errors(tmp_path, tiny):
    model = tiny.model()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="'ram' or 'disk'"):
        open_memory(tmp_path / "m", "ssd")
    with pytest.raises(ValueError, match="needs store_dir"):
        open_memory(tmp_path / "m", "disk")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_memory(tmp_path / "m", "disk", tmp_path / "missing")
    pytest.importorskip("engram.store.cache", reason="CachedStore (engram.store.cache) not available yet")
    with pytest.raises(ValueError, match="access profile"):
        open_memory(tmp_path / "m", "ram", cache_bytes=1000, policy="static")
    with pytest.raises(ValueError, match="less than one row"):
        open_memory(tmp_path / "m", "ram", cache_bytes=10)


@pytest.mark.timeout(30)
def test_close_during_a_blocked_read_never_hangs(tiny):
    model = tiny.model()
    bare, stores = bare_and_stores(model)
    gate = threading.Event()
    stores[2] = FlakyStore(stores[2], gate=gate)
    lm = OffloadedLM(bare, stores, sync_rows=0)
    lm.prefetcher.join_timeout = 0.5
    box = {}

    def run():
        try:
            lm(tiny.ids())
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        assert stores[2].entered.wait(10)  # layer 2's read is under way and blocked: the forward pass waits
        assert t.is_alive()
        workers = list(lm.prefetcher._threads)
        lm.close()  # returns although the read is still blocked: its worker is left behind
        assert any(w.is_alive() for w in workers)
        t.join(10)
        assert not t.is_alive() and isinstance(box.get("error"), CancelledError)
    finally:
        gate.set()


# ------------------------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from engram.data.bpe import train_bpe

    root = tmp_path_factory.mktemp("cli")
    text = " ".join(f"the cat {w} sat on the mat number {i % 17}." for i, w in enumerate(["a", "b", "c"] * 60))
    tok = train_bpe([text] * 4, vocab_size=300)
    tdir = root / "model" / "tokenizer"
    tdir.mkdir(parents=True)
    (tdir / "tokenizer.json").write_text(tok.to_str())
    (tdir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    Vt = tok.get_vocab_size()
    vocab = CompressedVocab(np.arange(Vt) % 200)
    eng = EngramConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1],
                       pad_id=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=Vt, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48, max_seq_len=64, engram=eng)
    EngramLM(cfg, vocab).save_pretrained(root / "model")
    data = root / "corpus"
    data.mkdir()
    for i in range(30):
        (data / f"doc{i}.txt").write_text(text[i * 40:] + f" document {i}\n" * 20)
    return root


def test_cli_export_generate_and_eval(cli_model, capsys, monkeypatch):
    from engram.cli import main

    monkeypatch.setenv("ENGRAM_CACHE", str(cli_model / "cache"))
    model, store = str(cli_model / "model"), str(cli_model / "store")
    assert main(["export-memory", "--model", model, "--out", store]) == 0
    assert "layer 1:" in capsys.readouterr().out
    gen = ["generate", "--model", model, "--prompt", "the cat sat", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(gen) == 0
    plain = capsys.readouterr().out
    assert main([*gen, "--memory", "disk", "--store", store]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "requested" in out.err
    assert main([*gen, "--store", store]) == 2  # --store without --memory is an error
    assert "--memory" in capsys.readouterr().err
    ev = ["eval", "--model", model, "--data", str(cli_model / "corpus"), "--batch-size", "2", "--seq-len", "16",
          "--eval-tokens", "128"]
    assert main([*ev, "--json"]) == 0
    ram = json.loads(capsys.readouterr().out)
    assert main([*ev, "--json", "--memory", "disk", "--store", store, "--cold", "--no-prefetch"]) == 0
    disk = json.loads(capsys.readouterr().out)
    assert disk["val_loss"] == ram["val_loss"] and disk["tokens"] == ram["tokens"] > 0
    assert disk["tiers"]["disk"]["requested"] == ram["tiers"]["ram"]["requested"] > 0
    assert disk["io_scheduler"] == blockdev.io_scheduler(Path(store) / "layer_1.engram")  # None on tmpfs
    assert main([*ev, "--memory", "disk", "--store", store]) == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "tokens/s" in text and "bytes read" in text and " KiB" in text
    seen = []  # the store device's scheduler is printed, with a hint where 'none' is offered but not used
    monkeypatch.setattr(blockdev, "io_scheduler", lambda p: seen.append(Path(p).name) or
                        {"device": "vdz", "active": "mq-deadline", "available": ["none", "mq-deadline"]})
    assert main([*ev, "--memory", "disk", "--store", store]) == 0
    assert "store device vdz: I/O scheduler mq-deadline (random direct reads cost less CPU under 'none'" in \
        capsys.readouterr().out and seen == ["layer_1.engram"]
    assert main([*ev, "--memory", "ram"]) == 0
    assert "store device" not in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setenv("ENGRAM_CACHE", str(cli_model / "cache"))
    assert main([*ev, "--memory", "disk", "--store", str(cli_model / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    laid = str(cli_model / "laid")  # co-access layout profiled on the corpus: same answers
    assert main(["export-memory", "--model", model, "--out", laid, "--layout-tokens", "2000",
                 "--data", str(cli_model / "corpus")]) == 0
    assert "co-access layout:" in capsys.readouterr().out
    assert main([*ev, "--json", "--memory", "disk", "--store", laid, "--cold"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == ram["val_loss"]
    assert main([*gen, "--memory", "disk", "--store", laid]) == 0
    assert capsys.readouterr().out == plain
    assert main(["export-memory", "--model", model, "--out", laid, "--layout-tokens", "-1"]) == 2
    assert "--layout-tokens" in capsys.readouterr().err


def test_small_requests_are_gathered_in_the_caller_and_stay_exact(tiny):
    model = tiny.model()
    bare, stores = bare_and_stores(model)
    with OffloadedLM(bare, stores, prefetch=True, sync_rows=10**9) as lm:
        submitted = []
        real_submit = lm.prefetcher.submit
        lm.prefetcher.submit = lambda flat: submitted.append(flat) or real_submit(flat)
        with torch.no_grad():
            assert torch.equal(lm(tiny.ids()).logits, model(tiny.ids()).logits)
        assert submitted == []  # below the threshold: no worker handoff
    with pytest.raises(ValueError, match="sync_rows"):
        OffloadedLM(bare, stores, sync_rows=-1)
