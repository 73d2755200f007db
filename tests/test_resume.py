"""Resume is exact and honest: the run's own config, reported changes only, checkpoint fallback, NaN stops."""

import json

import pytest
import torch

import engram.train.trainer as trainer_mod
from engram.cli import main
from engram.config import ConfigError
from engram.model import EngramLM
from engram.train.checkpoint import CheckpointError, latest_checkpoint
from engram.train.run import read_metrics
from engram.train.trainer import Trainer, TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = ["train.steps=24", "train.ckpt_every=8", "train.eval_every=8", "train.dtype='float32'",
             "train.threads=1", "data.vocab_size=512"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_corpus):
    from engram.data import prepare_data

    base = tmp_path_factory.mktemp("resume")
    corpus = make_corpus(base / "corpus")
    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)
    out = {"base": base, "corpus": corpus, "cache": base / "cache", "data": data}
    Trainer(cfg_for(out), base / "ref", data=data, progress=False).train()
    out["want"] = losses(base / "ref")
    assert sorted(out["want"]) == list(range(1, 25))
    return out


def cfg_for(env, extra=()):
    from engram.train.config import apply_overrides, run_preset

    return apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(env['corpus'])]!r}", *extra])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def stop_after(tr: Trainer, step: int) -> Trainer:
    """Make ``tr.train()`` stop (and checkpoint) after ``step`` steps, as Ctrl-C would."""
    real = tr.sampler.next

    def nxt():
        batch = real()
        tr._stop = tr.sampler.step >= step
        return batch

    tr.sampler.next = nxt
    return tr


def resume(env, run, cfg=None, **kw) -> Trainer:
    return Trainer(cfg, run, resume=True, data=env["data"], progress=False, **kw)


def test_corrupt_latest_checkpoint_falls_back_with_a_notice_and_stays_exact(env, tmp_path):
    run = tmp_path / "run"
    res = stop_after(Trainer(cfg_for(env), run, data=env["data"], progress=False), 20).train()
    assert res.status == "interrupted" and res.step == 20
    pt = latest_checkpoint(run / "ckpt").with_suffix(".pt")
    assert pt.name == "step-0000020.pt" and (run / "ckpt" / "step-0000016.pt").is_file()  # the last two kept
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0x01
    pt.write_bytes(bytes(data))
    (run / "ckpt" / "step-0000024.pt").write_bytes(b"torn")  # a later save killed before its manifest
    tr = resume(env, run)
    assert tr.step == 16
    assert any("step-0000024.pt: no manifest" in n for n in tr.notices)
    assert any("step-0000020.pt" in n and "corrupted" in n and "step-0000016" in n for n in tr.notices)
    assert tr.train().status == "finished"
    assert losses(run) == env["want"]  # bit-identical to the uninterrupted run, every step


def test_a_stop_during_the_last_step_finishes_and_a_resume_at_the_end_reports_the_final_loss(env, tmp_path):
    """Ctrl-C that lands after the last step's work (say, in its evaluation) leaves a finished run, not an
    interrupted one; and resuming a run whose checkpoint is its last step trains nothing but still reports the
    final model's validation loss (a sweep's result needs it)."""
    run = tmp_path / "run"
    res = stop_after(Trainer(cfg_for(env), run, data=env["data"], progress=False), 24).train()
    assert res.status == "finished" and res.step == 24 and res.val_loss is not None
    again = resume(env, run).train()
    assert again.status == "finished" and again.step == 24 and again.val_loss == res.val_loss
    assert losses(run) == env["want"]


def test_dtype_auto_is_resolved_once_and_reused(env, tmp_path, monkeypatch):
    """The probe may answer differently on the next start (another load, another machine): the run keeps its dtype."""
    real = trainer_mod.resolve_dtype
    monkeypatch.setattr(trainer_mod, "resolve_dtype", lambda n, d="cpu": "float32" if n == "auto" else real(n, d))
    run = tmp_path / "run"
    stop_after(Trainer(cfg_for(env, ["train.dtype='auto'"]), run, data=env["data"], progress=False), 12).train()
    rec = json.loads((run / "resolved.json").read_text())
    assert rec["requested"]["train"]["dtype"] == "auto"
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "float32"
    monkeypatch.setattr(trainer_mod, "resolve_dtype", lambda n, d="cpu": "bfloat16" if n == "auto" else real(n, d))
    tr = resume(env, run, cfg_for(env, ["train.dtype='auto'"]))  # the same command line as the first start
    assert tr.cfg.train.dtype == "float32" and tr.notices == [] and tr.step == 12
    tr.train()
    assert losses(run) == env["want"]


def test_killed_before_the_first_checkpoint_restarts_from_step_0(env, tmp_path):
    run = tmp_path / "run"
    Trainer(cfg_for(env), run, data=env["data"], progress=False)  # started, then killed: no checkpoint
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n{"kind": "tr')  # torn line
    tr = resume(env, run)
    assert tr.step == 0 and any("no checkpoint yet" in n and "step 0" in n for n in tr.notices)
    tr.train()
    assert losses(run) == env["want"]


def test_resume_changes_only_what_may_change_and_reports_it(env, tmp_path):
    run = tmp_path / "run"
    Trainer(cfg_for(env, ["train.steps=8"]), run, data=env["data"], progress=False).train()
    for bad, msg in [("train.lr=0.01", "train.lr is 0.003 in the run, asked 0.01"),
                     ("train.dtype='bfloat16'", "train.dtype is 'float32'"),
                     ("train.threads=0", "train.threads is 1 in the run, asked 0"),
                     ("model.n_layers=3", "model.n_layers is 2")]:
        with pytest.raises(ConfigError, match=msg):
            resume(env, run, cfg_for(env, ["train.steps=8", bad]))
    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match="train.steps=4 is below the step of the checkpoint"):
        resume(env, run, cfg_for(env, ["train.steps=4"]))
    assert (run / "config.json").read_text() == before  # a refused resume writes nothing
    tr = resume(env, run, cfg_for(env, ["train.steps=12", "train.eval_every=4"]))
    assert tr.notices == ["--resume changes train.eval_every: 8 -> 4", "--resume changes train.steps: 8 -> 12"]
    assert tr.train().step == 12
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 12  # the run's record follows
    assert json.loads((run / "meta.json").read_text())["starts"][-1]["changes"] == [n.split("changes ")[1]
                                                                                 for n in tr.notices]
    assert resume(env, run).cfg.train.steps == 12  # and a plain --resume keeps it
    # The finished run's model directory is checksummed, its tokenizer included.
    listed = json.loads((run / "model" / "checksums.json").read_text())["files"]
    assert "model.safetensors" in listed and any(k.startswith("tokenizer") for k in listed)
    EngramLM.from_pretrained(run / "model")


def test_resume_needs_a_run_and_the_same_data(env, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: nothing to resume"):
        resume(env, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no run"):
        resume(env, tmp_path / "empty")
    run = tmp_path / "run"
    Trainer(cfg_for(env, ["train.steps=8"]), run, data=env["data"], progress=False).train()
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        Trainer(cfg_for(env), run, data=env["data"], progress=False)
    rec = json.loads((run / "resolved.json").read_text())
    rec["data"]["corpus_fingerprint"] = "0" * 64
    (run / "resolved.json").write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match="data differ.*corpus_fingerprint"):
        resume(env, run)


def _cli(env, run, *extra):
    argv = ["train", "--run-dir", str(run), "--no-progress", "--data", str(env["corpus"])]
    for ov in OVERRIDES:
        argv += ["--set", ov]
    return argv + list(extra)


def test_cli_resume_errors_and_reports(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE", str(env["cache"]))
    assert main(["train", "--run-dir", str(tmp_path / "nope"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: --resume:") and "nothing to resume" in err and err.count("\n") == 1
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(_cli(env, run, "--set", "train.steps=8")) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "--preset", "demo"]) == 2
    assert "started with --preset debug, not demo" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "model.d_model=32"]) == 2
    assert "cannot change model.d_model is 64 in the run, asked 32" in capsys.readouterr().err
    # The same command line again (--preset equal to the run's own) plus a longer run: accepted, reported.
    assert main(_cli(env, run, "--preset", "debug", "--set", "train.steps=10", "--resume", "--no-progress")) == 0
    out = capsys.readouterr()
    assert "--resume changes train.steps: 8 -> 10" in out.err and "finished at step 10" in out.out


def _poison(monkeypatch, when):
    real = EngramLM.forward

    def forward(self, *a, **kw):
        out = real(self, *a, **kw)
        if out.loss is not None and when(self):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(EngramLM, "forward", forward)


def test_cli_nan_training_loss_exits_nonzero_with_step_and_cause(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE", str(env["cache"]))
    _poison(monkeypatch, lambda m: m.training)
    assert main(_cli(env, tmp_path / "run")) == 3
    out = capsys.readouterr()
    assert out.err.startswith("engram: error: training diverged: training loss became nan at step 1 ")
    assert "likely cause: non-finite values from the very first step" in out.err
    assert "last good checkpoint: none" in out.err and out.out == ""


def test_nan_validation_loss_stops_before_the_checkpoint(env, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda m: not m.training)
    tr = Trainer(cfg_for(env), tmp_path / "run", data=env["data"], progress=False)
    with pytest.raises(TrainingDiverged, match=r"validation loss became nan at step 8 .*likely cause: weights"):
        tr.train()
    assert latest_checkpoint(tmp_path / "run" / "ckpt") is None  # nothing saved with a non-finite evaluation


def test_non_finite_weights_are_never_checkpointed(env, tmp_path):
    run = tmp_path / "run"
    tr = Trainer(cfg_for(env, ["train.eval_every=100"]), run, data=env["data"], progress=False)
    real = tr.opt.step

    def step(*a, **kw):
        real(*a, **kw)
        if tr.step == 15:  # the update of step 16 leaves a weight infinite; its loss was still finite
            with torch.no_grad():
                tr.model.tok_emb.weight[0, 0] = float("inf")

    tr.opt.step = step
    with pytest.raises(TrainingDiverged, match=r"parameter tok_emb.weight became non-finite at step 16 .*"
                                               r"step-0000008.pt"):
        tr.train()
    assert json.loads(latest_checkpoint(run / "ckpt").read_text())["step"] == 8


def test_a_checkpoint_written_before_a_config_field_was_added_still_matches():
    from engram.train.checkpoint import config_diffs, with_defaults
    from engram.train.config import run_preset

    now = run_preset("debug").to_dict()
    old = run_preset("debug").to_dict()
    del old["model"]["engram"]["flavour"], old["train"]["init_from"]  # fields added after it was written
    assert config_diffs(old, now, ("model", "train"))  # compared raw, they differ
    assert config_diffs(with_defaults(old), now, ("model", "train")) == []
    old["train"]["lr"] = 1.0
    assert config_diffs(with_defaults(old), now, ("model", "train")) == ["train.lr: checkpoint 1.0 vs now 0.003"]
