"""Data-parallel training with row-sharded tables: parity with one process, DCP checkpoints resharded N -> M,
damaged checkpoints, refused configs, and exact resume after kill -9 of one rank.

Multi-process runs are real `torchrun` launches (gloo, CPU) of `engram train`, each bounded by a timeout. The
debug preset is given a table of 3 hash heads (2003 + 2011 + 2017 = 6031 rows) that divides by neither 2 nor 3,
so the shards are uneven.

Tolerances: a world of W ranks sums the same numbers in another order (the loss as a mean of W local means,
DDP's averaged gradients, table gradients summed from W ranks), so its losses match one process to 1e-5
relative and its backbone after 6 steps to 1e-4. Table entries match to 1e-4 but for a few: where a gradient
component sums to nearly zero its sign follows the summation order, and Adam moves it by about the table
learning rate either way (at most 1% of the entries, each within 0.05). One rank, and a resume on the same
world size, are bit-exact.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram.cli import main
from engram.distributed.launch import DistContext
from engram.distributed.trainer import DistTrainer
from engram.model import EngramLM
from engram.train.config import apply_overrides, run_preset
from engram.train.run import read_metrics
from engram.train.trainer import Trainer

# batch 6: divisible by 1, 2 and 3 ranks.
OVERRIDES = ["train.steps=6", "train.ckpt_every=2", "train.eval_every=3", "train.batch_size=6",
             "train.dtype='float32'", "train.threads=1", "data.vocab_size=512", "model.engram.max_ngram_size=4",
             "model.engram.n_head_per_ngram=1", "model.engram.engram_vocab_size=[2003,2003,2003]"]
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4
TABLE_FLIPS, TABLE_ATOL = 0.01, 0.05
TIMEOUT = 240


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_corpus):
    base = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(base / "corpus")
    from engram.data import prepare_data

    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)
    cfg = apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(corpus)]!r}"])
    Trainer(cfg, base / "single", data=data, progress=False).train()
    sub_env = dict(os.environ, ENGRAM_CACHE=str(base / "cache"), PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    return {"base": base, "corpus": corpus, "data": data, "cfg": cfg, "env": sub_env, "runs": {}}


def _cmd(env, n: int, run_dir: Path, *extra) -> list[str]:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n else []
    cmd = [sys.executable, *launch, "-m", "engram", "train", "--preset", "debug", "--no-progress",
           "--run-dir", str(run_dir), "--data", str(env["corpus"])]
    for ov in OVERRIDES:
        cmd += ["--set", ov]
    return cmd + list(extra)


def launch(env, n: int, run_dir: Path, *extra, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(env, n, run_dir, *extra), env=env["env"], capture_output=True, text=True,
                       timeout=TIMEOUT)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def run_on(env, n: int) -> Path:
    """The uninterrupted run on ``n`` ranks (once per module)."""
    if n not in env["runs"]:
        launch(env, n, env["base"] / f"w{n}")
        env["runs"][n] = env["base"] / f"w{n}"
    return env["runs"][n]


def losses(run_dir: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(run_dir / "metrics.jsonl")]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return EngramLM.from_pretrained(run_dir / "model").state_dict()


def assert_close_losses(got, want):
    assert [r[:2] for r in got] == [r[:2] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g[2] == pytest.approx(w[2], rel=LOSS_RTOL), (g, w)


def resumable_copy(src: Path, dst: Path) -> Path:
    """A copy of run ``src`` whose newest checkpoint (step 6) is gone: it resumes from step 4."""
    shutil.copytree(src, dst)
    for p in (dst / "ckpt").glob("step-0000006*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (dst / "ckpt" / "latest.json").unlink()
    return dst


def one_process_run(env) -> Path:
    """The sharded trainer on world 1 without a process group (how a plain `--resume` of a sharded run trains)."""
    run = env["base"] / "w1-no-group"
    if not run.exists():
        DistTrainer(env["cfg"], run, data=env["data"], progress=False).train()
    return run


def test_one_process_sharded_trainer_is_bit_exact(env):
    run = one_process_run(env)
    assert losses(run) == losses(env["base"] / "single")
    want = params(env["base"] / "single")
    assert all(torch.equal(v, want[k]) for k, v in params(run).items())
    assert json.loads((run / "ckpt" / "step-0000006.json").read_text())["format"] == "engram-dcp-1"


@pytest.mark.slow
def test_one_rank_under_torchrun_is_bit_exact(env):
    w1 = run_on(env, 1)
    assert losses(w1) == losses(env["base"] / "single")
    want = params(env["base"] / "single")
    assert all(torch.equal(v, want[k]) for k, v in params(w1).items())


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_ranks_match_single_process(env, n):
    run = run_on(env, n)
    single = env["base"] / "single"
    assert_close_losses(losses(run), losses(single))
    want, got = params(single), params(run)
    assert got.keys() == want.keys()
    for k, v in got.items():
        diff = (v - want[k]).abs()
        if k.endswith("engram.table.weight"):
            assert v.shape[0] % 2 and v.shape[0] % 3  # uneven shards on 2 and 3 ranks
            assert float((diff > PARAM_ATOL).float().mean()) <= TABLE_FLIPS and float(diff.max()) <= TABLE_ATOL, k
        else:
            assert float(diff.max()) <= PARAM_ATOL, k
    # the tolerance is far below what training moves: the last two steps alone move the backbone by more
    step4 = torch.load(single / "ckpt" / "step-0000004.pt", weights_only=True)["model"]
    assert max(float((step4[k] - want[k]).abs().max()) for k in want) > 100 * PARAM_ATOL
    meta = json.loads((run / "meta.json").read_text())
    assert meta["starts"][0]["world_size"] == n
    summary = json.loads((run / "summary.json").read_text())  # counted with the whole tables
    assert summary["params"] == json.loads((single / "summary.json").read_text())["params"]
    man = json.loads((run / "ckpt" / "step-0000006.json").read_text())
    assert man["world_size"] == n and {f"__{r}_0.distcp" for r in range(n)} <= set(man["files"])


@pytest.mark.slow
@pytest.mark.parametrize("src_n,dst_n", [(2, 3), (3, 2), (2, 0), (1, 2)])
def test_reshard_resume(env, tmp_path, monkeypatch, src_n, dst_n):
    """Save on N ranks, resume on M (0: a plain `engram train --resume`, no torchrun; 1 -> 2 starts from the
    single process's .pt checkpoint): the steps after the checkpoint match the run on N ranks."""
    src = env["base"] / "single" if src_n == 1 else run_on(env, src_n)
    run = resumable_copy(src, tmp_path / "run")
    monkeypatch.setenv("ENGRAM_CACHE", env["env"]["ENGRAM_CACHE"])
    if dst_n == 0:
        assert main(_cmd(env, 0, run, "--resume")[3:]) == 0
    else:
        launch(env, dst_n, run, "--resume")
    got, want = losses(run), losses(src)
    assert got[:4] == want[:4]  # kept from the original run up to the checkpoint (step 4)
    assert_close_losses(got, want)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["starts"][-1]["resume"] == "step-0000004"
    assert meta["starts"][-1]["world_size"] == max(1, dst_n)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_same_world_resume_is_exact(env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_on(env, 2), run)
    shard = run / "ckpt" / "step-0000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    p = launch(env, 2, run, "--resume")
    assert "skipped checkpoint step-0000006" in p.stderr and "sha256" in p.stderr
    assert p.stderr.count("skipped checkpoint") == 1  # rank 0 alone speaks
    assert losses(run) == losses(run_on(env, 2))  # same world size: bit for bit


def test_checkpoint_of_another_config_is_refused(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", env["env"]["ENGRAM_CACHE"])
    run = tmp_path / "run"
    shutil.copytree(one_process_run(env), run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["lr"] = 1e-3  # as if the record had been edited by hand
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(_cmd(env, 0, run, "--resume")[3:]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "train.lr" in err
    assert (run / "ckpt" / "step-0000006.json").is_file()  # nothing touched


def test_world_that_cannot_hold_the_tables_or_split_the_batch_is_refused(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", env["env"]["ENGRAM_CACHE"])
    run = tmp_path / "run"
    # the table is 6031 rows of 32 fp32 (0.74 MiB): 0.3 MiB per rank needs 3 ranks (2011 rows each)
    assert main(_cmd(env, 0, run, "--memory-budget-gb", str(0.3 / 1024))[3:]) == 2
    err = capsys.readouterr().err
    assert "cannot hold the Engram tables" in err and "at least 3 ranks" in err, err
    assert not run.exists()
    ctx = DistContext(rank=0, world_size=4, local_rank=0, backend=None)
    with pytest.raises(Exception, match="batch_size=6 does not divide over 4 ranks"):
        DistTrainer(env["cfg"], run, ctx=ctx, data=env["data"], progress=False)
    assert not run.exists()


def _workers(agent_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes of a torchrun agent."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            envs = dict(e.split("=", 1) for e in (d / "environ").read_bytes().decode().split("\0") if "=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in envs:
            out[int(envs["RANK"])] = int(d.name)
    return out


@pytest.mark.slow
def test_kill9_of_one_rank_then_resume_is_exact(env, tmp_path):
    """Rank 0 is paused once step 3 is logged (rank 1 then waits in a collective: it cannot run ahead), rank 1 is
    killed -9, torchrun ends the rest; resuming on 2 ranks gives the uninterrupted run bit for bit."""
    want = losses(run_on(env, 2))
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(env, 2, run), env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and p.poll() is None:
            recs = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
            if any(r["step"] >= 3 for r in recs):
                break
            time.sleep(0.01)
        pids = _workers(p.pid)
        assert set(pids) == {0, 1}
        os.kill(pids[0], signal.SIGSTOP)
        os.kill(pids[1], signal.SIGKILL)
        os.kill(pids[0], signal.SIGCONT)
        assert p.wait(timeout=TIMEOUT) != 0
    finally:
        if p.poll() is None:
            p.kill()
    assert not (run / "model").exists()  # it did not finish
    launch(env, 2, run, "--resume")
    assert losses(run) == want


@pytest.mark.slow
def test_eval_reads_the_model_of_a_sharded_run(env, capsys, monkeypatch):
    """`engram eval` on the model a 2-rank run wrote gives the run's own final validation loss."""
    monkeypatch.setenv("ENGRAM_CACHE", env["env"]["ENGRAM_CACHE"])
    run = run_on(env, 2)
    want = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert main(["eval", "--model", str(run / "model"), "--json", "--batch-size", "6", "--seq-len", "64",
                 "--eval-tokens", "2048", "--data", str(env["corpus"])]) == 0
    got = json.loads(capsys.readouterr().out)["val_loss"]
    assert got == pytest.approx(want, rel=1e-6)


def test_plain_resume_of_a_sharded_checkpoint_is_exact(env, tmp_path, monkeypatch):
    """`engram train --resume` without torchrun continues a run whose checkpoints are DCP, bit for bit."""
    monkeypatch.setenv("ENGRAM_CACHE", env["env"]["ENGRAM_CACHE"])
    run = resumable_copy(one_process_run(env), tmp_path / "run")
    assert main(_cmd(env, 0, run, "--resume")[3:]) == 0
    assert losses(run) == losses(env["base"] / "single")
    assert sorted(p.name for p in (run / "ckpt").glob("step-*.json")) == ["step-0000004.json", "step-0000006.json"]


@pytest.mark.slow
def test_a_user_error_on_every_rank_is_printed_once(env, tmp_path):
    """Every rank meets the same error: rank 0 prints the one line, the others hand theirs to the watchdog."""
    p = launch(env, 2, tmp_path / "run", "--set", "train.batch_size=3", ok=False)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("engram: error:")]
    assert lines == ["engram: error: train.batch_size=3 does not divide over 2 ranks: the global batch is split "
                     "evenly, so use a multiple of 2"], p.stderr[-3000:]
