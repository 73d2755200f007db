"""`engram compare`: an MoE baseline against its iso-parameter Engram variant.

Both models see the same data, token budget and seed. The Engram variant takes routed
experts out of every MoE layer and spends the same number of parameters on n-gram memory, so
total and activated parameter counts match (up to prime rounding of the table sizes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

from engram.atomic import write_json_atomic
from engram.config import ConfigError
from engram.train.config import RunConfig
from engram.train.run import plot_losses, read_metrics


def variants(base: RunConfig, n_experts_moved: int, *, match_activated: bool = False,
             flavour: str | None = None) -> dict[str, RunConfig]:
    """The MoE baseline (no memory) and the iso-parameter Engram variant of it; ``match_activated``
    also matches activated parameters by narrowing the variant's shared experts (see
    `engram.model.params.iso_engram_config`). ``flavour`` (``"demo"`` or ``"v41"``) picks the Engram
    layer of the variant (None: the template's); the memory is sized for that layer's own dense part.

    ConfigError (a ValueError) where ``base`` and ``n_experts_moved`` admit no such pair.
    """
    from engram.model.params import iso_engram_config

    moe = copy.deepcopy(base)
    template = moe.model.engram
    if template is None:
        raise ConfigError("the compare preset needs an engram template in model.engram")
    if flavour is not None:
        template = dataclasses.replace(template, flavour=flavour)  # validated: ConfigError on a bad name
    moe.model.engram = None
    eng = copy.deepcopy(base)
    try:
        eng.model = iso_engram_config(moe.model, n_experts_moved, template, match_total=True,
                                      match_activated=match_activated)
    except ValueError as e:  # its checks are all about the requested split
        raise ConfigError(f"cannot build the iso-parameter Engram variant: {e}") from e
    return {"moe": moe, "engram": eng}


def run_compare(base: RunConfig, out_dir: str | Path, *, n_experts_moved: int, seeds=(0,), progress=True,
                cache_dir=None, data=None, out=print, trainer=None, main: bool = True,
                match_activated: bool = False, flavour: str | None = None) -> dict:
    """Train both variants for every seed into ``out_dir`` and write the table, plot and summary
    (``compare.json`` records ``match_activated`` and the Engram ``flavour``, see :func:`variants`).

    ``data``: the prepared `engram.data.DataBundle` of ``base.data`` (prepared here when None).
    ``trainer``: ``trainer(cfg, run_dir, data=, progress=)`` builds each run's trainer (default `Trainer`; the
    row-sharded one under torchrun); ``main``: whether this process writes the shared files (rank 0).
    """
    from engram.train.trainer import Trainer, prepare_run_data

    trainer = trainer or Trainer

    # An impossible split fails before anything is written.
    pair = variants(base, n_experts_moved, match_activated=match_activated, flavour=flavour)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = prepare_run_data(base, cache_dir)
    rows, curves = [], {}
    t_start = time.time()
    for seed in seeds:
        for name, cfg in variants(base, n_experts_moved, match_activated=match_activated, flavour=flavour).items():
            cfg = copy.deepcopy(cfg)
            cfg.train.seed = seed
            tag = f"{name}-seed{seed}"
            out(f"== training {tag} ==")
            res = trainer(cfg, out_dir / tag, data=data, progress=progress).train()
            p = res.params
            rows.append({"model": name, "seed": seed, "total_params": p["total"],
                         "active_params": p["activated_per_token"], "memory_params": p["memory"],
                         "tokens": res.tokens, "val_loss": res.val_loss, "tokens_per_s": res.tokens_per_s})
            curves[tag] = read_metrics(out_dir / tag / "metrics.jsonl") if main else []
    plot = out_dir / "compare.png"
    summary = {"rows": rows, "plot": str(plot), "wall_s": time.time() - t_start, "match_activated": match_activated,
               "flavour": pair["engram"].model.engram.flavour,
               "gain_by_seed": {s: _gain(rows, s) for s in seeds}}
    table = format_table(rows)
    if main:
        plot_losses(curves, plot, title="MoE vs iso-parameter Engram (validation markers)")
        write_json_atomic(out_dir / "compare.json", summary)
        (out_dir / "compare.md").write_text(table + "\n")
    out(table)
    for s, g in summary["gain_by_seed"].items():
        out(f"seed {s}: Engram - MoE validation loss = {-g:+.4f} nats")
    out(f"plot: {plot}  ({summary['wall_s'] / 60:.1f} min)")
    return summary


def _gain(rows: list[dict], seed) -> float | None:
    by = {r["model"]: r["val_loss"] for r in rows if r["seed"] == seed}
    if by.get("moe") is None or by.get("engram") is None:
        return None
    return by["moe"] - by["engram"]


def format_table(rows: list[dict]) -> str:
    head = "| model | seed | total params | active params | memory params | tokens | val loss | tokens/s |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        vl = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        m = {k: f"{r[k] / 1e6:.2f}M" for k in ("total_params", "active_params", "memory_params", "tokens")}
        lines.append(f"| {r['model']} | {r['seed']} | {m['total_params']} | {m['active_params']} | "
                     f"{m['memory_params']} | {m['tokens']} | {vl} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def load_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "compare.json").read_text())
