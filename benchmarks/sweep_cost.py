"""What the committed sweeps cost: runs, tokens, run-hours and CPU-hours per preset tier.

Issue 21 aims the five `full` sweeps at about 12 CPU-hours together. Runs that share a point between
experiments are trained once, so they are counted once here. Each finished run records ``wall_s``; runs
trained since the worker began recording it also have ``cpu_s`` (the process's CPU time) and, later still,
``start_step`` (0 for a run trained in one attempt; a resumed attempt's times cover only its remainder).
Where a tier lacks ``cpu_s`` on most runs, its CPU time is estimated from a per-run cost fitted on the runs
that have it (``cpu_s = a + b * tokens``, least squares over whole-attempt runs of the same model width):
the fixed part ``a`` is data loading, evaluation and the post-run measurements, ``b`` the training itself.
The wall time of a run that shared its core with another process overstates its CPU time, so run-hours
are an upper bound only when no more runs than cores ran at once.

Run: .venv/bin/python benchmarks/sweep_cost.py [--root benchmarks/science] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import emit, machine_info


def runs_of(root: Path) -> dict[str, dict[Path, dict]]:
    """``{tier: {run_dir: result}}`` over every sweep under ``root``, each run once."""
    tiers: dict[str, dict[Path, dict]] = {}
    for sweep_file in sorted(root.glob("*/sweep.json")):
        rec = json.loads(sweep_file.read_text())
        for r in rec["runs"]:
            d = (sweep_file.parent / r["run"]).resolve()
            res_file = d / "result.json"
            if res_file.is_file():
                res = json.loads(res_file.read_text())
                spec = json.loads((d / "spec.json").read_text())
                res["_d_model"] = spec["config"]["model"]["d_model"]
                # A sweep run with --set overrides is a control beside the tier, counted apart from it.
                sets = " ".join(rec.get("overrides") or ())
                tiers.setdefault(rec["preset"] + (f" --set {sets}" if sets else ""), {})[d] = res
    return tiers


def fit(results: list[dict]) -> dict | None:
    """``cpu_s = a + b * tokens`` over whole-attempt runs: those recorded with start_step 0 when they span two
    token budgets, else every run with cpu_s (an attempt resumed before start_step was recorded then biases
    it low); over one budget only, ``a = 0``."""
    timed = [r for r in results if "cpu_s" in r]
    whole = [r for r in timed if r.get("start_step") == 0]
    only_whole = len({r["tokens"] for r in whole}) >= 2
    pts = [(r["tokens"], r["cpu_s"]) for r in (whole if only_whole else timed)]
    if not pts:
        return None
    x, y = np.array(pts, dtype=float).T
    b, a = np.polyfit(x, y, 1) if len(set(x)) >= 2 else (float(np.mean(y / x)), 0.0)
    resid = y - (a + b * x)
    return {"a_s": round(float(a), 1), "b_ms_per_token": round(float(b) * 1e3, 4), "runs": len(pts),
            "rms_residual_s": round(float(np.sqrt(np.mean(resid ** 2))), 1),
            "only_whole_attempts": only_whole}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).parent / "science"))
    ap.add_argument("--aim-cpu-h", type=float, default=12.0, help="the full tier's budget (issue 21)")
    ap.add_argument("--out")
    a = ap.parse_args()
    out = {"benchmark": "sweep_cost", "root": Path(a.root).name, "tiers": {}}
    tiers = runs_of(Path(a.root))
    # The fit per backbone width, over every tier's runs of that width (a control sweep trains the full tier's
    # model): the grids vary memory and experts at a fixed width and held activated parameters.
    every = {d: r for runs in tiers.values() for d, r in runs.items()}
    widths = sorted({r["_d_model"] for r in every.values()})
    fits = {w: fit([r for r in every.values() if r["_d_model"] == w]) for w in widths}
    out["fit_by_d_model"] = fits
    for tier, runs in sorted(tiers.items()):
        res = list(runs.values())
        with_cpu = [r for r in res if "cpu_s" in r]
        est, missing = 0.0, 0
        for r in res:
            f = fits[r["_d_model"]]
            if "cpu_s" in r and r.get("start_step", 0) == 0:  # recorded (possibly a resumed attempt: see fit)
                est += r["cpu_s"]
            elif f is not None:
                est += f["a_s"] + f["b_ms_per_token"] * 1e-3 * r["tokens"]
            else:
                missing += 1
        out["tiers"][tier] = {
            "runs": len(res), "tokens_M": round(sum(r["tokens"] for r in res) / 1e6, 2),
            "run_hours": round(sum(r["wall_s"] for r in res) / 3600, 2),
            "runs_with_cpu_s": len(with_cpu), "cpu_hours_recorded": round(sum(r["cpu_s"] for r in with_cpu) / 3600, 2),
            "runs_without_an_estimate": missing,
            "cpu_hours_estimated": round(est / 3600, 2) if not missing else None,
        }
    full = out["tiers"].get("full")  # the five experiments' full sweeps, controls apart
    if full and full["cpu_hours_estimated"] is not None:
        out["full_vs_aim"] = {"aim_cpu_h": a.aim_cpu_h, "ratio": round(full["cpu_hours_estimated"] / a.aim_cpu_h, 2)}
    out["machine"] = machine_info()
    emit(out, a.out)


if __name__ == "__main__":
    main()
