"""What each experiment's numbers say, computed, not written by hand.

An effect counts as resolved when it lies outside its two-sided 95% confidence interval over seeds
(Student's t with the seeds' degrees of freedom: with 3 seeds that is 4.3 standard errors, not 2, since a
spread estimated from three numbers is itself uncertain); otherwise the verdict is "not resolved at this
scale". With one seed there is no spread, and the verdict says so.
"""

from __future__ import annotations

import math

import numpy as np

Z = 2.0  # standard errors an effect must exceed when the degrees of freedom are unknown (large samples)
# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(df: int | None) -> float:
    """Standard errors an effect with ``df`` degrees of freedom must exceed (95%, two-sided)."""
    if df is None or df > len(_T95):
        return Z if df is None else 2.0 + 2.4 / df  # within 1% of t for df > 10
    return _T95[df - 1]


def _stats(values):
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def diff(rows_a: list[dict], rows_b: list[dict]) -> tuple[float, float, int | None]:
    """Mean validation-loss difference a - b, its standard error and degrees of freedom. Runs with the same
    seed see the same batches in the same order, so where both sides have the same two or more seeds the
    difference is taken per seed (paired: the data-order noise they share cancels; n - 1 degrees of freedom);
    otherwise it is a difference of means (Welch's standard error, conservatively min(n_a, n_b) - 1)."""
    la = {r["seed"]: r["val_loss"] for r in rows_a}
    lb = {r["seed"]: r["val_loss"] for r in rows_b}
    if set(la) == set(lb) and len(la) >= 2:
        d = _stats(la[s] - lb[s] for s in sorted(la))
        return d[0], d[1] / math.sqrt(d[2]), d[2] - 1
    a, b = _stats(la.values()), _stats(lb.values())
    df = min(a[2], b[2]) - 1
    return a[0] - b[0], _se_diff(a, b), df if df >= 1 else None


def _se_diff(a, b) -> float:
    (_, sa, na), (_, sb, nb) = a, b
    if math.isnan(sa) or math.isnan(sb):
        return math.nan
    return math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def tokens_str(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def judge(delta: float, se: float, df: int | None = None, worse: str = "worse", better: str = "better") -> str:
    """``better``/``worse`` for a negative/positive ``delta`` outside its 95% interval, else not resolved."""
    if math.isnan(se):
        return f"not resolved, one seed: reads {better if delta < 0 else worse}"
    if abs(delta) <= t95(df) * se:
        return "not resolved at this scale"
    return better if delta < 0 else worse


def alloc(groups: dict) -> str:
    m = {rho: _stats(r["val_loss"] for r in g) for rho, g in groups.items()}
    best = min(m, key=lambda r: m[r][0])
    lines = [f"Lowest mean loss at rho = {best:.2f} ({m[best][0]:.4f})."]
    if 1.0 in m and best != 1.0:
        d, se, df = diff(groups[best], groups[1.0])
        lines.append(f"Against pure MoE (rho = 1): {d:+.4f} nats" + ("" if math.isnan(se) else f" ± {se:.4f} (s.e.)")
                     + f": {judge(d, se, df)}.")
    lo, hi = min(m), max(m)
    interior = best not in (lo, hi)
    if interior:
        d_lo, se_lo, df_lo = diff(groups[best], groups[lo])
        d_hi, se_hi, df_hi = diff(groups[best], groups[hi])
        v_lo, v_hi = judge(d_lo, se_lo, df_lo), judge(d_hi, se_hi, df_hi)
        u = v_lo == "better" and v_hi == "better"
        shape = (f"the minimum is interior, {d_hi:+.4f} vs rho = {hi:.2f} ({v_hi}) and {d_lo:+.4f} vs "
                 f"rho = {lo:.2f} ({v_lo}): " + ("a U-shape, resolved" if u else
                                                              "a U-shape not resolved at this scale"))
    else:
        shape = "the minimum is at an end of the range (no U-shape over these points)"
    lines.append(f"Paper: a U-curve with its minimum near rho = 0.75-0.8. Here: {shape}.")
    return " ".join(lines)


def log_fit(rows: list[dict]) -> dict | None:
    """Least-squares ``loss = a + b ln(slots)`` over every run (seeds as repeated points); slope, R² of the
    per-size means, and the slope's spread over per-seed fits."""
    xs = np.array([math.log(r["slots"]) for r in rows], dtype=float)
    ys = np.array([r["val_loss"] for r in rows], dtype=float)
    if len(set(xs.tolist())) < 2:
        return None
    b, a = np.polyfit(xs, ys, 1)
    sizes = sorted(set(xs.tolist()))
    means = np.array([ys[xs == s].mean() for s in sizes])
    pred = a + b * np.array(sizes)
    ss_tot = float(((means - means.mean()) ** 2).sum())
    r2 = 1.0 - float(((means - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan
    per_seed = []
    for s in sorted({r["seed"] for r in rows}):
        sx = np.array([math.log(r["slots"]) for r in rows if r["seed"] == s])
        sy = np.array([r["val_loss"] for r in rows if r["seed"] == s])
        if len(set(sx.tolist())) >= 2:
            per_seed.append(float(np.polyfit(sx, sy, 1)[0]))
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
    return {"slope": float(b), "intercept": float(a), "r2": r2, "slope_sd": sd, "n_seeds": len(per_seed)}


def scaling(fit: dict | None, n_sizes: int) -> str:
    if fit is None:
        return "Fewer than two memory sizes finished: no fit yet."
    se = fit["slope_sd"] / math.sqrt(fit["n_seeds"]) if fit["n_seeds"] > 1 else math.nan
    s = (f"Fit over {n_sizes} sizes: loss = {fit['intercept']:.4f} {fit['slope']:+.4f} ln(slots), "
         f"{fit['slope'] * math.log(10):+.4f} nats per 10x slots")
    s += "" if math.isnan(se) else f" (per-seed slopes: sd {fit['slope_sd']:.4f})"
    s += f"; R² of the size means = {fit['r2']:.3f}. "
    slope_ok = fit["slope"] < 0 and (math.isnan(se) or abs(fit["slope"]) > t95(fit["n_seeds"] - 1) * se)
    linear = fit["r2"] >= 0.9
    s += "Paper: loss linear in log(slots), falling. Here: " + (
        "reproduced (falling, R² >= 0.9)." if slope_ok and linear else
        "falling but not linear in log(slots) (R² < 0.9)." if slope_ok else "not resolved at this scale.")
    return s


def layers(groups: dict) -> str:
    m = {k: _stats(r["val_loss"] for r in g) for k, g in groups.items()}
    singles = {k: v for k, v in m.items() if "+" not in k}
    best = min(singles, key=lambda k: singles[k][0])
    out = [f"Best single layer: {best} ({singles[best][0]:.4f})."]
    for k in sorted(singles):
        if k != best:
            d, se, df = diff(groups[k], groups[best])
            out.append(f"layer {k} vs layer {best}: {d:+.4f} ({judge(d, se, df)}).")
    for k in (k for k in m if "+" in k):
        d, se, df = diff(groups[k], groups[best])
        out.append(f"Split over layers {k} (same memory) vs layer {best}: {d:+.4f} ({judge(d, se, df)}).")
    out.append("Paper (deeper model): layer 2 best of the single placements, deeper worse, layer 1 worse than 2; "
               "a split over two layers slightly better.")
    return " ".join(out)


REFERENCES = {"hc4-shared-gate": "hc4-per-branch"}


def ablation_deltas(groups: dict) -> list[dict]:
    ref_name = "reference"
    out = []
    for name, g in groups.items():
        if name == ref_name:
            continue
        ref = REFERENCES.get(name, ref_name)
        if ref not in groups:
            continue
        a = _stats(r["val_loss"] for r in g)
        d, se, df = diff(g, groups[ref])
        out.append({"ablation": name, "reference": ref, "stats": a, "delta": d, "se": se,
                    "df": df, "verdict": judge(d, se, df, "hurts", "helps")})
    return out


def ablations(deltas: list[dict]) -> str:
    hurt = [d["ablation"] for d in deltas if d["verdict"] == "hurts"]
    helped = [d["ablation"] for d in deltas if d["verdict"] == "helps"]
    unres = [d["ablation"] for d in deltas if d["verdict"].startswith("not resolved")]
    return ("Resolved as hurting: " + (", ".join(hurt) or "none") + ". Resolved as helping: "
            + (", ".join(helped) or "none") + ". Not resolved: " + (", ".join(unres) or "none") + ". "
            "Paper: multi-branch integration, compression and the context-aware gate matter most; the short conv "
            "little; 4-grams slightly worse.")


def token_gains(rows: list[dict]) -> list[dict]:
    out = []
    for corpus in sorted({r["corpus"] for r in rows}):
        for tokens in sorted({r["tokens"] for r in rows if r["corpus"] == corpus}):
            at = [r for r in rows if r["corpus"] == corpus and r["tokens"] == tokens]
            moe = {r["seed"]: r["val_loss"] for r in at if r["model"] == "moe"}
            eng = {r["seed"]: r for r in at if r["model"] == "engram"}
            pairs = [eng[s]["val_loss"] - moe[s] for s in sorted(set(moe) & set(eng))]
            if not pairs:
                continue
            g = _stats(pairs)
            rec = {"corpus": corpus, "tokens": tokens, "gain": g[0], "sd": g[1], "n": g[2],
                   "moe": _stats(moe.values()), "engram": _stats(r["val_loss"] for r in eng.values())}
            for key, src in (("rows_touched_per_step", "rows_touched_per_step"),
                             ("updates_median", "updates_per_touched_row_median"),
                             ("rows_ever_touched_frac", "rows_ever_touched_frac"), ("gate_mean", "gate_mean")):
                vals = [r[src] for r in eng.values() if src in r]
                if vals:
                    rec[key] = float(np.mean(vals))
            out.append(rec)
    return out


def _trend(doublings: list[float], gains: list[float]) -> str:
    """The gain's slope per doubling of tokens, called a widening or a narrowing only when it is outside its
    95% interval (the fit's residuals over the budgets; three budgets at least)."""
    if len(gains) < 2:
        return ""
    x, y = np.asarray(doublings), np.asarray(gains)
    slope, icept = np.polyfit(x, y, 1)
    if len(y) < 3:
        return f"; slope {slope:+.4f} nats per doubling of tokens (two budgets: no trend judged)"
    resid = y - (icept + slope * x)
    se = math.sqrt(float(resid @ resid) / (len(y) - 2) / float(((x - x.mean()) ** 2).sum()))
    if abs(slope) <= t95(len(y) - 2) * se:
        return f"; no trend with tokens resolved ({slope:+.4f} ± {se:.4f} nats per doubling)"
    return f"; the gain {'widens' if slope < 0 else 'narrows'} with tokens ({slope:+.4f} ± {se:.4f} nats per doubling)"


def tokens(gains: list[dict]) -> str:
    out = []
    for corpus in sorted({g["corpus"] for g in gains}):
        gs = sorted((g for g in gains if g["corpus"] == corpus), key=lambda g: g["tokens"])
        parts = []
        for g in gs:
            se = g["sd"] / math.sqrt(g["n"]) if g["n"] > 1 else math.nan
            verdict = judge(g["gain"], se, g["n"] - 1 if g["n"] > 1 else None, "MoE better", "Engram better")
            parts.append(f"{tokens_str(g['tokens'])}: {g['gain']:+.4f} ({verdict})")
        first = next((g for g in gs if g["n"] > 1 and g["gain"] < -t95(g["n"] - 1) * g["sd"] / math.sqrt(g["n"])),
                     None)
        trend = _trend([math.log2(g["tokens"]) for g in gs], [g["gain"] for g in gs])
        out.append(f"{corpus} corpus: " + "; ".join(parts) + trend + (
            f"; memory first pays (resolved) at {tokens_str(first['tokens'])} tokens." if first else
            "; never resolved in Engram's favour over these budgets."))
    out.append("Paper: the gap widens with training.")
    out += [m for corpus in sorted({g["corpus"] for g in gains}) if (m := tokens_mechanism(gains, corpus))]
    return " ".join(out)


def tokens_mechanism(gains: list[dict], corpus: str) -> str:
    """Why the gain moves with the budget, in the measurements of the Engram runs: the table rows a step
    touches (the same at every budget: they depend on the batch, not on training), so a larger budget means
    more updates per row; how the gate opens or closes; and how the gain tracks updates per row (Pearson r
    over the budgets). Empty when fewer than two budgets carry the measurements."""
    gs = sorted((g for g in gains if g["corpus"] == corpus and "updates_median" in g), key=lambda g: g["tokens"])
    if len(gs) < 2:
        return ""
    lo, hi = gs[0], gs[-1]
    rows = [g["rows_touched_per_step"] for g in gs]
    span = f"{min(rows):,.0f}" if round(min(rows)) == round(max(rows)) else f"{min(rows):,.0f}-{max(rows):,.0f}"
    text = (f"Mechanism ({corpus}): a step touches {span} rows at every budget, so the "
            f"median touched row is updated {lo['updates_median']:.0f} times at {tokens_str(lo['tokens'])} tokens and "
            f"{hi['updates_median']:.0f} at {tokens_str(hi['tokens'])}")
    if "gate_mean" in lo and "gate_mean" in hi:
        text += f"; the mean gate goes {lo['gate_mean']:.3f} -> {hi['gate_mean']:.3f}"
    x = np.log([g["updates_median"] for g in gs])
    y = np.array([g["gain"] for g in gs])
    if len(gs) >= 3 and x.std() > 0 and y.std() > 0:
        r = float(np.corrcoef(x, y)[0, 1])
        link = "more updates, more gain" if r < -0.5 else "more updates, less gain" if r > 0.5 else "no clear link"
        text += f"; gain vs log(updates per row): r = {r:+.2f} ({link})"
    return text + "."
