"""--device: resolution and its errors, the record in the run directory, and the deferred reads of a
training step on an accelerator (exercised on the CPU by forcing them; the sync check itself needs CUDA)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.cli import main
from engram.config import UserError
from engram.train.config import apply_overrides, run_preset
from engram.train.probe import resolve_device
from engram.train.run import read_metrics
from engram.train.trainer import Trainer, TrainingDiverged

OVERRIDES = ["train.dtype='float32'", "train.threads=1", "data.vocab_size=512", "train.eval_every=8",
             "train.ckpt_every=8", "train.log_every=4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_corpus):
    base = tmp_path_factory.mktemp("device")
    corpus = make_corpus(base / "corpus")
    from engram.data import prepare_data

    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)
    return {"corpus": corpus, "data": data}


def cfg_for(env, extra=()):
    return apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(env['corpus'])]!r}", *extra])


def train_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that claims two CUDA devices (only resolution is asked of them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# -- resolution ----------------------------------------------------------------------------------------
def test_cpu_and_auto_without_cuda(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")


def test_cuda_without_cuda_says_so(no_cuda):
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(UserError, match=f"--device {spec}: .* sees no CUDA device.*--device cpu"):
            resolve_device(spec)


def test_auto_and_cuda_pick_an_indexed_device(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 50))
def test_cuda_index_checked_against_the_device_count(index):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 2)
        if index < 2:
            assert resolve_device(f"cuda:{index}") == torch.device("cuda", index)
        else:
            with pytest.raises(UserError, match=r"this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
                resolve_device(f"cuda:{index}")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "mps0", "cuda 1", ""])
def test_a_spelling_that_names_no_device(spec, two_gpus):
    if spec == "":  # empty means the default
        assert resolve_device(spec) == torch.device("cuda", 0)
        return
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


# -- the command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--device", "cuda"],
    ["compare", "--device", "cuda:1"],
    ["generate", "--model", "MODEL", "--prompt", "x", "--device", "cuda"],
    ["eval", "--model", "MODEL", "--device", "cuda"],
])
def test_cli_refuses_a_missing_gpu_in_one_line(argv, no_cuda, tmp_path, capsys, trained):
    argv = [str(trained) if a == "MODEL" else a for a in argv]
    if argv[0] in ("train", "compare"):
        argv += ["--run-dir" if argv[0] == "train" else "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engram: error: --device cuda") and "sees no CUDA device" in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("argv", [["generate", "--prompt", "x"], ["eval"]])
def test_sharded_serving_stays_on_the_cpu(argv, two_gpus, capsys, trained):
    assert main([argv[0], "--model", str(trained), *argv[1:], "--memory", "sharded", "--device", "cuda:1"]) == 2
    assert "--memory sharded runs on the CPU for now" in capsys.readouterr().err


def test_sharded_training_stays_on_the_cpu(two_gpus, tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--memory-budget-gb", "1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "row-sharded trainer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_generate_on_the_cpu(trained, no_cuda, capsys):
    args = ["generate", "--model", str(trained), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]
    assert main([*args, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert main([*args, "--device", "auto"]) == 0  # auto without CUDA is the CPU: the same greedy text
    assert capsys.readouterr().out == text and text.startswith("def")


def test_device_help_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--device {auto,cpu,cuda,cuda:N}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """A model directory from a two-step run (what --model takes)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(cfg_for(env, ["train.steps=2"]), run, data=env["data"], progress=False).train()
    return run / "model"


# -- the run directory ---------------------------------------------------------------------------------
def test_the_device_is_recorded_per_start_and_a_resume_may_change_it(env, tmp_path):
    run = tmp_path / "run"
    Trainer(cfg_for(env, ["train.steps=8"]), run, data=env["data"], progress=False, device="cpu").train()
    cfg = cfg_for(env, ["train.steps=12"])
    tr = Trainer(cfg, run, resume=True, data=env["data"], progress=False, device=torch.device("cpu"))
    tr.train()
    meta = json.loads((run / "meta.json").read_text())
    assert [s["device"] for s in meta["starts"]] == ["cpu", "cpu"]
    assert "device" not in json.loads((run / "config.json").read_text())["train"]  # not compared on resume


# -- deferred reads ------------------------------------------------------------------------------------
def test_the_cpu_reads_every_step_at_once(env, tmp_path):
    tr = Trainer(cfg_for(env, ["train.steps=1"]), tmp_path / "run", data=env["data"], progress=False)
    assert tr.defer_reads is False  # the golden curve (tests/test_train.py) pins this path's losses


def test_deferred_reads_log_the_same_steps(env, tmp_path, one_thread, monkeypatch):
    """Forced on the CPU: the same losses and norms, one line per step, one transfer per logging step."""
    steps = 10
    Trainer(cfg_for(env, [f"train.steps={steps}"]), tmp_path / "now", data=env["data"], progress=False).train()
    tr = Trainer(cfg_for(env, [f"train.steps={steps}"]), tmp_path / "later", data=env["data"], progress=False)
    tr.defer_reads = True
    reads = []
    real = tr._read_pending

    def counted():
        reads.append((tr.step, len(tr._pending)))
        real()

    monkeypatch.setattr(tr, "_read_pending", counted)
    tr.train()
    now, later = train_records(tmp_path / "now"), train_records(tmp_path / "later")
    assert [r["step"] for r in later] == list(range(1, steps + 1))
    for a, b in zip(now, later, strict=True):
        assert list(a) == list(b)  # same fields, same order
        assert (a["loss"], a["grad_norm"], a["tokens"], a["lr"]) == (b["loss"], b["grad_norm"], b["tokens"], b["lr"])
    # log_every=4, eval and ckpt every 8, last step 10: reads at 4, 8 (and again before its checkpoint), 10
    assert [s for s, n in reads if n] == [4, 8, 10] and sum(n for _, n in reads) == steps


def test_deferred_nan_is_found_at_the_logging_step(env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = Trainer(cfg_for(env, ["train.steps=20"]), run, data=env["data"], progress=False)
    tr.defer_reads = True
    real = tr.model.forward

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        if tr.model.training and tr.step >= 9:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"training loss became nan at step 10 \(found at logging step 12"
                                               r".*only written from a finite model"):
        tr.train()
    from engram.train.checkpoint import latest_checkpoint

    assert json.loads(latest_checkpoint(run / "ckpt").read_text())["step"] == 8
    assert [r["step"] for r in train_records(run)] == list(range(1, 10))  # the finite steps are logged
    assert not all(torch.isfinite(p).all() for p in tr.model.parameters())  # updated in between ...
    with pytest.raises(TrainingDiverged, match="non-finite"):
        tr.save()  # ... and never saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_does_not_synchronise(env, tmp_path):
    # Dense table gradients: the sparse-row optimizer's row count is data-dependent (a read, by design).
    cfg = cfg_for(env, ["train.steps=8", "train.dtype='bfloat16'", "train.engram_optimizer='dense_adamw'"])
    tr = Trainer(cfg, tmp_path / "run", data=env["data"], progress=False, device=resolve_device("cuda"))
    assert tr.defer_reads

    def step():
        x, y = tr.sampler.next()
        out = tr._train_step(tr._to_device(x), tr._to_device(y))
        tr.step += 1
        return out

    step()  # the first step allocates optimizer state and may pick kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vals = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tr._pending = [{"loss": loss, "grad_norm": g, "step": s + 2} for s, (loss, g) in enumerate(vals)]
    tr._read_pending()
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in tr._pending)


# -- syncs removed from a CUDA step (checked on the CPU and the meta device) ---------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_moe_expert_counts_are_bincounts(E, K, N, seed):
    """The scatter-add that keeps the expert counts on the device counts what bincount counts."""
    from engram.model.moe import MoE

    K = min(K, E)
    torch.manual_seed(seed)
    moe = MoE(d_model=8, n_routed_experts=E, n_shared_experts=0, top_k=K, expert_hidden=4)
    x_BTD = torch.randn(1, N, 8)
    y_BTD, _ = moe(x_BTD)
    _, experts_NK, _ = moe.route(x_BTD.reshape(N, 8))
    want = torch.bincount(experts_NK.reshape(-1), minlength=E)
    assert moe.last_expert_counts.dtype == want.dtype and torch.equal(moe.last_expert_counts, want)
    assert int(want.sum()) == N * K and y_BTD.shape == x_BTD.shape


def test_sparse_row_adam_keeps_its_step_counter_on_the_cpu_after_a_load():
    """The counter is read every step: loaded next to a table on another device, it stays a host value
    (the moments follow the table)."""
    from engram.optim import SparseRowAdam

    p = torch.nn.Parameter(torch.randn(10, 4))
    opt = SparseRowAdam([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (10, 4), check_invariants=True)
        opt.step()
    q = torch.nn.Parameter(torch.empty(10, 4, device="meta"))
    other = SparseRowAdam([q], lr=0.1)
    other.load_state_dict(opt.state_dict())
    state = other.state[q]
    assert state["step"].device.type == "cpu" and int(state["step"]) == 2
    assert state["exp_avg"].device.type == "meta" and state["last_step"].device.type == "meta"
