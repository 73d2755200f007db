"""`engram compare` end to end on a tiny MoE: iso-parameter variants, same data, table and plot."""

import json

import pytest

from engram.train.compare import run_compare, variants
from engram.train.config import apply_overrides, run_preset

TINY_MOE = ["model.n_routed_experts=6", "model.moe_top_k=2", "model.expert_hidden=32", "model.first_dense_layers=1",
            "train.steps=6", "train.eval_every=3", "train.ckpt_every=6", "train.dtype='float32'", "train.threads=1",
            "data.vocab_size=512"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus):
    return make_corpus(tmp_path_factory.mktemp("compare") / "corpus", n_files=20)


def tiny(corpus):
    return apply_overrides(run_preset("debug"), TINY_MOE + [f"data.data={[str(corpus)]!r}"])


def test_variants_are_iso_parameter(corpus):
    from engram.model.params import count_params

    v = variants(tiny(corpus), n_experts_moved=2)
    moe, eng = count_params(v["moe"].model), count_params(v["engram"].model)
    assert v["moe"].model.engram is None and moe["memory"] == 0
    assert v["engram"].model.n_routed_experts == 4 and eng["memory"] > 0
    assert abs(eng["total"] - moe["total"]) / moe["total"] < 0.01  # equal totals, up to prime rounding
    assert v["engram"].train == v["moe"].train  # same token budget, schedule and seed
    with pytest.raises(ValueError, match="n_experts_moved"):
        variants(tiny(corpus), n_experts_moved=5)  # would leave fewer experts than top-k


def test_compare_end_to_end(corpus, tmp_path):
    lines, base = [], tiny(corpus)
    summary = run_compare(base, tmp_path / "cmp", n_experts_moved=2, seeds=(0, 1), progress=False,
                          cache_dir=tmp_path / "cache", out=lines.append)
    rows = summary["rows"]
    assert [(r["model"], r["seed"]) for r in rows] == [("moe", 0), ("engram", 0), ("moe", 1), ("engram", 1)]
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] == 6 * 4 * 64
    for s in (0, 1):
        by = {r["model"]: r["val_loss"] for r in rows if r["seed"] == s}
        assert summary["gain_by_seed"][s] == pytest.approx(by["moe"] - by["engram"])
    # Different seeds really are different runs; each run dir records its resolved config.
    assert rows[0]["val_loss"] != rows[2]["val_loss"]
    cfg = json.loads((tmp_path / "cmp" / "engram-seed1" / "config.json").read_text())
    assert cfg["train"]["seed"] == 1 and cfg["model"]["engram"] is not None and cfg["train"]["dtype"] == "float32"
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert base == tiny(corpus)  # the caller's config is not touched by either run
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["rows"] == rows
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("| moe |") == 2 and table.count("| engram |") == 2
    assert any("Engram - MoE validation loss" in line for line in lines)
