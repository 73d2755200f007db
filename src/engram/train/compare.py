"""`engram compare`: an MoE baseline against its iso-parameter Engram variant.

Both models see the same data, token budget and seed. The Engram variant takes routed
experts out of every MoE layer and spends the same number of parameters on n-gram memory, so
total and activated parameter counts match (up to prime rounding of the table sizes).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from engram.atomic import write_json_atomic
from engram.train.config import RunConfig
from engram.train.run import plot_losses, read_metrics


def variants(base: RunConfig, n_experts_moved: int) -> dict[str, RunConfig]:
    """The MoE baseline (no memory) and the iso-parameter Engram variant of it."""
    from engram.model.params import iso_engram_config

    moe = copy.deepcopy(base)
    template = moe.model.engram
    if template is None:
        raise ValueError("the compare preset needs an engram template in model.engram")
    moe.model.engram = None
    eng = copy.deepcopy(base)
    eng.model = iso_engram_config(moe.model, n_experts_moved, template, match_total=True)
    return {"moe": moe, "engram": eng}


def run_compare(base: RunConfig, out_dir: str | Path, *, n_experts_moved: int, seeds=(0,), progress=True,
                cache_dir=None, out=print) -> dict:
    from engram.data import prepare_data
    from engram.train.trainer import Trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(base.data.data, base.data.tokenizer, vocab_size=base.data.vocab_size, cache_dir=cache_dir,
                        val_permille=base.data.val_permille)
    rows, curves = [], {}
    t_start = time.time()
    for seed in seeds:
        for name, cfg in variants(base, n_experts_moved).items():
            cfg = copy.deepcopy(cfg)
            cfg.train.seed = seed
            tag = f"{name}-seed{seed}"
            out(f"== training {tag} ==")
            res = Trainer(cfg, out_dir / tag, data=data, progress=progress).train()
            p = res.params
            rows.append({"model": name, "seed": seed, "total_params": p["total"],
                         "active_params": p["activated_per_token"], "memory_params": p["memory"],
                         "tokens": res.tokens, "val_loss": res.val_loss, "tokens_per_s": res.tokens_per_s})
            curves[tag] = read_metrics(out_dir / tag / "metrics.jsonl")
    plot = plot_losses(curves, out_dir / "compare.png", title="MoE vs iso-parameter Engram (validation markers)")
    summary = {"rows": rows, "plot": str(plot), "wall_s": time.time() - t_start,
               "gain_by_seed": {s: _gain(rows, s) for s in seeds}}
    write_json_atomic(out_dir / "compare.json", summary)
    table = format_table(rows)
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
