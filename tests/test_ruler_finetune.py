"""`probe ruler-mix` and `probe ruler-finetune` on two debug models (with and without memory), seconds."""

import json

import numpy as np
import pytest
import torch

from engram.cli import main
from engram.probes import ruler as R
from engram.probes import ruler_finetune as F
from engram.probes import ruler_mix as M
from engram.probes.common import probe_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_corpus):
    """Two debug-preset models trained briefly on the synthetic corpus at 128 tokens: ``engram`` and ``plain``."""
    from engram.train.config import apply_overrides, run_preset
    from engram.train.trainer import Trainer

    base = tmp_path_factory.mktemp("rft")
    corpus = make_corpus(base / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(base / "cache"))
        for name, extra in (("engram", []), ("plain", ["model.engram=None"])):
            cfg = apply_overrides(run_preset("debug"), [
                "train.steps=6", "train.dtype='float32'", "train.threads=1", "data.vocab_size=512",
                "model.max_seq_len=128", "train.seq_len=128", "data.val_permille=200",
                f"data.data={[str(corpus)]!r}", *extra])
            Trainer(cfg, base / name, progress=False).train()
        model_dir = base / "engram" / "model"
        data = probe_data(model_dir, None, str(model_dir / "tokenizer"), 512)
        yield {"base": base, "dirs": [base / "engram" / "model", base / "plain" / "model"], "data": data}


def _texts(path):
    lines = path.read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_mix_documents_each_hold_one_verifiable_task(models, tmp_path):
    d = models["data"]
    tok = d.tokenizer
    drop = (d.eos_id, d.pad_id)
    rec = M.write_mix(tmp_path, tok, d.train, length=128, count=24, seed=3, drop_ids=drop, pairs=4, queries=2, hops=1)
    texts = _texts(tmp_path / M.TASKS_FILE)
    assert len(texts) == rec["count"] == 24 and M.read_mix(tmp_path) == rec
    assert 64 <= rec["tokens_min"] <= rec["tokens_max"] <= 128
    seen = {t: 0 for t in R.DEFAULT_TASKS}
    for text in texts:
        assert text.endswith("\n") and text.count("\n") >= 6  # the lines, the query, the answer's newline
        prompt, answer = text.rstrip("\n").rsplit(":", 1)
        # re-verify from tokens: the prompt, tokenised afresh, has exactly one right answer, the one written
        task = "mq-niah" if "# values of" in prompt else "vt"
        ex = R.Example(task, tok.encode(prompt + ":"), answer.strip(), [])
        assert R.verify(ex, tok) == answer.strip()
        seen[task] += 1
        assert len(tok.encode(text)) <= 128 + 8  # a window of --length tokens (about) holds it
        assert tok.decode([d.eos_id]) not in text
    assert seen == {"mq-niah": 12, "vt": 12}  # the tasks in turn
    again = M.task_documents(tok, d.train, 128, 24, 3, R.DEFAULT_TASKS, drop_ids=drop, pairs=4, queries=2, hops=1)
    assert [M.document_text(e, tok) for e in again] == texts  # seeded


@pytest.mark.parametrize("seed", [0, 1])
def test_no_evaluation_prompt_is_trained_on(models, seed):
    """The mix of a seed and the evaluation of the same seed share no prompt, nor even a task (the same
    assignments and query): their random streams differ, and so do their filler splits."""
    import re

    d = models["data"]
    tok = d.tokenizer
    evals = [e for t in R.TASKS for e in R.make_examples(t, tok, d.val, 128, 20, seed)]
    mix = M.task_documents(tok, d.train, 128, 40, seed, R.TASKS)
    train_text = "".join(M.document_text(e, tok) for e in mix)
    for e in evals:
        assert tok.decode(e.ids) not in train_text

    def task(ids):
        text = tok.decode(ids)
        return tuple(re.findall(r"(?m)^(?:key_|var_)\w+ = \w+$|^# .*:$|^key_\w+ =$|^key_\w+(?: \d+)?$", text))

    assert not {task(e.ids) for e in evals} & {task(e.ids) for e in mix}
    assert len({task(e.ids) for e in evals}) == len(evals)  # the signature tells prompts apart


def test_spread_and_verdict():
    assert F.spread([0.5, 0.7], 50) == pytest.approx((0.6, 0.1))  # seeds disagree more than prompts vary
    assert F.spread([0.2], 100) == pytest.approx((0.2, 0.04))  # one seed: the binomial error
    assert F.spread([0.2, 0.2, 0.2], 100) == pytest.approx((0.2, 0.04))  # agreeing seeds are no certainty
    assert F.spread([0.0, 0.0], 25) == pytest.approx((0.0, 0.04))  # p(1-p) floored at 1/n
    rec = {"length": 64, "steps": 4, "seeds": [0, 1], "tasks": ["vt"], "models": {
        "a": {"summary": {"vt": {"mean": 0.9, "se": 0.01, "above_chance": True}}},
        "b": {"summary": {"vt": {"mean": 0.1, "se": 0.05, "above_chance": False}}}}}
    v = F.verdict(rec)
    assert "vt: above chance after fine-tuning: a;" in v and "a leads b by 0.800, clearly" in v


def test_ruler_mix_command(models, tmp_path, capsys):
    out = tmp_path / "mix"
    assert main(["probe", "ruler-mix", "--model", str(models["dirs"][0]), "--out", str(out), "--count", "6",
                 "--length", "120", "--tasks", "vt"]) == 0
    texts = _texts(out / M.TASKS_FILE)
    assert len(texts) == 6 and all("# variables equal to" in t for t in texts)
    assert json.loads((out / M.MIX_META).read_text())["length"] == 120


def test_finetune_command_runs_end_to_end(models, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["probe", "ruler-finetune", "--models", *map(str, models["dirs"]), "--seeds", "0", "1", "--steps", "4",
            "--examples", "4", "--out", str(out), "--no-progress", "--mix-count", "64"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(models["base"] / "cache"))
        assert main(argv) == 0
        rec = json.loads((out / "ruler_finetune.json").read_text())
        assert rec["length"] == rec["trained_seq_len"] == 128 and set(rec["models"]) == {"engram", "plain"}
        for name, m in rec["models"].items():
            assert set(m["runs"]) == {"0", "1"}
            for seed, r in m["runs"].items():
                cfg = json.loads((out / "runs" / f"{name}-seed{seed}" / "config.json").read_text())
                assert cfg["train"]["init_from"] == str(models["dirs"][0 if name == "engram" else 1].resolve())
                assert cfg["train"]["steps"] == 4 and cfg["train"]["seed"] == int(seed)
                assert not r["reused"] and set(r["accuracy"]) == set(R.DEFAULT_TASKS)
            for t in R.DEFAULT_TASKS:
                s = m["summary"][t]
                accs = [r["accuracy"][t] for r in m["runs"].values()]
                assert s["mean"] == pytest.approx(np.mean(accs))
                assert s["above_chance"] == (s["mean"] - 2 * s["se"] > s["chance"])
        assert (out / "ruler_finetune.png").read_bytes()[:4] == b"\x89PNG"
        report = (out / "REPORT.md").read_text()
        assert "## RULER-style retrieval after fine-tuning" in report and "](ruler_finetune.png)" in report
        assert "- command: `engram probe ruler-finetune" in report and "length: 128 tokens" in report
        # a rerun reuses every finished fine-tune and the mixes, and gives the same numbers
        assert main(argv) == 0
        again = json.loads((out / "ruler_finetune.json").read_text())
        assert all(r["reused"] for m in again["models"].values() for r in m["runs"].values())
        assert [m["runs"]["1"]["accuracy"] for m in again["models"].values()] == \
            [m["runs"]["1"]["accuracy"] for m in rec["models"].values()]
        assert report.count("## RULER") == (out / "REPORT.md").read_text().count("## RULER") == 1


def test_a_preset_sets_its_options_and_the_command_line_wins():
    from engram.cli import build_parser
    from engram.cli.probes import _command
    from engram.cli.probes_ruler import FINETUNE_DEFAULTS, _resolve_preset

    def resolve(*extra):
        args = build_parser().parse_args(["probe", "ruler-finetune", "--models", "m", "--out", "o", *extra])
        shown = _resolve_preset(args)
        return args, _command(shown, ["probe", "ruler-finetune"])

    args, cmd = resolve()  # no preset: the plain defaults, each named in the command
    assert all(getattr(args, k) == v for k, v in FINETUNE_DEFAULTS.items())
    assert "--steps 300" in cmd and "--preset" not in cmd
    args, cmd = resolve("--preset", "retrieval", "--steps", "7", "--set", "train.batch_size=4", "--set",
                        "train.lr=1e-3")
    want = F.PRESETS["retrieval"]
    assert (args.tasks, args.follow_ups, args.supervise, args.length) == (
        want["tasks"], want["follow_ups"], want["supervise"], want["length"])
    assert args.steps == 7 and args.set == [*want["set"], "train.batch_size=4", "train.lr=1e-3"]  # ours win
    assert args.examples == FINETUNE_DEFAULTS["examples"]  # what the preset leaves alone keeps its default
    assert "--preset retrieval" in cmd and "--steps 7" in cmd and "--tasks" not in cmd
    assert "--set train.batch_size=4 --set train.lr=1e-3" in cmd  # a repeatable option, once per value
    again, _ = resolve(*cmd.split()[3:])  # the recorded command resolves to the same options
    assert vars(again) == vars(args)


def test_finetune_errors_are_one_line(models, tmp_path, capsys):
    base = ["probe", "ruler-finetune", "--models", str(models["dirs"][0]), "--out", str(tmp_path)]
    assert main([*base, "--length", "4096"]) == 2
    assert "longer than a model's context" in capsys.readouterr().err
    assert main([*base, "--tasks", "nope"]) == 2
    assert main(["probe", "ruler-finetune", "--models", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert main([*base, "--set", "train.nope=1", "--steps", "1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_an_interrupted_finetune_is_resumed_and_a_finished_one_reused(models, tmp_path):
    d = models["data"]
    mix = tmp_path / "mix"
    M.write_mix(mix, d.tokenizer, d.train, length=128, count=64, seed=5, drop_ids=(d.eos_id, d.pad_id))
    cfg = F.finetune_config(models["dirs"][1], mix, seed=0, steps=4, overrides=["train.ckpt_every=2"])
    assert cfg.train.lr == pytest.approx(F.base_config(models["dirs"][1]).train.lr * F.LR_FRACTION)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(models["base"] / "cache"))
        whole = F.finetune(cfg, tmp_path / "whole", progress=False)
        from engram.train.trainer import Trainer

        cut = Trainer(cfg, tmp_path / "cut", progress=False)
        cut._should_stop = lambda: cut.step >= 2  # as Ctrl-C does: save a checkpoint and stop
        assert cut.train().status == "interrupted"
        resumed = F.finetune(cfg, tmp_path / "cut", progress=False)
        again = F.finetune(cfg, tmp_path / "cut", progress=False)
        # a fine-tune stopped inside finetune() says so and how to go on, and the rerun finishes it
        from engram.config import UserError

        with pytest.MonkeyPatch.context() as stop:
            stop.setattr(Trainer, "_should_stop", lambda self: self.step >= 1)
            with pytest.raises(UserError, match="stopped before step 4; run the same command again"):
                F.finetune(cfg, tmp_path / "stopped", progress=False)
        assert F.finetune(cfg, tmp_path / "stopped", progress=False)["val_loss"] == whole["val_loss"]
    assert not whole["reused"] and not resumed["reused"] and again["reused"]
    assert resumed["val_loss"] == again["val_loss"] == whole["val_loss"]  # resumed to the bit


def test_general_sample_stops_near_its_share():
    from engram.data import Document

    docs = [Document(f"d{i}", "".join(f"line {i}.{j}\n" for j in range(50 * (i + 1)))) for i in range(10)]
    got = M.general_sample(docs, 1000, seed=0)
    assert 1000 - 20 <= sum(map(len, got)) <= 1000 and all(t.endswith("\n") for t in got)
    assert all(any(d.text.startswith(t) for d in docs) for t in got)  # whole documents or their heads
    assert sum(map(len, M.general_sample(docs, 10**9, seed=0))) == sum(len(d.text) for d in docs)
    assert M.general_sample(docs, 1000, seed=0) == got != M.general_sample(docs, 1000, seed=1)


def test_task_sampler_supervises_exactly_the_answers(models):
    from engram.probes.ruler_sampler import IGNORE, TaskSampler

    d = models["data"]
    tok = d.tokenizer
    s = TaskSampler(tok, d.train, length=129, seq_len=128, batch_size=6, pad_id=d.pad_id, seed=3,
                    drop_ids=(d.eos_id, d.pad_id))
    x_BT, y_BT = s.batch_at(5)
    assert x_BT.shape == y_BT.shape == (6, 128)
    for b, ex in enumerate(s.examples_at(5)):
        assert ex.task == R.DEFAULT_TASKS[(5 * 6 + b) % 2] and R.verify(ex, tok) == ex.answer  # one right answer
        n = len(ex.ids) + len(ex.answer_ids) + len(s.end_ids)
        assert 64 <= n <= 129
        assert x_BT[b, :len(ex.ids)].tolist() == ex.ids  # the document starts at position 0
        assert (x_BT[b, n - 1:] == d.pad_id).all()  # then right padding
        kept = (y_BT[b] != IGNORE).nonzero().flatten().tolist()
        # the targets: the answer's tokens and the newline, predicted from the positions just before them
        assert kept == list(range(len(ex.ids) - 1, n - 1))
        assert y_BT[b, kept].tolist() == ex.answer_ids + s.end_ids
        assert tok.decode(y_BT[b, kept].tolist()).strip() == ex.answer
        assert d.eos_id not in x_BT[b, :n - 1].tolist()
    # a batch depends on (seed, step) alone: a resumed sampler sees what it would have seen
    again = TaskSampler(tok, d.train, length=129, seq_len=128, batch_size=6, pad_id=d.pad_id, seed=3, step=5,
                        drop_ids=(d.eos_id, d.pad_id))
    assert all(torch.equal(a, b) for a, b in zip(again.next(), (x_BT, y_BT), strict=True)) and again.step == 6
    assert not torch.equal(s.batch_at(6)[0], x_BT)
    with pytest.raises(ValueError, match="do not fit"):
        TaskSampler(tok, d.train, length=130, seq_len=128, batch_size=2, pad_id=d.pad_id)


def test_copy_rows_repeat_a_span_and_supervise_the_repeat(models):
    """With copy_rows, that fraction of the rows is a random span then the span again (only copying predicts
    the repeat, and it alone is supervised); the task rows are the ones the sampler draws without them."""
    from engram.probes.ruler_sampler import IGNORE, TaskSampler

    d = models["data"]
    kw = dict(length=129, seq_len=128, batch_size=8, pad_id=d.pad_id, seed=4, tasks=("mk-niah",),
              drop_ids=(d.eos_id, d.pad_id), follow_ups=1, pairs=3, queries=1)
    s = TaskSampler(d.tokenizer, d.train, copy_rows=0.25, **kw)
    docs = s.documents_at(3)
    assert [ex.task for ex, _ in docs] == ["mk-niah"] * 6 + ["copy"] * 2
    assert all(ex.task == "mk-niah" for ex in s.examples_at(3)) and len(s.examples_at(3)) == 6
    x_BT, y_BT = s.batch_at(3)
    for b in (6, 7):
        ex = docs[b][0]
        k = len(ex.ids) - 1
        span = ex.ids[:k]
        assert ex.ids[k] == span[0] and ex.answer_ids == span[1:] and 32 <= k <= 63
        assert x_BT[b, :2 * k].tolist() == span + span  # the span twice from position 0
        assert y_BT[b, :k].eq(IGNORE).all()  # nothing before the repeat's second token is a target
        assert y_BT[b, k:2 * k - 1].tolist() == span[1:] and y_BT[b, 2 * k - 1].item() == s.end_ids[0]
        assert y_BT[b, 2 * k:].eq(IGNORE).all()
    assert all(R.verify(ex, d.tokenizer) == ex.answer for ex in s.examples_at(3))  # task rows: one right answer
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        TaskSampler(d.tokenizer, d.train, copy_rows=1.0, **kw)


def test_answer_only_loss_counts_only_the_answers(models):
    """The model's loss on a supervised batch is the mean cross-entropy of the answer tokens alone."""
    import torch.nn.functional as F_

    from engram.model import EngramLM
    from engram.probes.ruler_sampler import IGNORE, TaskSampler

    d = models["data"]
    model = EngramLM.from_pretrained(models["dirs"][0]).eval()
    s = TaskSampler(d.tokenizer, d.train, length=128, seq_len=128, batch_size=4, pad_id=d.pad_id, seed=0)
    x_BT, y_BT = s.batch_at(0)
    with torch.no_grad():
        out = model(x_BT, y_BT)
        keep = y_BT != IGNORE
        want = F_.cross_entropy(out.logits[keep].float(), y_BT[keep])
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_answer_supervised_finetune_end_to_end(models, tmp_path):
    out = tmp_path / "out"
    argv = ["probe", "ruler-finetune", "--models", *map(str, models["dirs"]), "--seeds", "0", "--steps", "3",
            "--examples", "4", "--out", str(out), "--no-progress", "--supervise", "answer",
            "--set", "train.ckpt_every=2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(models["base"] / "cache"))
        assert main(argv) == 0
        rec = json.loads((out / "ruler_finetune.json").read_text())
        assert rec["supervise"] == "answer" and not (out / "mix").exists()
        for name, m in rec["models"].items():
            r = m["runs"]["0"]
            cfg = json.loads((out / "runs" / f"{name}-seed0" / "config.json").read_text())
            assert r["task_documents"] == 3 * cfg["train"]["batch_size"] and "mix" not in r and not r["reused"]
            # the model's own corpus: its validation loss measures what the fine-tune forgot
            own = json.loads((models["base"] / name / "config.json").read_text())["data"]["data"]
            assert cfg["data"]["data"] == own
        assert "loss on the answers and their newlines only" in (out / "REPORT.md").read_text()
        assert rec["follow_ups"] == 0
        assert main(argv) == 0  # finished fine-tunes are reused
        again = json.loads((out / "ruler_finetune.json").read_text())
        assert all(m["runs"]["0"]["reused"] for m in again["models"].values())


def test_an_interrupted_answer_supervised_finetune_resumes_to_the_bit(models, tmp_path):
    d = models["data"]
    plan = F.Plan(R.DEFAULT_TASKS, 128, 4, (0,), 4, 0, dict(pairs=4, queries=2, hops=1), supervise="answer")
    cfg = F.finetune_config(models["dirs"][0], None, seed=0, steps=4, overrides=["train.ckpt_every=2"])
    make = F.task_sampler_factory(d, plan, cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE", str(models["base"] / "cache"))
        whole = F.finetune(cfg, tmp_path / "whole", progress=False, make_sampler=make)
        from engram.train.trainer import Trainer

        cut = Trainer(cfg, tmp_path / "cut", progress=False)
        cut.sampler = make(cut.sampler.seed, cut.sampler.step)
        cut._should_stop = lambda: cut.step >= 2
        assert cut.train().status == "interrupted"
        resumed = F.finetune(cfg, tmp_path / "cut", progress=False, make_sampler=make)
    assert resumed["val_loss"] == whole["val_loss"]
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / k / "metrics.jsonl").read_text().splitlines())
               if r.get("kind") == "train"] for k in ("whole", "cut")]
    assert losses[0] == losses[1][-4:] or losses[0] == losses[1]


@pytest.mark.parametrize("follow_ups", [1, 3])
def test_follow_up_questions_each_have_one_right_answer(models, follow_ups):
    """With follow-ups, a document asks more questions of the same lines after its first answer: each answer
    supervised, each the one right answer of the text before it, and unasked keys come first."""
    from engram.probes.ruler_sampler import IGNORE, TaskSampler

    d = models["data"]
    tok = d.tokenizer
    s = TaskSampler(tok, d.train, length=257, seq_len=256, batch_size=6, pad_id=d.pad_id, seed=1, tasks=R.TASKS,
                    drop_ids=(d.eos_id, d.pad_id), follow_ups=follow_ups, pairs=3, queries=1)
    x_BT, y_BT = s.batch_at(2)
    assert sorted({ex.task for ex, _ in s.documents_at(2)}) == sorted(R.TASKS)
    asked = 0
    for b, (ex, follow) in enumerate(s.documents_at(2)):
        assert R.verify(ex, tok) == ex.answer and 1 <= len(follow) + 1 <= follow_ups + 1
        seq, want, seen = list(ex.ids), list(ex.answer_ids) + s.end_ids, [ex.answer]
        seq += want
        for q_ids, a_ids in follow:
            prompt = seq + q_ids
            answer = tok.decode(a_ids).strip()
            assert R.verify(R.Example(ex.task, prompt, "", []), tok) == answer  # re-derived from the text alone
            if ex.task != "vt":  # three keys, one asked at a time: the follow-ups ask the others first
                seen.append(answer)
            seq = prompt + a_ids + s.end_ids
            want += a_ids + s.end_ids
            asked += 1
        assert len(seq) <= 257 and x_BT[b, :len(seq) - 1].tolist() == seq[:-1]
        kept = y_BT[b][y_BT[b] != IGNORE].tolist()
        assert kept == want  # exactly the answers and their newlines are supervised
        if ex.task != "vt":
            assert len(set(seen[:3])) == len(seen[:3])
        if ex.task in ("mk-niah", "kv-niah"):  # each question is the asked key's own left-hand side, as in the needle
            sep = " =" if ex.task == "mk-niah" else ""
            assert all(tok.decode(q) == f"\n{tok.decode(q).split()[0]}{sep}" for q, _ in follow)
    assert asked >= 5 * follow_ups  # the reserve leaves room for the follow-ups in (nearly) every document
    # the first question of every document is the evaluation's form, and follow_ups=0 is the plain sampler
    plain = TaskSampler(tok, d.train, length=257, seq_len=256, batch_size=6, pad_id=d.pad_id, seed=1,
                        drop_ids=(d.eos_id, d.pad_id), pairs=3, queries=1)
    assert all(len(f) == 0 for _, f in plain.documents_at(2))
    with pytest.raises(ValueError, match="follow-up questions keep"):
        TaskSampler(tok, d.train, length=257, seq_len=256, batch_size=2, pad_id=d.pad_id, follow_ups=2,
                    pairs=8, queries=4).batch_at(0)


def test_follow_ups_need_answer_supervision(models, tmp_path, capsys):
    argv = ["probe", "ruler-finetune", "--models", str(models["dirs"][0]), "--steps", "1", "--out", str(tmp_path),
            "--no-progress", "--follow-ups", "2"]
    assert main(argv) != 0
    assert "--follow-ups" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    plan = F.Plan(R.DEFAULT_TASKS, 128, 4, (0,), 4, 0, dict(pairs=2, queries=1, hops=1), supervise="answer",
                  follow_ups=2)
    cfg = F.finetune_config(models["dirs"][0], None, seed=0, steps=4)
    assert F.task_sampler_factory(models["data"], plan, cfg)(0, 0).follow_ups == 2
