"""engram.probes and its commands, on a debug model trained once for the module (seconds)."""

# Shapes: T time, C gate columns (layer x branch).

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.cli import main
from engram.config import ModelConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM
from engram.probes import collisions as C
from engram.probes import gates as G
from engram.probes import lens as L
from engram.probes import memory_off as P
from engram.probes import ruler as R
from engram.probes.common import memory_off, probe_data, unique_ngrams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_corpus):
    """A debug-preset model trained on the synthetic corpus, its data bundle and a fresh token cache."""
    from engram.train.config import apply_overrides, run_preset
    from engram.train.trainer import Trainer

    base = tmp_path_factory.mktemp("probes")
    corpus = make_corpus(base / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(base / "cache"))
        cfg = apply_overrides(run_preset("debug"), [
            "train.steps=20", "train.dtype='float32'", "train.threads=1", "data.vocab_size=512",
            "model.max_seq_len=128", "data.val_permille=200", f"data.data={[str(corpus)]!r}"])
        Trainer(cfg, base / "run", progress=False).train()
        model_dir = base / "run" / "model"
        model = EngramLM.from_pretrained(model_dir).eval()
        data = probe_data(model_dir, None, str(model_dir / "tokenizer"), model.cfg.vocab_size)
        yield {"dir": model_dir, "model": model, "data": data, "base": base}


def _text_ids(trained, n=40):
    return [int(t) for t in trained["data"].val[:n]]


# ------------------------------------------------------------------------------------------------ gates

def test_gates_page_holds_the_gates(trained):
    model, ids = trained["model"], _text_ids(trained)
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits
        with G.capture_gates(model):
            hooked = model(torch.tensor([ids])).logits
    assert torch.equal(plain, hooked)  # capturing changes nothing
    gates_TC, names = G.token_gates(model, ids)
    assert gates_TC.shape == (len(ids), len(model.hasher.layer_ids) * model.cfg.hc_mult)
    assert ((gates_TC > 0) & (gates_TC < 1)).all()
    tokens = G.token_strings(trained["data"].tokenizer, ids)
    page = G.gates_html(gates_TC, names, tokens, "t")
    shown = [json.loads(g) for g in re.findall(r"data-gates='([^']*)'", page)]
    assert shown == gates_TC.tolist()
    assert "http" not in page.lower().replace('lang="en"', "")  # nothing fetched


def test_gates_equal_the_modules_own(trained):
    """The hook's re-run sees what the block gave its Engram: recompute layer 0's gates by hand."""
    model, ids = trained["model"], _text_ids(trained, 20)
    gates_TC, _ = G.token_gates(model, ids)
    x = torch.tensor([ids])
    blk = model.blocks[0]
    assert blk.engram is not None
    with torch.no_grad():
        h = model.tok_emb(x).unsqueeze(2)
        emb = model.memory.rows(0, model.engram_rows(x)[0])
        _, aux = blk.engram(h, emb=emb, return_gates=True)
    assert torch.equal(aux["gates"][0, :, 0], gates_TC[:, 0])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary")
def test_gates_page_renders_in_chromium(trained, tmp_path):
    from PIL import Image

    model, ids = trained["model"], _text_ids(trained)
    gates_TC, names = G.token_gates(model, ids)
    page = tmp_path / "gates.html"
    page.write_text(G.gates_html(gates_TC, names, G.token_strings(trained["data"].tokenizer, ids), "gates"))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=900,500", page.as_uri()], check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (500, 900)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # text, shading and legend, not a blank page


# ------------------------------------------------------------------------------------------- memory-off

def test_memory_off_is_exact_when_the_value_projection_is_zero(trained):
    model = EngramLM.from_pretrained(trained["dir"]).eval()
    with torch.no_grad():
        for blk in model.blocks:
            if blk.engram is not None:
                blk.engram.value_proj.weight.zero_()
                blk.engram.value_proj.bias.zero_()
    d = trained["data"]
    probes = [P.memorisation_probes(d.train, d.val, context=32, per_order=16, top=64, exclude={d.eos_id}),
              P.induction_probes(model.cfg.vocab_size, context=32, count=16)]
    x = probes[0].x_PC[:4]
    with torch.no_grad():
        on = model(x).logits
        with memory_off(model) as n:
            off = model(x).logits
    assert n == 1 and torch.equal(on, off)
    for p in probes:
        r = P.score(model, p)
        assert r["on"] == r["off"] and r["probes"] == len(p.target_P) > 0


def test_memory_off_changes_a_trained_model(trained):
    model, x = trained["model"], torch.tensor([_text_ids(trained)])
    with torch.no_grad():
        on = model(x).logits
        with memory_off(model):
            off = model(x).logits
        again = model(x).logits
    assert not torch.equal(on, off) and torch.equal(on, again)  # the hook acts, then is gone


def test_memory_off_control_without_memory():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=32,
                      n_routed_experts=4, expert_hidden=32, first_dense_layers=1, engram=None)
    model = EngramLM(cfg).eval()
    r = P.score(model, P.induction_probes(64, context=24, count=32))
    assert r["engram_layers"] == 0 and r["on"] == r["off"] and r["retention"] == 1.0


def test_probe_families_are_what_they_say(trained):
    d = trained["data"]
    mem = P.memorisation_probes(d.train, d.val, context=16, per_order=8, top=64, exclude={d.eos_id})
    assert len(mem.target_P) > 0
    for n in P.ORDERS:
        top = {tuple(g) for g in P.frequent_ngrams(d.train, n, 64, {d.eos_id}, 1 << 20).tolist()}
        for x, t in zip(mem.x_PC[mem.group_P == n].tolist(), mem.target_P[mem.group_P == n].tolist(), strict=True):
            assert (*x[len(x) - (n - 1):], t) in top
    ind = P.induction_probes(100, context=20, count=50, span=3)
    for x, t in zip(ind.x_PC.tolist(), ind.target_P.tolist(), strict=True):
        a = x[-2:]
        follows = [x[j + 2] for j in range(len(x) - 2) if x[j:j + 2] == a]
        assert follows == [t]  # A occurs once before the end and is followed by B


# ------------------------------------------------------------------------------------------ lens, cka

def test_logit_lens_and_cka_invariants(trained):
    from engram.data import val_batches

    model = trained["model"]
    batches = val_batches(trained["data"].val, 4, 32, 256)
    kl = L.lens_kl(model, batches)
    assert len(kl) == model.cfg.n_layers + 1 and abs(kl[-1]) < 1e-5 and min(kl) > -1e-9
    hs, _ = L.streams(model, batches)
    cka = np.array(L.cka_matrix(hs, hs))
    assert np.allclose(np.diag(cka), 1.0, atol=1e-5) and np.allclose(cka, cka.T, atol=1e-12)
    assert ((cka > 0) & (cka <= 1 + 1e-9)).all()
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    assert L.linear_cka(hs[1], 3.0 * hs[1].double() @ q) == pytest.approx(1.0, abs=1e-9)  # rotation, scale


# ------------------------------------------------------------------------------------------- collisions

def test_collisions_match_a_hand_count():
    hasher = NgramHasher(12, [5, 7], max_ngram_size=3, n_head_per_ngram=2, layer_ids=[0], pad_id=0)
    ids = np.random.default_rng(0).integers(0, 12, 300)
    stats = C.head_stats(hasher, ids, 0)
    rows = hasher.hash_layer(ids[None], 0)[0]
    for s in stats:
        n, col = s["order"], (s["order"] - 2) * 2 + s["head"]
        by_gram = {tuple(ids[t - n + 1:t + 1]): int(rows[t, col]) for t in range(n - 1, len(ids))}
        per_row: dict[int, int] = {}
        for r in by_gram.values():
            per_row[r] = per_row.get(r, 0) + 1
        assert s["distinct_ngrams"] == len(by_gram) and s["rows_used"] == len(per_row)
        assert s["table_rows"] == hasher.table_sizes[0][n - 2][s["head"]]
        shared = sum(1 for r in by_gram.values() if per_row[r] > 1)
        assert s["collision_rate"] == pytest.approx(shared / len(by_gram))
        assert s["ngrams_per_used_row"] == pytest.approx(len(by_gram) / len(per_row))
    m = 7
    assert C.expected_used(m, 1) == pytest.approx(1.0) and C.expected_used(m, 0) == 0.0
    assert C.expected_used(m, 3) == pytest.approx(m * (1 - (1 - 1 / m) ** 3))
    assert C.expected_collision_rate(m, 1) == 0.0


def test_unique_ngrams_is_exact():
    g = np.array([[1, 2], [3, 4], [1, 2], [2, 1]])
    first, inverse, counts = unique_ngrams(g)
    assert sorted(counts.tolist()) == [1, 1, 2] and inverse[0] == inverse[2] != inverse[3]
    assert sorted(first.tolist()) == [0, 1, 3]


# ------------------------------------------------------------------------------------------------ ruler

@pytest.mark.parametrize("task", R.TASKS)
def test_ruler_examples_have_one_answer_and_fit(trained, task):
    d, length = trained["data"], trained["model"].cfg.max_seq_len
    examples = R.make_examples(task, d.tokenizer, d.val, length, 20, seed=1)
    for ex in examples:
        assert R.verify(ex, d.tokenizer) == ex.answer
        assert len(ex.ids) + len(ex.answer_ids) + 1 == length
        assert R.exact_match(ex.answer_ids + d.tokenizer.encode("\n"), ex, d.tokenizer)
        assert not R.exact_match(ex.answer_ids[:-1] + d.tokenizer.encode("\n"), ex, d.tokenizer)
    again = R.make_examples(task, d.tokenizer, d.val, length, 20, seed=1)
    assert [e.ids for e in again] == [e.ids for e in examples]  # seeded
    with pytest.raises(ValueError, match="too short"):
        R.make_examples(task, d.tokenizer, d.val, 20, 1, seed=1)


@pytest.mark.parametrize("task", ["mk-niah", "kv-niah"])
def test_key_completion_is_the_induction_form(trained, task):
    """mk-niah's prompt ends with the asked key's own line up to the ``=`` (kv-niah's, without an ``=``, up to
    the key): the answer is the token run that follows those same tokens earlier in the prompt, and it is one
    of ``pairs`` values (chance 1/pairs)."""
    d, tok = trained["data"], trained["data"].tokenizer
    sep = " =" if task == "mk-niah" else ""
    other = "kv-niah" if task == "mk-niah" else "mk-niah"
    for ex in R.make_examples(task, tok, d.val, 128, 20, seed=2, pairs=3):
        key = tok.decode(ex.ids).rsplit("\n", 1)[1]
        assert key.startswith("key_") and key.endswith(sep) and (sep or " " not in key)
        needle = tok.encode(f"\n{key} {ex.answer}\n")
        assert any(ex.ids[i:i + len(needle)] == needle for i in range(len(ex.ids)))
        assert len(set(R.assignments(tok.decode(ex.ids), task))) == 3
        assert not R.assignments(tok.decode(ex.ids), other)  # the two forms never read each other's lines
        # a prompt asking a key twice with two values is refused: the answer would not be unique
        twice = R.Example(task, tok.encode(f"\n{key} 111\nx\n{key} 222\n") + ex.ids, ex.answer, [])
        with pytest.raises(ValueError, match="assigned twice"):
            R.verify(twice, tok)
    assert R.chance(task, pairs=3, queries=1, hops=1) == pytest.approx(1 / 3)


# -------------------------------------------------------------------------------------------------- CLI

def test_commands_write_json_png_and_report(trained, tmp_path, capsys):
    model, out = str(trained["dir"]), tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(trained["base"] / "cache"))
        assert main(["gates", "--model", model, "--text", "value = self.read(index)", "--out", str(out)]) == 0
        for argv in (["memory-off", "--per-order", "16", "--count", "32"], ["logit-lens", "--model2", model],
                     ["cka", "--model2", model], ["collisions", "--tokens", "4000"], ["ruler", "--examples", "4"]):
            assert main(["probe", argv[0], "--model", model, "--out", str(out), *argv[1:]]) == 0, argv
    report = (out / "REPORT.md").read_text()
    for name in ("gates", "memory_off", "logit_lens", "cka", "collisions", "ruler"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"]({name}.png)" in report
    assert report.count("\n## ") == 6 and report.count("- command: `engram ") == 6
    lens = json.loads((out / "logit_lens.json").read_text())
    assert lens["models"][model]["L1"] == 0.0
    coll = json.loads((out / "collisions.json").read_text())
    assert {r["fraction"] for r in coll["rows"]} == set(C.FRACTIONS)
    # a rerun replaces its own section
    assert main(["probe", "collisions", "--model", model, "--out", str(out), "--tokens", "2000"]) == 0
    assert (out / "REPORT.md").read_text().count("## Hash collisions") == 1


def test_command_errors_are_one_line(trained, tmp_path, capsys):
    model = str(trained["dir"])
    assert main(["probe", "ruler", "--model", model, "--out", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown task nope" in capsys.readouterr().err
    assert main(["probe", "collisions", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["probe", "cka", "--model", model, "--out", str(tmp_path)])  # --model2 is required
    assert Path(tmp_path).is_dir()


def test_every_probe_option_has_help_and_shows_its_default(capsys):
    import argparse

    from engram.cli import build_parser

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    probe = next(a for a in top.choices["probe"]._actions if isinstance(a, argparse._SubParsersAction))
    assert set(probe.choices) == {"memory-off", "logit-lens", "cka", "collisions", "ruler", "ruler-mix",
                                 "ruler-finetune"}
    for words, sub in [(["gates"], top.choices["gates"])] + [(["probe", n], p) for n, p in probe.choices.items()]:
        with pytest.raises(SystemExit) as exc:
            main([*words, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            assert action.help, (words, action.dest)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (words, action.dest)
        assert "(default: None)" not in text and "(default: False)" not in text
