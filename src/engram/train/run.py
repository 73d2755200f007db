"""Run directories and metrics: resolved config, provenance, JSONL metrics, loss plots.

Every run directory records what produced it: the resolved config, the git SHA and the
versions of the libraries that matter, so a number in a table can be traced back.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from engram.atomic import atomic_path, atomic_write, write_json_atomic


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        sha = out.stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "numpy", "tokenizers", "transformers", "safetensors", "engram"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def init_run_dir(run_dir: Path, cfg_dict: dict, requested: dict, data: dict, **info) -> None:
    """Record a new run: ``resolved.json`` (the config as asked for, the data's fingerprints),
    ``meta.json`` (provenance), then ``config.json`` (the resolved config). config.json comes last:
    it marks the directory as holding a run, so a start killed before it left nothing to resume. ``info``
    goes into the start's record (see `record_start`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "resolved.json", {"format": "engram-run-1", "requested": requested, "data": data})
    write_json_atomic(run_dir / "meta.json", {"starts": []})
    record_start(run_dir, **info)
    write_json_atomic(run_dir / "config.json", cfg_dict)


def record_start(run_dir: Path, **info) -> None:
    """Append this start (time, git SHA, argv, versions, and ``info``) to ``meta.json``; the run's
    own ``git_sha`` and ``versions`` stay those of its first start."""
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"starts": []}
    meta.setdefault("starts", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_sha": git_sha(),
                                          "argv": sys.argv[1:], "versions": versions(), **info})
    meta["git_sha"], meta["versions"] = meta["starts"][0]["git_sha"], meta["starts"][0]["versions"]
    write_json_atomic(meta_path, meta)


def _records(path: Path) -> list[dict]:
    """The complete lines of a JSONL file: a process killed mid-write leaves a torn last line, skipped."""
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


class MetricsLog:
    """Append-only JSONL; on resume, entries past the checkpoint's step (and a torn last line) are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = [r for r in _records(path) if r.get("step", 0) <= resume_step]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and path.is_file():
            path.unlink()
        self._f = open(path, "a", buffering=1)

    def log(self, **rec) -> None:
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    return _records(Path(path))


def plot_losses(curves: dict[str, list[dict]], out: Path, title: str = "") -> Path:
    """Train (thin) and validation (markers) loss against tokens, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, recs) in enumerate(curves.items()):
        color = f"C{i}"
        tr = [r for r in recs if r.get("kind") == "train"]
        va = [r for r in recs if r.get("kind") == "eval"]
        if tr:
            ax.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], color=color, alpha=0.35, lw=0.8)
        if va:
            ax.plot([r["tokens"] / 1e6 for r in va], [r["val_loss"] for r in va], "o-", color=color, lw=1.8,
                    label=f"{name} (val {va[-1]['val_loss']:.3f})")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training (thin) and validation (markers) loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:  # a full disk names the file and leaves no torn image
            fig.savefig(tmp, dpi=110, format=Path(out).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out
