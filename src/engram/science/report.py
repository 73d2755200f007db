"""`engram report`: tables, plots and REPORT.md from finished sweeps (and the probes' sections).

For every sweep directory: ``<experiment>.csv`` (one row per run), a PNG (loss vs rho with seed error bars,
loss vs log slots with the fitted line, per-layer bars, the ablation deltas, the token-budget gain), and a
section of ``REPORT.md`` naming the command, git SHA, data, token budget and seeds behind the figure, with
a verdict computed from the numbers (`engram.science.verdicts`): an effect inside its 95% confidence
interval over seeds is reported as "not resolved at this scale", never as a result. Unfinished runs are
listed and left out. A probe's output directory (`engram probe ...`, `engram gates`: a REPORT.md and no
sweep.json) is appended under "Probes" with its figure links made relative to the report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from engram.atomic import atomic_path, atomic_write
from engram.config import UserError
from engram.figures import save_png
from engram.science import verdicts
from engram.science.worker import RESULT

SWEEP_FILE = "sweep.json"


def load_sweep(sweep_dir: str | Path) -> dict:
    """The sweep record with each run entry's ``result`` (None while unfinished)."""
    sweep_dir = Path(sweep_dir)
    f = sweep_dir / SWEEP_FILE
    if not f.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}); run `engram sweep` first")
    rec = json.loads(f.read_text())
    for r in rec["runs"]:
        res = (sweep_dir / r["run"]) / RESULT
        r["result"] = json.loads(res.read_text()) if res.is_file() else None
    rec["dir"] = str(sweep_dir)
    return rec


def rows(rec: dict) -> list[dict]:
    """One flat dict per finished run (point fields, seed, loss, parameters, table usage, gates)."""
    out = []
    for r in rec["runs"]:
        res = r["result"]
        if res is None:
            continue
        p = res["params"]
        row = {"name": r["name"], "seed": r["seed"], **r["point"], "val_loss": res["val_loss"],
               "tokens": res["tokens"], "total_params": p["total"], "activated_params": p["activated_per_token"],
               "memory_params": p["memory"], "tokens_per_s": round(res["tokens_per_s"], 1)}
        for k, v in (res.get("table_usage") or {}).items():
            row[k] = v
        gates = res.get("gates") or {}
        if gates:
            row["gate_mean"] = float(np.mean([g["mean"] for g in gates.values()]))
            row["gate_frac_above_half"] = float(np.mean([g["frac_above_half"] for g in gates.values()]))
        out.append(row)
    return out


def write_csv(rs: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rs:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rs)


def stats(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan for one value) and count."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def by(rs: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rs:
        out.setdefault(r[key], []).append(r)
    return out


def fmt(mean: float, sd: float, n: int, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}") + f" (n={n})"


# ----------------------------------------------------------------------------------------------- plots

def _fig(plot_fn, path: Path) -> Path:
    return save_png(path, lambda fig, ax: plot_fn(ax), grid=True)


def _errorbar(ax, xs, groups, label, **kw):
    m = [stats(r["val_loss"] for r in g) for g in groups]
    ax.errorbar(xs, [a for a, _, _ in m], yerr=[0 if math.isnan(s) else s for _, s, _ in m], capsize=4,
                marker="o", label=label, **kw)


# ----------------------------------------------------------------------------------------- per sweep

def section(rec: dict, out_dir: Path) -> str:
    """Write the sweep's CSV and plot into ``out_dir``; return its REPORT.md section."""
    exp = rec["experiment"]
    rs = rows(rec)
    # the sweep folder's name: a sweep on another corpus (--data) has its own, so its files do not collide
    name = Path(rec["dir"]).name if rec.get("dir") else f"{exp}-{rec['preset']}"
    write_csv(rs, out_dir / f"{name}.csv")
    missing = [r["name"] for r in rec["runs"] if r["result"] is None]
    on = f", {Path(rec['data'][0]).name}" if rec.get("data") else ""
    on += "".join(f", {ov}" for ov in rec.get("overrides") or ())  # a sweep with --set is told apart by its title
    head = [f"## {TITLES.get(exp, exp)} ({rec['preset']}{on})", "",
            f"- command: `{rec['command']}`" + "".join(
                f"; also `{c}`" for c in rec.get("commands") or () if c != rec["command"]),
            f"- git SHA: `{rec.get('git_sha_first') or rec.get('git_sha')}` (sweep planned {rec.get('created')})",
            f"- data: {', '.join(rec['data']) if rec.get('data') else 'the Python standard library source (default)'}"
            + (f"; prose: {', '.join(rec['prose'])}" if rec.get("prose") else ""),
            f"- seeds: {rec['seeds']}; {rec.get('threads', 1)} thread per run",
            f"- runs: {len(rs)} finished" + (f", {len(missing)} unfinished (left out): {', '.join(missing[:8])}"
                                              + (" ..." if len(missing) > 8 else "") if missing else ""), ""]
    if rs:
        budgets = sorted({r["tokens"] for r in rs})
        head.insert(5, f"- token budget per run: {', '.join(f'{b / 1e6:.2f}M' for b in budgets)} tokens")
    if not rs:
        return "\n".join(head + ["No finished runs yet.", ""])
    body = SECTIONS[exp](rs, out_dir, name)
    return "\n".join(head + body + [""])


def _alloc(rs, out_dir, name):
    groups = by(rs, "rho")
    rhos = sorted(groups, reverse=True)
    png = _fig(lambda ax: (_errorbar(ax, rhos, [groups[r] for r in rhos], "validation loss"),
                           ax.set_xlabel("rho: share of the inactive sparse budget in routed experts (1 = pure MoE)"),
                           ax.set_ylabel("validation loss (nats/token)"), ax.invert_xaxis(), ax.legend()),
               out_dir / f"{name}.png")
    table = ["| rho | model | val loss | total params | activated params | memory params |",
             "|---|---|---|---|---|---|"]
    for r in rhos:
        g = groups[r]
        table.append(f"| {r:.2f} | {g[0]['model']} | {fmt(*stats(x['val_loss'] for x in g))} | "
                     f"{g[0]['total_params'] / 1e6:.3f}M | {g[0]['activated_params'] / 1e6:.3f}M | "
                     f"{g[0]['memory_params'] / 1e6:.2f}M |")
    return [f"![{name}]({png.name})", "", *table, "", verdicts.alloc(groups)]


def _scaling(rs, out_dir, name):
    eng = [r for r in rs if r["model"] == "engram"]
    moe = [r for r in rs if r["model"] == "moe"]
    groups = by(eng, "slots")
    slots = sorted(groups)
    fit = verdicts.log_fit(eng)

    def plot(ax):
        _errorbar(ax, slots, [groups[s] for s in slots], "Engram (memory on a fixed MoE backbone)")
        if fit:
            xs = np.array([min(slots), max(slots)], dtype=float)
            ax.plot(xs, fit["intercept"] + fit["slope"] * np.log(xs), "--", color="gray",
                    label=f"fit: {fit['slope']:+.4f} nats per e-fold, R² = {fit['r2']:.3f}")
        if moe:
            m = stats(r["val_loss"] for r in moe)[0]
            ax.axhline(m, color="C3", ls=":", label=f"MoE backbone alone ({m:.4f})")
        ax.set_xscale("log")
        ax.set_xlabel("memory slots (table rows, all heads)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()

    png = _fig(plot, out_dir / f"{name}.png")
    table = ["| slots | memory params | val loss |", "|---|---|---|"]
    for s in slots:
        table.append(f"| {s:,} | {groups[s][0]['memory_params'] / 1e6:.2f}M | "
                     f"{fmt(*stats(x['val_loss'] for x in groups[s]))} |")
    if moe:
        table.append(f"| 0 (MoE alone) | 0 | {fmt(*stats(x['val_loss'] for x in moe))} |")
    return [f"![{name}]({png.name})", "", *table, "", verdicts.scaling(fit, len(slots))]


def _layers(rs, out_dir, name):
    groups = by(rs, "layers")
    keys = sorted(groups, key=lambda k: (len(k.split("+")), [int(x) for x in k.split("+")]))

    def plot(ax):
        m = [stats(r["val_loss"] for r in groups[k]) for k in keys]
        ax.bar(range(len(keys)), [a for a, _, _ in m], yerr=[0 if math.isnan(s) else s for _, s, _ in m], capsize=4,
               color=["C0" if "+" not in k else "C1" for k in keys])
        ax.set_xticks(range(len(keys)), [f"layer {k}" if "+" not in k else f"layers {k}\n(same memory)" for k in keys])
        lo = min(a for a, _, _ in m)
        ax.set_ylim(lo - 0.05, max(a for a, _, _ in m) + 0.03)
        ax.set_ylabel("validation loss (nats/token)")

    png = _fig(plot, out_dir / f"{name}.png")
    table = ["| Engram at | val loss |", "|---|---|"] + [f"| {k} | {fmt(*stats(x['val_loss'] for x in groups[k]))} |"
                                                         for k in keys]
    return [f"![{name}]({png.name})", "", *table, "", verdicts.layers(groups)]


def _ablations(rs, out_dir, name):
    groups = by(rs, "ablation")
    deltas = verdicts.ablation_deltas(groups)

    def plot(ax):
        names = [d["ablation"] for d in deltas]
        ax.barh(range(len(names)), [d["delta"] for d in deltas],
                xerr=[0 if math.isnan(d["se"]) else verdicts.t95(d["df"]) * d["se"] for d in deltas], capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("validation loss change vs its reference (nats; bars: 95% interval over seeds)")

    png = _fig(plot, out_dir / f"{name}.png")
    table = ["| variant | reference | val loss | change vs reference | verdict |", "|---|---|---|---|---|"]
    for d in deltas:
        table.append(f"| {d['ablation']} | {d['reference']} | {fmt(*d['stats'])} | {d['delta']:+.4f}"
                     + ("" if math.isnan(d["se"]) else f" ± {d['se']:.4f} (s.e.)") + f" | {d['verdict']} |")
    return [f"![{name}]({png.name})", "", *table, "", verdicts.ablations(deltas)]


def _tokens(rs, out_dir, name):
    gains = verdicts.token_gains(rs)

    def plot(ax):
        for i, corpus in enumerate(sorted({g["corpus"] for g in gains})):
            gs = [g for g in gains if g["corpus"] == corpus]
            ax.errorbar([g["tokens"] / 1e6 for g in gs], [g["gain"] for g in gs],
                        yerr=[0 if math.isnan(g["sd"]) else g["sd"] for g in gs], marker="o", capsize=4,
                        color=f"C{i}", label=f"{corpus} corpus")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("Engram - MoE validation loss (nats; < 0: memory helps)")
        ax.legend()

    png = _fig(plot, out_dir / f"{name}.png")
    table = ["| corpus | tokens | MoE | Engram | Engram - MoE (per-seed pairs) | rows touched/step | "
             "updates per touched row (median) | rows ever touched | gate mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in gains:
        table.append(f"| {g['corpus']} | {g['tokens'] / 1e6:.2f}M | {fmt(*g['moe'])} | {fmt(*g['engram'])} | "
                     f"{g['gain']:+.4f}" + ("" if math.isnan(g["sd"]) else f" ± {g['sd']:.4f}") + f" (n={g['n']}) | "
                     f"{g.get('rows_touched_per_step', math.nan):,.0f} | {g.get('updates_median', math.nan):.1f} | "
                     f"{100 * g.get('rows_ever_touched_frac', math.nan):.1f}% | {g.get('gate_mean', math.nan):.3f} |")
    return [f"![{name}]({png.name})", "", *table, "", verdicts.tokens(gains)]


TITLES = {"alloc": "1. Sparsity allocation (the U-curve)", "scaling": "2. Memory scaling",
          "layers": "3. Layer placement", "ablations": "4. Ablations", "tokens": "5. Gain vs token budget"}
SECTIONS = {"alloc": _alloc, "scaling": _scaling, "layers": _layers, "ablations": _ablations, "tokens": _tokens}


def build_report(sweep_dirs, out_dir: str | Path, *, out=print) -> Path:
    """Write CSVs, plots and ``REPORT.md`` for ``sweep_dirs`` into ``out_dir``; returns REPORT.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probes = [Path(d) for d in sweep_dirs if not (Path(d) / SWEEP_FILE).is_file() and (Path(d) / "REPORT.md").is_file()]
    recs = [load_sweep(d) for d in sweep_dirs if Path(d) not in probes]
    order = {e: i for i, e in enumerate(SECTIONS)}
    recs.sort(key=lambda r: (order.get(r["experiment"], 99), r["preset"]))
    parts = ["# Engram experiments at CPU scale", "",
             f"Generated by `engram report` on {time.strftime('%Y-%m-%d')} from {len(recs)} sweep(s). Every figure "
             "names the command, code version, data and seeds behind it; spreads are sample standard deviations "
             "over seeds, differences are paired by seed where both sides share their seeds, and an effect inside "
             "its 95% confidence interval (Student's t over seeds) is reported as not resolved.", ""]
    for rec in recs:
        parts.append(section(rec, out_dir))
        out(f"{rec['experiment']}-{rec['preset']}: {sum(r['result'] is not None for r in rec['runs'])} of "
            f"{len(rec['runs'])} runs")
    if probes:
        parts += ["## Probes", ""] + [probe_section(d, out_dir) for d in probes]
        out(f"probes: {len(probes)} section(s)")
    path = out_dir / "REPORT.md"
    atomic_write(path, "\n".join(parts))
    return path


def probe_section(probe_dir: Path, out_dir: Path) -> str:
    """A probe's REPORT.md as a subsection: its title dropped, headings one level down (the first one
    naming the folder), and links to its own files (figures, the HTML page) made relative to ``out_dir``."""
    rel = Path(os.path.relpath(probe_dir.resolve(), out_dir.resolve()))
    lines = probe_dir.joinpath("REPORT.md").read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]

    def link(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "#")) or not (probe_dir / target).exists():
            return m.group(0)
        return f"{m.group(1)}({(rel / target).as_posix()})"

    out, titled = [], False
    for line in lines:
        if line.startswith("#"):
            line = "#" + line
            if not titled:  # two probes of one kind (an Engram model and its control) are told apart
                line, titled = f"{line} (`{rel.as_posix()}`)", True
        out.append(re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", link, line))
    return "\n".join(out).strip() + "\n"
