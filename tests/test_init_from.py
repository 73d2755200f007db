"""train.init_from: a new run starts from a saved model's weights (fine-tuning); mismatches are refused."""

import json

import pytest
import torch

from engram.config import ConfigError
from engram.model import EngramLM
from engram.train.config import apply_overrides, run_preset
from engram.train.run import read_metrics
from engram.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = ["train.ckpt_every=4", "train.eval_every=4", "train.dtype='float32'", "train.threads=1",
             "data.vocab_size=512"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, make_corpus):
    """A debug model trained for 6 steps (the model to fine-tune) and the corpus and token cache it used."""
    base = tmp_path_factory.mktemp("init_from")
    corpus = make_corpus(base / "corpus")
    cfg = apply_overrides(run_preset("debug"), OVERRIDES + ["train.steps=6", f"data.data={[str(corpus)]!r}"])
    Trainer(cfg, base / "src", progress=False, cache_dir=str(base / "cache")).train()
    return {"base": base, "corpus": corpus, "cache": str(base / "cache"), "model": base / "src" / "model"}


def _cfg(source, *extra):
    return apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(source['corpus'])]!r}",
                                                             f"train.init_from={str(source['model'])!r}", *extra])


def _trainer(source, run_dir, cfg=None, **kw):
    return Trainer(cfg or _cfg(source, "train.steps=8"), run_dir, progress=False, cache_dir=source["cache"], **kw)


def test_step_zero_weights_are_the_source_models(source, tmp_path):
    src = EngramLM.from_pretrained(source["model"]).state_dict()
    tr = _trainer(source, tmp_path / "run")
    now = tr.model.state_dict()
    assert now.keys() == src.keys()
    for k, v in src.items():
        assert torch.equal(now[k], v), k
    fresh = Trainer(apply_overrides(_cfg(source), ["train.init_from=None"]), tmp_path / "fresh", progress=False,
                    cache_dir=source["cache"])
    assert any(not torch.equal(fresh.model.state_dict()[k], v) for k, v in src.items())  # not by coincidence
    assert not tr.opt.state and not tr.table_opt.state_dict()["state"]  # the optimizer starts fresh
    # data.tokenizer was None: the model's saved tokenizer is adopted, said, and recorded with init_from
    assert any("data.tokenizer is the model's own" in n for n in tr.notices)
    rec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rec["train"]["init_from"] == str(source["model"])
    assert rec["data"]["tokenizer"] == str(source["model"] / "tokenizer")


def test_first_loss_is_the_source_models_loss(source, tmp_path):
    """Step 1's loss is measured before the update: a fine-tune starts where the source model is, far below a
    fresh model's first loss."""
    losses = {}
    for name, extra in (("tuned", []), ("fresh", ["train.init_from=None"])):
        _trainer(source, tmp_path / name, apply_overrides(_cfg(source, "train.steps=1"), extra)).train()
        losses[name] = next(r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                            if r["kind"] == "train")
    src_final = [r for r in read_metrics(source["model"].parent / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert losses["tuned"] < losses["fresh"] - 0.05
    assert abs(losses["tuned"] - src_final["loss"]) < 0.5  # one more batch of the same corpus


@pytest.mark.parametrize(("override", "field"), [
    ("model.d_model=32", "model.d_model"),
    ("model.engram.layer_ids=[1]", "model.engram.layer_ids"),
    ("model.engram=None", "model.engram"),
    ("data.vocab_size=300", "data.tokenizer"),  # a tokenizer trained anew is not the model's
])
def test_a_mismatch_is_refused_before_anything_is_written(source, tmp_path, override, field):
    cfg = _cfg(source, override)
    if field == "data.tokenizer":
        from engram.data import prepare_data

        other = prepare_data([str(source["corpus"])], None, vocab_size=300, cache_dir=str(tmp_path), progress=False)
        cfg = apply_overrides(cfg, [f"data.tokenizer={other.tokenizer_spec!r}"])
    with pytest.raises(ConfigError, match=f"train.init_from: .*differing fields: .*{field}"):
        _trainer(source, tmp_path / "run", cfg)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_missing_model_is_a_config_error(source, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        _trainer(source, tmp_path / "run", apply_overrides(_cfg(source), [f"train.init_from={str(tmp_path)!r}",
                                                                          "data.tokenizer=None"]))
    with pytest.raises(ConfigError, match="train.init_from"):
        apply_overrides(_cfg(source), ["train.init_from=''"])


def test_a_resumed_fine_tune_continues_from_its_checkpoint(source, tmp_path):
    """init_from only seeds step 0: stopping at a checkpoint and resuming logs the uninterrupted run's losses."""
    _trainer(source, tmp_path / "whole").train()
    _trainer(source, tmp_path / "split", _cfg(source, "train.steps=4")).train()
    tr = Trainer(apply_overrides(_cfg(source), ["train.steps=8"]), tmp_path / "split", resume=True, progress=False,
                 cache_dir=source["cache"])
    assert tr.step == 4
    tr.train()

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]

    assert losses("split") == losses("whole") and len(losses("whole")) >= 2
