"""Launching ranks for real: joining from the environment, rank-0 output, and no hang when a rank dies.

Ranks are plain subprocesses given RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (what torchrun sets) running a
small script over gloo; one of them is killed (``kill -9``) or frozen (SIGSTOP), and the others must end
non-zero, naming it, well within a minute. Every wait is bounded by a subprocess timeout.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import engram
from engram.config import ConfigError
from engram.distributed import init_distributed, shutdown

SRC = str(Path(engram.__file__).parent.parent)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ENGRAM_DIST_TIMEOUT",
              "ENGRAM_DIST_DEAD_AFTER")

SCRIPT = '''
import os, sys, time
import torch, torch.distributed as dist
from engram.distributed import init_distributed, rank_zero_output, shutdown

mode, here = sys.argv[1], sys.argv[2]
ctx = init_distributed()
t = torch.ones(4)
dist.all_reduce(t)
with open(os.path.join(here, f"ready{ctx.rank}"), "w") as f:
    f.write(str(os.getpid()))
with rank_zero_output(ctx):
    print(f"hello from rank {ctx.rank}", flush=True)
    print(f"note from rank {ctx.rank}", file=sys.stderr, flush=True)
    if mode == "finish":
        for _ in range(20):
            dist.all_reduce(t)
        time.sleep(float(sys.argv[3 + ctx.rank]))  # uneven ends: some ranks finish long before others
        from tqdm import tqdm
        for _ in tqdm(range(3), disable=False, desc="bar"):
            pass
        print(f"sum {t[0].item():.0f}", flush=True)
    else:
        for step in range(10**9):
            if mode == "fail" and ctx.rank == 1 and step == 5:
                raise ValueError("boom")
            dist.all_reduce(t)
            time.sleep(0.05)
shutdown(ctx)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


class Job:
    """``world`` ranks of SCRIPT in ``mode``, their stdout/stderr in files under ``tmp``."""

    def __init__(self, tmp: Path, world: int, mode: str, *args, **env):
        self.tmp, self.world = tmp, world
        script = tmp / "rank.py"
        script.write_text(SCRIPT)
        port = _free_port()
        self.procs = []
        for r in range(world):
            e = _env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
            with open(tmp / f"out{r}", "w") as out, open(tmp / f"err{r}", "w") as err:
                self.procs.append(subprocess.Popen([sys.executable, str(script), mode, str(tmp), *map(str, args)],
                                                   env=e, stdout=out, stderr=err))

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not all((self.tmp / f"ready{r}").exists() for r in range(self.world)):
            assert time.monotonic() < deadline, "ranks never came up:\n" + self.stderr(0)
            assert all(p.poll() is None for p in self.procs), "a rank ended early:\n" + self.stderr(0)
            time.sleep(0.05)

    def wait(self, ranks, timeout=60.0) -> dict[int, int]:
        """Exit status of each rank in ``ranks``, all within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        return {r: self.procs[r].wait(timeout=max(0.1, deadline - time.monotonic())) for r in ranks}

    def stdout(self, r):
        return (self.tmp / f"out{r}").read_text()

    def stderr(self, r):
        return (self.tmp / f"err{r}").read_text()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture
def job(tmp_path):
    made = []

    def start(*args, **kw):
        made.append(Job(tmp_path, *args, **kw))
        return made[-1]

    yield start
    for j in made:
        j.kill()


def test_without_a_launcher_it_is_a_world_of_one_and_initialises_nothing(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    ctx = init_distributed(backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (0, 1, 0, True)
    assert ctx.memory_group is None and ctx.backend is None and ctx.watchdog is None
    assert not dist.is_initialized()
    shutdown(ctx)
    assert not dist.is_initialized()


@pytest.mark.parametrize("env, says", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in [0, 1]"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, "MASTER_PORT must be a TCP port"),
    ({"ENGRAM_DIST_TIMEOUT": "soon"}, "ENGRAM_DIST_TIMEOUT must be a number"),
    ({"ENGRAM_DIST_DEAD_AFTER": "-1"}, "ENGRAM_DIST_DEAD_AFTER must be a positive"),
])
def test_an_inconsistent_environment_is_a_config_error_before_anything_starts(monkeypatch, env, says):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        init_distributed(backend="gloo")
    assert says in str(e.value)
    assert not dist.is_initialized()


def test_a_clean_finish_exits_zero_prints_once_and_reports_nobody(job):
    # rank 1 finishes 3 s after the others (longer than dead_after): a finished rank 0, which hosts the
    # store, must wait for it, and a finished rank 2 must not be reported silent
    j = job(3, "finish", 0, 3, 0, ENGRAM_DIST_DEAD_AFTER=1)
    assert j.wait(range(3)) == {0: 0, 1: 0, 2: 0}, [j.stderr(r) for r in range(3)]
    assert "hello from rank 0" in j.stdout(0) and "sum " in j.stdout(0)
    assert j.stdout(1) == "" and j.stdout(2) == ""  # rank 1's prints do not appear
    for r in range(3):
        err = j.stderr(r)
        assert f"[rank {r}] note from rank {r}" in err
        assert "stopped responding" not in err and "error" not in err
        assert ("bar: 100%" in err) == (r == 0)  # one progress bar for the job


def test_kill_9_of_one_rank_ends_the_others_naming_it(job):
    j = job(3, "loop", ENGRAM_DIST_DEAD_AFTER=5)
    j.wait_ready()
    j.procs[1].send_signal(signal.SIGKILL)
    codes = j.wait([0, 2], timeout=60)
    assert all(c != 0 for c in codes.values())
    for r in (0, 2):
        err = j.stderr(r)
        assert "engram: error: rank 1 stopped responding (no heartbeat for " in err, err
        assert err.rstrip().endswith(f"ending rank {r}") and "Traceback" not in err


def test_a_frozen_rank_is_caught_by_the_heartbeats_alone(job):
    # SIGSTOP keeps its sockets open: no backend error ever comes, only the watchdog can end rank 0
    j = job(2, "loop", ENGRAM_DIST_DEAD_AFTER=3)
    j.wait_ready()
    j.procs[1].send_signal(signal.SIGSTOP)
    try:
        assert j.wait([0], timeout=60) == {0: 1}
    finally:
        j.procs[1].send_signal(signal.SIGKILL)
    assert "engram: error: rank 1 stopped responding (no heartbeat for" in j.stderr(0)


@pytest.mark.slow
def test_kill_9_of_the_rank_hosting_the_store_is_named_as_such(job):
    j = job(3, "loop", ENGRAM_DIST_DEAD_AFTER=5)
    j.wait_ready()
    j.procs[0].send_signal(signal.SIGKILL)
    codes = j.wait([1, 2], timeout=60)
    assert all(c != 0 for c in codes.values())
    for r in (1, 2):
        assert "rank 0 (which hosts the rendezvous store) is gone" in j.stderr(r), j.stderr(r)


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_the_others_with_its_one_line(job):
    j = job(3, "fail", ENGRAM_DIST_DEAD_AFTER=5)
    j.wait_ready()
    codes = j.wait(range(3), timeout=60)
    assert all(c != 0 for c in codes.values())
    assert "[rank 1] ValueError: boom" in j.stderr(1)  # its own traceback, tagged
    for r in (0, 2):
        assert "engram: error: rank 1 failed (ValueError: boom)" in j.stderr(r), j.stderr(r)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
def test_with_the_default_settings_a_lost_rank_ends_the_job_within_a_minute(job, how):
    j = job(2, "loop")
    j.wait_ready()
    t0 = time.monotonic()
    j.procs[1].send_signal(how)
    try:
        assert j.wait([0], timeout=60) == {0: 1}
    finally:
        j.procs[1].send_signal(signal.SIGKILL)
    assert time.monotonic() - t0 < 60
    assert "engram: error: rank 1 stopped responding" in j.stderr(0)


@pytest.mark.slow
def test_under_torchrun_kill_9_of_a_worker_ends_the_job(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "loop", str(tmp_path)]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        agent = subprocess.Popen(cmd, env=_env(ENGRAM_DIST_DEAD_AFTER=5), stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and agent.poll() is None, (tmp_path / "err").read_text()
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(int((tmp_path / "ready1").read_text()), signal.SIGKILL)
        code = agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=30)
    err = (tmp_path / "err").read_text()
    print(err)  # shown by pytest -s: the report a user of torchrun sees
    assert code != 0 and time.monotonic() - t0 < 60
    # what the user gets: torchrun's own report of the failed worker, with the signal that ended it
    assert "Signal 9 (SIGKILL)" in err or "exitcode  : -9" in err, err
