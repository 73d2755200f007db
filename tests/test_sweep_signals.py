"""Stopping a sweep: Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the sweep reaches each
worker exactly once, so it checkpoints and stops instead of dying past its checkpoint, and the sweep exits
without starting another run. The workers are stand-ins that record the signals they get."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process sessions and signals are POSIX")

FAKE_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    d = Path(sys.argv[1])
    got = []
    def on_int(signum, frame):
        got.append(signum)
        (d / "signals.txt").write_text(str(len(got)))
    signal.signal(signal.SIGINT, on_int)
    (d / "ready.txt").write_text(f"{os.getpid()} {os.getsid(0)}")
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # as a real worker writes its checkpoint: a second signal here would be counted
    sys.exit(3)  # engram.science.worker.EXIT_INTERRUPTED
""")

DRIVER = textwrap.dedent("""
    import signal, sys
    # Python's own Ctrl-C handler, as in a terminal: a test runner started in the background (nohup, `&`)
    # hands its children SIGINT ignored, and Python then keeps it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import engram.science.sweep as S
    S.WORKER = (sys.executable, sys.argv[2])
    S._warm_data = lambda rec, out: None  # the stand-ins read no corpus
    try:
        S.execute(sys.argv[1], jobs=2, out=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print("KeyboardInterrupt reached the caller", flush=True)
        sys.exit(130)
""")


def _wait_for(pred, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_sweep_forwards_one_sigint_per_worker_and_starts_nothing_more(tmp_path, how):
    d = tmp_path / "sweep"
    d.mkdir()
    names = [f"run{i}" for i in range(3)]
    (d / "sweep.json").write_text(json.dumps({"runs": [{"name": n, "seed": 0, "run": f"../runs/{n}"}
                                                       for n in names]}))
    runs = [tmp_path / "runs" / n for n in names]
    for r in runs:
        r.mkdir(parents=True)
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    (tmp_path / "driver.py").write_text(DRIVER)
    sweep = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(d), str(tmp_path / "worker.py")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert _wait_for(lambda: all((r / "ready.txt").is_file() for r in runs[:2])), "the workers never started"
        if how == "ctrl-c":
            os.killpg(sweep.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
        else:
            sweep.send_signal(signal.SIGTERM)
        out, _ = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130, out
    assert "interrupted: run the same command again to continue" in out
    for r in runs[:2]:
        pid, sid = map(int, (r / "ready.txt").read_text().split())
        assert sid != sweep.pid, "a worker shares the sweep's session: the terminal's Ctrl-C would reach it too"
        assert (r / "signals.txt").read_text() == "1", "a worker got more or fewer than one SIGINT"
    assert not (runs[2] / "ready.txt").exists(), "the sweep started another run after it was stopped"


def test_the_cli_ends_an_interrupted_sweep_with_status_130_and_no_traceback(monkeypatch, capsys, tmp_path):
    import engram.science.sweep as S
    from engram.cli import main

    def stopped(*args, **kwargs):
        print("interrupted: run the same command again to continue")
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "sweep", stopped)
    assert main(["sweep", "tokens", "--out", str(tmp_path)]) == 130
    out = capsys.readouterr()
    assert "run the same command again" in out.out and "Traceback" not in out.out + out.err


def test_a_worker_listens_to_sigint_even_when_started_with_it_ignored(monkeypatch, tmp_path):
    """A sweep run in the background hands its workers SIGINT ignored; a worker restores Python's handler
    first, so a stop asked for during its start-up ends it as interrupted instead of being lost."""
    from engram.science import worker

    seen = []

    def interrupted_during_start_up(run_dir, progress):
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, "_run", interrupted_during_start_up)
    prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert worker.main([str(tmp_path)]) == worker.EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, prev)
    assert seen == [signal.default_int_handler]
