"""What every probe shares: the evaluation data of a model, forward hooks, n-gram keys, figures and
the REPORT.md section each command leaves in its output folder."""

# Shapes: B batch, T time, M residual branches, D model width, N tokens, n n-gram order.

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_write, write_json_atomic
from engram.config import UserError
from engram.figures import save_png

# ------------------------------------------------------------------------------------------------ data

def run_config_of(model_dir: str | Path):
    """The RunConfig of the run that wrote ``model_dir`` (``RUN/model`` beside ``RUN/config.json``), or None."""
    from engram.train.config import RunConfig

    path = Path(model_dir).resolve().parent / "config.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return RunConfig.from_dict(d) if isinstance(d, dict) and "data" in d and "model" in d else None
    except (ValueError, TypeError, KeyError):
        return None


def probe_data(model_dir: str | Path, data: Sequence[str] | None, tokenizer_spec: str, vocab_size: int):
    """The DataBundle a probe reads: ``data`` (files/folders) with the model's tokenizer; else the corpus,
    tokenizer and split of the run that trained the model (its train split is what the memory saw); else
    the Python standard library with the model's tokenizer."""
    from engram.data import prepare_data
    from engram.train.trainer import prepare_run_data

    run_cfg = None if data else run_config_of(model_dir)
    bundle = (prepare_run_data(run_cfg) if run_cfg is not None
              else prepare_data(list(data) if data else None, tokenizer_spec, progress=False))
    if bundle.vocab_size > vocab_size:
        raise UserError(f"the data's tokenizer has {bundle.vocab_size} ids but the model only {vocab_size}")
    return bundle


def data_label(model_dir: str | Path, data: Sequence[str] | None) -> str:
    """How a REPORT.md section names the corpus a probe read."""
    if data:
        return ", ".join(data)
    cfg = run_config_of(model_dir)
    if cfg is not None:
        return (", ".join(cfg.data.data) if cfg.data.data else "the Python standard library source") + \
            " (the training run's corpus and split)"
    return "the Python standard library source"


def git_sha_of(model_dir: str | Path) -> str | None:
    """The git SHA recorded in the training run's meta.json (None when the model has no run directory)."""
    path = Path(model_dir).resolve().parent / "meta.json"
    try:
        return json.loads(path.read_text()).get("git_sha")
    except (OSError, ValueError, AttributeError):
        return None


def model_label(model_dir: str | Path) -> str:
    sha = git_sha_of(model_dir)
    return f"{model_dir}" + (f" (git SHA `{sha}`)" if sha else " (no run directory: git SHA unknown)")


# ----------------------------------------------------------------------------------------------- hooks

def engram_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """``[(layer, Engram module)]`` of a model, in depth order (empty for a model without memory)."""
    return [(blk.layer, blk.engram) for blk in model.blocks if blk.engram is not None]


@contextmanager
def memory_off(model) -> Iterator[int]:
    """Within the block, every Engram layer adds nothing to the residual stream (a forward hook returns
    zeros in place of its increment); the weights are untouched. Yields how many layers were silenced."""

    def zero(module, args, output):
        if isinstance(output, tuple):  # (increment, aux): keep the conv state / gates
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handles = [mod.register_forward_hook(zero) for _, mod in engram_modules(model)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def residual_streams(model) -> Iterator[list[torch.Tensor]]:
    """Collect the residual stream ``[B, T, D]`` (branches summed, as the LM head reads it) after the token
    embedding and after each block, in order, for every forward pass inside the block."""
    out: list[torch.Tensor] = []
    M = model.cfg.hc_mult

    def emb_hook(module, args, output):
        out.append(output.detach() * M)  # the embedding feeds all M branches

    def blk_hook(module, args, output):
        out.append(output[0].detach().sum(dim=2))

    handles = [model.tok_emb.register_forward_hook(emb_hook)]
    handles += [blk.register_forward_hook(blk_hook) for blk in model.blocks]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def top1_hits(model, x_BT: torch.Tensor, target_B: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``[B]`` bool: whether the model's most likely next token after the last position of each row is the target."""
    hits = []
    for i in range(0, len(x_BT), batch_size):
        logits = model(x_BT[i:i + batch_size]).logits[:, -1]
        hits.append(logits.argmax(-1) == target_B[i:i + batch_size])
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


# --------------------------------------------------------------------------------------------- n-grams

def ngram_windows(ids_N: np.ndarray, n: int) -> np.ndarray:
    """``[N-n+1, n]`` contiguous int64 array of every n-gram of ``ids_N`` (start-position order)."""
    ids_N = np.asarray(ids_N, dtype=np.int64)
    if len(ids_N) < n:
        return np.zeros((0, n), dtype=np.int64)
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(ids_N, n))


def unique_ngrams(grams_Nn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of ``grams_Nn``: ``(first index of each, inverse [N], counts)``, exact (no hashing):
    the rows are compared as raw bytes."""
    if len(grams_Nn) == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    keys = np.ascontiguousarray(grams_Nn).view(np.dtype((np.void, grams_Nn.dtype.itemsize * grams_Nn.shape[1])))
    _, first, inverse, counts = np.unique(keys.ravel(), return_index=True, return_inverse=True, return_counts=True)
    return first, inverse.ravel(), counts


# ----------------------------------------------------------------------------------------- the report

def save_json(out_dir: Path, name: str, obj) -> Path:
    return write_json_atomic(out_dir / name, _finite(obj))


def _finite(obj):
    """NaN/inf become None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def figure(path: Path, plot: Callable, size: tuple[float, float] = (7, 4.5)) -> Path:
    """Draw ``plot(fig, ax)`` on an off-screen figure and write it as a PNG, atomically."""
    return save_png(path, plot, size)


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return lines


def write_section(out_dir: Path, title: str, *, command: str, models: Sequence[str], data: str | None,
                  figure_file: str, header: Sequence[str], rows: Sequence[Sequence], verdict: str,
                  notes: Sequence[str] = ()) -> Path:
    """Put this probe's section into ``out_dir/REPORT.md``, replacing an earlier section of the same title
    (a rerun updates its own section and keeps the other probes')."""
    lines = [f"## {title}", "", "- command: `" + command.replace("\n", "\\n") + "`"]
    lines += [f"- model: {m}" for m in models]
    lines.append(f"- data: {data or 'none (synthetic input)'}")
    lines += [f"- {n}" for n in notes]
    lines += ["", f"![{title}]({figure_file})", "", *md_table(header, rows), "", verdict, ""]
    path = out_dir / "REPORT.md"
    old = path.read_text() if path.is_file() else "# Probes\n\n"
    parts = re.split(r"(?m)^(?=## )", old)
    kept = [p for p in parts if not p.startswith(f"## {title}\n")]
    atomic_write(path, "".join(kept).rstrip("\n") + "\n\n" + "\n".join(lines))
    return path
