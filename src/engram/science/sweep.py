"""`engram sweep`: run an experiment's grid, resumably, a few processes at a time.

Layout under the sweep root (``--out``, default ``science/``)::

    ROOT/runs/<run_id>/            one training run: spec.json, the trainer's files, result.json when done
    ROOT/<experiment>-<preset>/sweep.json   the grid: command, git SHA, data, seeds, and each run's point + id
    ROOT/<experiment>-<preset>-<corpus>/    the same with ``--data``: one folder per corpus, none overwritten
    ROOT/<experiment>-<preset>[-<corpus>]-set-<settings>/   the same with ``--set`` overrides
    ROOT/corpora/man-pages/        the prose corpus, built once when the tokens experiment needs it

A run's id hashes its whole config, so experiments that share a point share its run (trained once). Run
the same command again to continue: finished runs are skipped, interrupted ones resume from their last
checkpoint (first), and the rest train seed by seed (:func:`queue`). Every run uses `SWEEP_THREADS`
intra-op threads whatever ``--jobs`` is, so a figure does not depend on how many runs shared the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engram.atomic import write_json_atomic
from engram.config import ConfigError, UserError
from engram.science.grids import SWEEP_THREADS, RunSpec, build_grid
from engram.science.worker import EXIT_BUSY, EXIT_INTERRUPTED, RESULT, SPEC

RUNS, CORPORA, SWEEP_FILE = "runs", "corpora", "sweep.json"
# The command that trains one run (a module-level name so a test can put a stand-in in its place).
WORKER = (sys.executable, "-m", "engram.science.worker")


def default_jobs(mem_gib_per_run: float = 4.0) -> int:
    """Processes at a time: one per core (each single-threaded), at most 2, fewer when RAM is short."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        avail = 2 * mem_gib_per_run
    return max(1, min(2, cores, int(avail // mem_gib_per_run)))


def prose_corpus(root: Path, out=print) -> list[str]:
    """The tokens experiment's prose corpus: this machine's manual pages, rendered once under ``root``."""
    from engram.data.manpages import build_man_corpus

    dest = root / CORPORA / "man-pages"
    if not dest.is_dir():
        out(f"building the prose corpus from the manual pages into {dest} ...")
    m = build_man_corpus(dest)
    out(f"prose corpus: {m['pages']} manual pages, {m['bytes'] / 2**20:.1f} MiB ({dest})")
    return [str(dest)]


def _portable(path: str | Path) -> str:
    """A corpus path as the runs record it: relative to the current directory when inside it (a sweep run
    from a clone's root then names, and hashes into its run ids, the same paths in every clone), else
    absolute."""
    p, here = Path(path).resolve(), Path.cwd().resolve()
    return str(p.relative_to(here)) if p.is_relative_to(here) else str(p)


def _label(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit]


def sweep_name(experiment: str, preset: str, data=None, overrides=()) -> str:
    """The sweep's folder name: ``<experiment>-<preset>`` on the default corpus; with ``data`` a suffix of the
    corpus's folder or file name and a hash of its recorded paths, so a sweep on another corpus never reuses
    (and overwrites) the default corpus's record, and two corpora that share a folder name stay apart. With
    ``overrides`` a further suffix, ``set-<the settings, shortened>-<hash>``, for the same reason."""
    name = f"{experiment}-{preset}"
    if data:
        paths = [_portable(p) for p in data]
        label = _label(Path(paths[0]).stem or "data", 32) or "data"
        name += f"-{label}-{hashlib.sha256(chr(10).join(paths).encode()).hexdigest()[:6]}"
    if overrides:
        sets = [ov.strip() for ov in overrides]
        short = _label("-".join(ov.split("=", 1)[0].split(".")[-1] + "-" + ov.split("=", 1)[-1] for ov in sets), 40)
        name += f"-set-{short}-{hashlib.sha256(chr(10).join(sets).encode()).hexdigest()[:6]}"
    return name


def plan(root: str | Path, experiment: str, preset: str, *, seeds=None, data=None, prose=None, overrides=(),
         command: str | None = None, out=print, write: bool = True) -> tuple[Path, list[RunSpec]]:
    """Write the sweep's ``sweep.json`` and each run's ``spec.json`` (existing runs untouched); with
    ``write=False`` only compute them (a dry run changes no file). ``overrides`` see `build_grid`."""
    from engram.train.run import git_sha, versions

    root = Path(root)
    if experiment == "tokens" and not prose:
        prose = prose_corpus(root, out)
    data = [_portable(p) for p in data] if data else None
    prose = [_portable(p) for p in prose] if prose else None
    for p in (data or []) + (prose or []):
        if not Path(p).exists():
            raise UserError(f"data path {p} does not exist")
    overrides = [ov.strip() for ov in overrides]
    specs = build_grid(experiment, preset, seeds=seeds, data=data, prose=prose, overrides=overrides)
    sweep_dir = root / sweep_name(experiment, preset, data, overrides)
    old = sweep_dir / SWEEP_FILE
    if old.is_file():  # a folder planned before per-corpus names, or edited by hand: never mix two corpora
        prev = json.loads(old.read_text())
        if prev.get("data") != data or (prev.get("prose") and prose and prev["prose"] != prose):
            raise UserError(f"{sweep_dir} holds a sweep on data {prev.get('data') or 'default'}"
                            f"{', prose ' + str(prev['prose']) if prev.get('prose') else ''}; this one is on "
                            f"{data or 'default'}{', prose ' + str(prose) if prose else ''}: use another --out")
        if (prev.get("overrides") or []) != overrides:
            raise UserError(f"{sweep_dir} holds a sweep with the settings {prev.get('overrides') or 'of the preset'}, "
                            f"not {overrides or 'those of the preset'}: use another --out")
    if not write:
        return sweep_dir, specs
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rundirs = root / RUNS
    for spec in specs:
        d = rundirs / spec.run_id
        d.mkdir(parents=True, exist_ok=True)
        keep = spec.keep_model
        if (d / SPEC).is_file():  # a run shared with another sweep keeps its record (and first name)
            prev = json.loads((d / SPEC).read_text())
            if keep <= prev.get("keep_model", False):
                continue
            prev["keep_model"] = True
            write_json_atomic(d / SPEC, prev)
            continue
        write_json_atomic(d / SPEC, {"name": spec.name, "config": spec.config.to_dict(), "keep_model": keep})
    record = {"format": "engram-sweep-1", "experiment": experiment, "preset": preset,
              "command": command or "engram sweep " + shlex.join([experiment, "--preset", preset]),
              "git_sha": git_sha(), "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "data": data, "prose": prose, "overrides": overrides, "vocab_size": specs[0].config.data.vocab_size,
              "seeds": sorted({s.seed for s in specs}), "threads": SWEEP_THREADS,
              "runs": [{"name": s.name, "point": s.point, "seed": s.seed, "corpus": s.corpus,
                        "run": f"../{RUNS}/{s.run_id}"} for s in specs]}
    if old.is_file():
        prev = json.loads(old.read_text())
        record["created"] = prev.get("created", record["created"])
        # Runs an earlier command planned and this one does not (its other seeds) stay in the record.
        planned = {r["run"] for r in record["runs"]}
        record["runs"] += [r for r in prev.get("runs", []) if r["run"] not in planned]
        prev_seeds = set(prev.get("seeds", []))
        # The command shown is one that plans every run: a later one planning all the earlier seeds (say,
        # --seeds 0 1 after --seeds 0) replaces the first; else the first stays, and each is listed.
        if not prev_seeds <= set(record["seeds"]) or command is None:
            record["command"] = prev.get("command", record["command"])
        record["seeds"] = sorted(prev_seeds | set(record["seeds"]))
        cmds = prev.get("commands", [prev.get("command")])
        record["commands"] = [c for c in cmds if c] + ([command] if command and command not in cmds else [])
        record["git_sha_first"] = prev.get("git_sha_first", prev.get("git_sha"))
    write_json_atomic(old, record)
    return sweep_dir, specs


def status(sweep_dir: str | Path) -> dict[str, list[str]]:
    """Runs of a sweep by state: ``done``, ``started`` (resumable) and ``pending``."""
    sweep_dir = Path(sweep_dir)
    rec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    out: dict[str, list[str]] = {"done": [], "started": [], "pending": []}
    for r in rec["runs"]:
        d = (sweep_dir / r["run"]).resolve()
        key = "done" if (d / RESULT).is_file() else "started" if (d / "config.json").is_file() else "pending"
        out[key].append(r["name"])
    return out


def queue(sweep_dir: str | Path) -> list[tuple[str, Path]]:
    """The unfinished runs of a sweep in the order they train: runs already started first (their
    checkpoints hold work), then the rest seed by seed, each seed in the plan's order. A sweep cut short
    so leaves whole seeds, every point with its pair, rather than every seed of the early points and
    unpaired runs at the last one."""
    sweep_dir = Path(sweep_dir)
    rec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    todo, seen = [], set()
    for i, r in enumerate(rec["runs"]):
        d = (sweep_dir / r["run"]).resolve()
        if d in seen or (d / RESULT).is_file():
            continue
        seen.add(d)
        started = (d / "config.json").is_file()
        todo.append((not started, r.get("seed", 0), i, r["name"], d))
    return [(name, d) for *_, name, d in sorted(todo)]


def execute(sweep_dir: str | Path, *, jobs: int | None = None, out=print, max_runs: int | None = None) -> int:
    """Train every unfinished run of the sweep, ``jobs`` worker processes at a time; returns the number
    of runs that did not finish (0 when the sweep is complete)."""
    sweep_dir = Path(sweep_dir)
    rec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    todo = queue(sweep_dir)
    n_left = len(todo)
    if max_runs is not None:
        todo = todo[:max_runs]
    jobs = jobs or default_jobs()
    n_all = len({(sweep_dir / r["run"]).resolve() for r in rec["runs"]})
    out(f"{sweep_dir.name}: {n_all - n_left} of {n_all} runs done, {len(todo)} to train, {jobs} at a time")
    _warm_data(rec, out)
    env = {**os.environ, "OMP_NUM_THREADS": str(SWEEP_THREADS), "MKL_NUM_THREADS": str(SWEEP_THREADS),
           "ENGRAM_SWEEP_THREADS": str(SWEEP_THREADS)}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    running: list[tuple[str, Path, subprocess.Popen, float]] = []
    failed = 0
    # Ctrl-C reaches the sweep alone: each worker runs in a session of its own, so the terminal's SIGINT does
    # not hit it beside the one the sweep forwards (two would stop it at once, past its checkpoint). A
    # SIGTERM to the sweep stops it the same way.
    own_session = os.name == "posix"
    prev_term = _on_sigterm_interrupt()
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, d = todo.pop(0)
                log = open(d / "worker.log", "a")
                p = subprocess.Popen([*WORKER, str(d)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=own_session)
                log.close()
                running.append((name, d, p, time.time()))
                out(f"  started {name} ({d.name})")
            time.sleep(1.0)
            for item in list(running):
                name, d, p, t0 = item
                if p.poll() is None:
                    continue
                running.remove(item)
                if p.returncode == 0 and (d / RESULT).is_file():  # the worker writes no result without a loss
                    res = json.loads((d / RESULT).read_text())
                    out(f"  done {name}: val loss {res['val_loss']:.4f} ({(time.time() - t0) / 60:.1f} min)")
                    continue
                failed += 1
                if p.returncode == EXIT_INTERRUPTED:
                    out(f"  stopped {name}: interrupted from outside the sweep; it resumes on the next sweep")
                elif p.returncode == EXIT_BUSY:
                    out(f"  skipped {name}: another process is training it")
                else:
                    out(f"  FAILED {name} (exit {p.returncode}); see {d / 'worker.log'}")
    except KeyboardInterrupt:
        _stop_workers(running, out)
        raise
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
    st = status(sweep_dir)
    out(f"{sweep_dir.name}: {len(st['done'])} of {len(rec['runs'])} run entries done")
    return failed + len(st["started"]) + len(st["pending"]) if max_runs is None else failed


def _on_sigterm_interrupt():
    """Make SIGTERM raise KeyboardInterrupt (in the main thread); returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _stop_workers(running, out) -> None:
    """One SIGINT per worker: it checkpoints and stops. Interrupted again while waiting, a second one
    stops them at once (their newest checkpoint still resumes)."""
    if running:
        out(f"  stopping {len(running)} run(s) at their next step (they checkpoint first; interrupt again to "
            "stop them at once)")
    for _, _, p, _ in running:
        p.send_signal(signal.SIGINT)
    try:
        for _, _, p, _ in running:
            p.wait()
    except KeyboardInterrupt:
        for _, _, p, _ in running:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, _, p, _ in running:
            p.wait()
    out("interrupted: run the same command again to continue")


def _warm_data(rec: dict, out) -> None:
    """Tokenise each corpus once here, so parallel workers find it cached instead of all building it."""
    from engram.data import prepare_data

    corpora = {None if rec.get("data") is None else tuple(rec["data"])}
    if rec.get("prose"):
        corpora.add(tuple(rec["prose"]))
    for c in corpora:
        prepare_data(list(c) if c else None, vocab_size=rec.get("vocab_size", 8192), progress=False)


def sweep(experiment: str, preset: str, *, root="science", seeds=None, data=None, prose=None, overrides=(),
          jobs=None, command=None, dry_run=False, out=print) -> int:
    """Plan and run a sweep (see the module docstring); the number of runs left unfinished."""
    try:
        sweep_dir, specs = plan(root, experiment, preset, seeds=seeds, data=data, prose=prose, overrides=overrides,
                                command=command, out=out, write=not dry_run)
    except ConfigError:
        raise
    if dry_run:
        for s in specs:
            out(f"  {s.name}: {s.run_id} {json.dumps(s.point)}")
        return 0
    return execute(sweep_dir, jobs=jobs, out=out)
