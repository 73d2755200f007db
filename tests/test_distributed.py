"""Row-sharded Engram tables on 1, 2 and 3 ranks (gloo, real processes) against the single-process model.

Each world runs ``tests/distributed_worker.py`` once per rank (a world of one in this process) and the
tests assert on what the ranks report. What must hold, and how exactly:

* rows, logits, generated ids (greedy and sampled) and the evaluation loss: bit for bit, both exchanges,
  fp32 and bf16 tables, uneven shards, from the weights file and from a store;
* gradients after one backward, split batches (rank r: its B/W sequences, loss scaled by 1/W; backbone
  gradients summed over the ranks): within ``GRAD_TOL`` of the largest gradient (only the order of the
  fp32 additions differs);
* parameters after three SparseRowAdam (tables) + AdamW (backbone) steps: within ``PARAM_TOL``, far below
  what the steps moved them.

Every rank runs with one thread, as the references here do (CPU kernels may round differently with
another thread count).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import engram
from engram.config import ConfigError
from engram.distributed import check_budget, row_bounds, row_range

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
GRAD_TOL = 1e-5  # relative to the largest gradient entry
PARAM_TOL = 2e-5  # absolute, after 3 steps of lr 1e-2 (tables) and 1e-3 (backbone)
LAUNCH_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``argv`` (a command line) as ``world`` ranks of one gloo process group; fail with their stderr."""
    port = _free_port()
    src = str(Path(engram.__file__).parent.parent)
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for r, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{err[-3000:]}"


def _run_worker(world: int, mode: str, out: Path, *extra: str) -> None:
    if world == 1:  # in this process: the same code, without process group
        sys.path.insert(0, str(HERE))
        import distributed_worker

        distributed_worker.main([mode, str(out), *extra])
    else:
        launch(world, [sys.executable, str(WORKER), mode, str(out), *extra])


_WORLDS = [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    """``provider(world)``: every rank's report of the provider checks (run once per world)."""
    done: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in done:
            out = tmp_path_factory.mktemp(f"provider{world}")
            _run_worker(world, "provider", out)
            done[world] = [json.loads((out / f"provider-rank{r}.json").read_text()) for r in range(world)]
        return done[world]

    return get


@pytest.mark.parametrize("world", _WORLDS)
@pytest.mark.parametrize("exchange", ["all_to_all", "masked"])
def test_sharded_model_matches_the_single_process_model(provider, world, exchange):
    reports = [rep[exchange] for rep in provider(world)]
    for r, rep in enumerate(reports):
        for dtype in ("float32", "bfloat16"):
            assert rep[f"logits_equal_{dtype}"], (r, dtype)
            assert rep[f"idle_logits_equal_{dtype}"], (r, dtype)  # the last rank idles, the others compute
        assert rep["grad_backbone_max_diff"] <= GRAD_TOL * rep["grad_backbone_max_abs"], rep
        assert rep["grad_table_max_diff"] <= GRAD_TOL * rep["grad_table_max_abs"], rep
        assert rep["param_backbone_max_diff"] <= PARAM_TOL, rep
        assert rep["param_table_max_diff"] <= PARAM_TOL < rep["param_table_moved"] / 100, rep
    # The shards tile each table in rank order, uneven at 3 ranks (250 and 296 rows are not multiples of 3).
    for layer in reports[0]["shard_rows"]:
        spans = [rep["shard_rows"][layer] for rep in reports]
        rows = spans[-1][1]
        assert spans == [list(row_range(rows, world, r)) for r in range(world)]
        assert world < 3 or rows % 3


@pytest.mark.parametrize("world", _WORLDS)
@pytest.mark.parametrize("exchange", ["all_to_all", "masked"])
@pytest.mark.parametrize("case", ["duplicates", "one_owner", "empty_on_last", "owner_of_nothing"])
def test_provider_rows_and_gradients_are_exact(provider, world, exchange, case):
    """Duplicate ids, ids owned by rank 0 alone (the other ranks receive none), an empty batch on the last
    rank, and a 4-row table on 3 ranks (the last owns no row): exact rows, gradients summed in fp32."""
    reports = [rep[exchange] for rep in provider(world)]
    for r, rep in enumerate(reports):
        for dtype in ("float32", "bfloat16"):
            assert rep[f"{case}_{dtype}_rows_equal"], (r, dtype)
        assert rep[f"{case}_float32_grad_max_diff"] <= 2e-6, rep
    owned = [rep[f"{case}_float32_owned_rows"] for rep in reports]
    assert sum(owned) == (4 if case == "owner_of_nothing" else 107)
    if case == "owner_of_nothing" and world == 3:
        assert owned[-1] == 0


# ------------------------------------------------------------------------------------------ serving
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    """A saved uneven model, its store, and its single-process outputs; ``served.run(world)`` the sharded ones."""
    sys.path.insert(0, str(HERE))
    from distributed_worker import uneven_model
    from engram.model import generate
    from engram.serve import export_tables

    root = tmp_path_factory.mktemp("served")
    model = uneven_model("bfloat16").eval()
    model_dir = model.save_pretrained(root / "model")
    store_dir = export_tables(model_dir, root / "store")
    idx, prompt = tiny.ids(), tiny.ids(2, 5, seed=3)
    batches = [(tiny.ids(3, 10, seed=s), tiny.ids(3, 10, seed=s + 100)) for s in range(4)]
    batches[1][1][0, :3] = -100
    with torch.no_grad():
        total = n = 0
        for x, y in batches:
            k = int((y != -100).sum())
            total += float(model(x, y).loss) * k
            n += k
        ref = {"logits": model(idx).logits, "greedy": generate(model, prompt, 8, temperature=0),
               "sampled": generate(model, prompt, 8, temperature=0.9, top_k=10,
                                   generator=torch.Generator().manual_seed(7)),
               "loss": total / n}
    done: dict[int, dict] = {}

    def run(world: int) -> dict:
        if world not in done:
            out = tmp_path_factory.mktemp(f"serve{world}")
            _run_worker(world, "serve", out, str(model_dir), str(store_dir))
            done[world] = torch.load(out / "serve.pt")
        return done[world]

    class Served:
        pass

    s = Served()
    s.model, s.model_dir, s.store_dir, s.ref, s.run = model, model_dir, store_dir, ref, run
    return s


@pytest.mark.parametrize("world", _WORLDS)
def test_sharded_serving_is_bit_identical(served, world):
    got = served.run(world)
    assert sorted(got) == [f"{src}-{ex}" for src in ("store", "weights") for ex in ("all_to_all", "masked")]
    for key, out in got.items():
        assert torch.equal(out["logits"], served.ref["logits"]), key
        assert torch.equal(out["greedy"], served.ref["greedy"]), key
        assert torch.equal(out["sampled"], served.ref["sampled"]), key
        assert out["loss"] == served.ref["loss"], key  # 4 batches: at 3 ranks, ranks 1 and 2 idle once
        # rank 0's rows of both tables, [R, 8] bf16 each: the largest share, about 1/world of the whole
        assert out["nbytes"] == sum(row_range(n, world, 0)[1] * 8 * 2 for n in (250, 296))


def test_a_budget_too_small_is_refused_before_loading(served, monkeypatch):
    from engram.distributed import serve

    def never(*a, **kw):
        raise AssertionError("read a table despite the budget")

    monkeypatch.setattr(serve, "fill_shards", never)
    total = sum(t.numel() * t.element_size() for t in served.model.engram_parameters())
    with pytest.raises(ConfigError, match="use at least 3 ranks"):
        serve.load_sharded(served.model_dir, budget_bytes=total // 3 + 64)


def test_a_store_of_other_tables_is_refused(served, tmp_path):
    """Same backbone, other table rows: the store passes the backbone check and fails the per-rank one."""
    from distributed_worker import uneven_model
    from engram.distributed.serve import load_sharded
    from engram.serve import export_tables

    other = uneven_model("bfloat16").eval()  # the served model's weights, tables moved
    with torch.no_grad():
        for p in other.engram_parameters():
            p.add_(1.0)
    store = export_tables(other, tmp_path / "other")
    with pytest.raises(ValueError, match="does not hold the tables"):
        load_sharded(served.model_dir, store)


# ------------------------------------------------------------------------------------------ sharding rule
@given(rows=st.integers(0, 5000), world=st.integers(1, 40), data=st.data())
def test_row_ranges_are_dtensor_shard0_chunks(rows, world, data):
    """The ranges tile [0, rows) in rank order with torch.chunk's sizes (what DTensor's Shard(0) gives each
    rank, ranks past the last chunk getting none), and an id's owner is the rank whose range holds it."""
    bounds = row_bounds(rows, world)
    assert bounds[0] == 0 and bounds[-1] == rows and bounds == sorted(bounds)
    sizes = [t.numel() for t in torch.empty(rows).chunk(world)] if rows else []
    assert [b - a for a, b in zip(bounds, bounds[1:], strict=False)] == sizes + [0] * (world - len(sizes))
    for r in range(world):
        assert row_range(rows, world, r) == (bounds[r], bounds[r + 1])
    if rows:
        ids = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=50)))
        owner = torch.searchsorted(torch.tensor(bounds), ids, right=True) - 1
        c = math.ceil(rows / world)
        assert torch.equal(owner, ids // c)
        for i, o in zip(ids.tolist(), owner.tolist(), strict=True):
            assert bounds[o] <= i < bounds[o + 1]


@given(sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=4), world=st.integers(1, 16),
       budget=st.integers(1, 200_000))
def test_the_budget_error_names_the_smallest_world_that_fits(sizes, world, budget):
    """The named world is the smallest that fits; with a budget under one 16-byte row per table none does."""
    heads = {i: (s,) for i, s in enumerate(sizes)}

    def fits(w):
        return sum(row_range(s, w, 0)[1] * 4 * 4 for s in sizes) <= budget

    if fits(world):
        check_budget(heads, 4, torch.float32, world, budget)
        return
    with pytest.raises(ConfigError) as e:
        check_budget(heads, 4, torch.float32, world, budget)
    w = next((w for w in range(world + 1, max(sizes) + 2) if fits(w)), None)
    assert (f"use at least {w} ranks" if w else "one row per rank does not fit") in str(e.value)


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A model directory with a BPE tokenizer, its store, a corpus and a data cache (for the commands)."""
    import numpy as np

    from engram.config import EngramConfig, ModelConfig
    from engram.data.bpe import train_bpe
    from engram.model import EngramLM
    from engram.serve import export_tables
    from engram.tokenizer.compression import CompressedVocab

    root = tmp_path_factory.mktemp("cli")
    text = " ".join(f"the cat {w} sat on the mat number {i % 17}." for i, w in enumerate(["a", "b", "c"] * 60))
    tok = train_bpe([text] * 4, vocab_size=300)
    tdir = root / "model" / "tokenizer"
    tdir.mkdir(parents=True)
    (tdir / "tokenizer.json").write_text(tok.to_str())
    (tdir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    eng = EngramConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1],
                       pad_id=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, mlp_hidden=48,
                      max_seq_len=64, engram=eng)
    EngramLM(cfg, CompressedVocab(np.arange(tok.get_vocab_size()) % 200)).save_pretrained(root / "model")
    export_tables(root / "model", root / "store")
    (root / "corpus").mkdir()
    for i in range(30):
        (root / "corpus" / f"doc{i}.txt").write_text(text[i * 40:] + f" document {i}\n" * 20)
    return root


def _engram(root: Path, *args: str, world: int = 1) -> subprocess.CompletedProcess:
    src = str(Path(engram.__file__).parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENGRAM_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # torchrun's documented form: torchrun --standalone --nproc_per_node=N -m engram ...
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    return subprocess.run([sys.executable, *launcher, "-m", "engram", *args], env=env, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.slow
def test_torchrun_generate_and_eval_print_the_single_process_outputs(cli_model):
    model, store = str(cli_model / "model"), str(cli_model / "store")
    gen = ["generate", "--model", model, "--prompt", "the cat sat", "--max-new-tokens", "6", "--temperature", "0"]
    ev = ["eval", "--model", model, "--data", str(cli_model / "corpus"), "--batch-size", "2", "--seq-len", "16",
          "--eval-tokens", "160", "--json"]
    one = [_engram(cli_model, *gen), _engram(cli_model, *ev)]
    two = [_engram(cli_model, *gen, world=2), _engram(cli_model, *ev, "--store", store, world=2)]
    for res in (*one, *two):
        assert res.returncode == 0, res.stderr[-3000:]
    assert two[0].stdout == one[0].stdout and one[0].stdout.strip()  # rank 0 alone printed it
    want, got = json.loads(one[1].stdout), json.loads(two[1].stdout)
    assert got["val_loss"] == want["val_loss"] and got["tokens"] == want["tokens"] > 0  # 5 batches on 2 ranks
    assert got["world_size"] == 2 and got["memory"] == "sharded"


def test_cli_sharded_options_are_checked(cli_model, capsys, monkeypatch):
    from engram.cli import main

    monkeypatch.setenv("ENGRAM_CACHE", str(cli_model / "cache"))
    gen = ["generate", "--model", str(cli_model / "model"), "--prompt", "the cat", "--max-new-tokens", "3",
           "--temperature", "0"]
    assert main(gen) == 0
    plain = capsys.readouterr().out
    assert main([*gen, "--memory", "sharded", "--store", str(cli_model / "store")]) == 0
    assert capsys.readouterr().out == plain  # a world of one
    assert main([*gen, "--memory", "sharded", "--memory-budget-gb", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: a world of 1 rank(s) cannot hold") and "use at least" in err
    assert main([*gen, "--memory", "ram", "--memory-budget-gb", "1"]) == 2
    assert "--memory-budget-gb applies to --memory sharded" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: a whole-table memory on every rank is refused
    assert main([*gen, "--memory", "ram"]) == 2
    assert "--memory sharded" in capsys.readouterr().err
