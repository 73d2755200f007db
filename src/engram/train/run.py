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

from engram.atomic import write_json_atomic


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


def init_run_dir(run_dir: Path, cfg_dict: dict) -> None:
    """Create the directory and record config + provenance (kept from the first start on resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", cfg_dict)
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"starts": []}
    meta.setdefault("starts", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_sha": git_sha(),
                                          "argv": sys.argv[1:], "versions": versions()})
    meta["git_sha"], meta["versions"] = meta["starts"][0]["git_sha"], meta["starts"][0]["versions"]
    write_json_atomic(meta_path, meta)


class MetricsLog:
    """Append-only JSONL; on resume, entries past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and path.is_file():
            path.unlink()
        self._f = open(path, "a", buffering=1)

    def log(self, **rec) -> None:
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
