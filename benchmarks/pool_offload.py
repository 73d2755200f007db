"""Pool the paired timings of several `bench_offload.py` runs into one estimate per configuration.

One run of bench_offload gives 72-108 prefill pairs: on this kind of shared VM pairs of 2 s forwards
still differ by a few percent, so one run's 95% interval is ~+-2-3%, as wide as the target itself.
Every run keeps each pair's (RAM seconds, offloaded seconds) in its JSON (`runs[i][config]
["prefill_pairs_s"]`, `["decode_pairs_s"]`); this script pools them:

* only runs that measured the same thing are pooled: same table, backbone, batch shape, cache budget,
  layout and backbone sharing (else a clear error naming the field); the git SHAs are reported and,
  with `--same-sha`, must agree;
* the ratio per pair is RAM time / offloaded time (above 1: the offloaded model was faster);
  `median`: median of all pooled pair ratios; `total`: total RAM time / total offloaded time (the
  throughput ratio, slow pairs count in full);
* `meets_target_*`: the throughput ratio's whole 95% interval is at or above 0.97 (the target is on
  tokens/s: <= 3% loss); `median_interval_above_target` says the same of the median of pair ratios;
* 95% intervals by a stratified bootstrap: pairs are resampled within each run (each run keeps its
  number of pairs), so a run measured in a slow hour cannot take over a resample.

Usage: python benchmarks/pool_offload.py RUN.json [RUN.json ...] [--config disk_static_layout] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import emit, machine_info, median_ci, total_ratio_ci

# fields of a run that must agree for its pairs to measure the same thing
SAME = ("table", "cache_bytes", "backbone", "prefill_batch", "decode", "backbone_shared", "layout_used")
TARGET = 0.97  # the target: <= 3% throughput loss against all-in-RAM


class PoolError(ValueError):
    """The runs cannot be pooled (unreadable, from another benchmark, or measuring different things)."""


def load_run(path: str | Path) -> dict:
    """One bench_offload JSON, checked to hold paired timings."""
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PoolError(f"{path}: cannot read a bench_offload result: {e}") from e
    if not isinstance(res, dict) or res.get("benchmark") != "offload_throughput":
        kind = res.get("benchmark") if isinstance(res, dict) else None
        raise PoolError(f"{path}: not a bench_offload.py result (benchmark={kind!r})")
    if not res.get("runs"):
        raise PoolError(f"{path}: has no rounds ('runs')")
    for i, rd in enumerate(res["runs"]):
        for name, r in rd.items():
            if "prefill_pairs_s" not in r or "decode_pairs_s" not in r:
                raise PoolError(f"{path}: round {i} of {name!r} keeps no pair timings (written before "
                                "bench_offload kept prefill_pairs_s / decode_pairs_s); it cannot be pooled")
    res["layout_used"] = res.get("layout") is not None
    res["prefill_batch"] = (res.get("prefill") or {}).get("batch")  # the number of batches may differ
    return res


def check_compatible(runs: list[tuple[str, dict]], same_sha: bool) -> None:
    """Raise PoolError naming the first field on which a run differs from the first one."""
    first_path, first = runs[0]
    for path, res in runs[1:]:
        for key in SAME:
            if res.get(key) != first.get(key):
                raise PoolError(f"{path} and {first_path} measured different things: {key!r} is "
                                f"{res.get(key)!r} vs {first.get(key)!r}")
        if same_sha and res["machine"].get("git_sha") != first["machine"].get("git_sha"):
            raise PoolError(f"--same-sha: {path} is at {res['machine'].get('git_sha')}, "
                            f"{first_path} at {first['machine'].get('git_sha')}")


def pooled(groups: list[np.ndarray], seed: int = 0, resamples: int = 4000) -> dict:
    """Median pair ratio and total-time ratio over groups of (reference_s, candidate_s) pairs, with
    stratified-bootstrap 95% intervals."""
    sizes = [len(g) for g in groups]
    if min(sizes, default=0) == 0:
        raise PoolError("a run has no pairs for this configuration")
    t = np.concatenate([np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in groups])
    if not np.all(t > 0):
        raise PoolError("pair timings must be positive seconds")
    med = median_ci(t[:, 0] / t[:, 1], seed, resamples, strata=sizes)
    tot = total_ratio_ci(t, seed, resamples, strata=sizes)
    return {"median": med["median"], "median_ci95": med["ci95"], "total": tot["ratio"], "total_ci95": tot["ci95"],
            "pairs": int(len(t)), "runs": len(groups)}


def pool(paths: list[str], configs: list[str] | None = None, same_sha: bool = False) -> dict:
    """Pool the runs at `paths`: per configuration, prefill and decode over all their pairs."""
    if not paths:
        raise PoolError("no runs given")
    runs = [(p, load_run(p)) for p in paths]
    check_compatible(runs, same_sha)
    names = configs or [n for n in runs[0][1]["runs"][0] if all(n in rd for _, r in runs for rd in r["runs"])]
    out = {}
    for name in names:
        pre, dec, per_run = [], [], []
        for path, res in runs:
            if not all(name in rd for rd in res["runs"]):
                raise PoolError(f"{path}: configuration {name!r} is not in every round "
                                f"(has {sorted(res['runs'][0])})")
            p = [pair for rd in res["runs"] for pair in rd[name]["prefill_pairs_s"]]
            d = [pair for rd in res["runs"] for pair in rd[name]["decode_pairs_s"]]
            pre.append(p)
            dec.append(d)
            per_run.append({"run": str(path), "git_sha": res["machine"].get("git_sha"),
                            "date": res["machine"].get("date"),
                            "ram_prefill_tok_s": res["summary"]["ram_model"]["prefill_tok_s"],
                            "prefill": pooled([p]), "decode": pooled([d])})
        pf, dc = pooled(pre), pooled(dec)
        # the target is on tokens/s, i.e. the total-time ratio: met when its whole 95% interval is at or
        # above it; the median of pair ratios (robust to single slow pairs) is reported beside it
        out[name] = {"prefill": pf, "decode": dc,
                     "meets_target_prefill": pf["total_ci95"][0] >= TARGET,
                     "meets_target_decode": dc["total_ci95"][0] >= TARGET,
                     "median_interval_above_target": {"prefill": pf["median_ci95"][0] >= TARGET,
                                                      "decode": dc["median_ci95"][0] >= TARGET},
                     "per_run": per_run}
    first = runs[0][1]
    return {"benchmark": "offload_pooled", "machine": machine_info(), "target": TARGET,
            "measured": {k: first.get(k) for k in SAME if k != "layout_used"} | {"layout": first["layout_used"]},
            "git_shas": sorted({str(r["machine"].get("git_sha")) for _, r in runs}), "configs": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="bench_offload.py JSON results (--out files)")
    ap.add_argument("--config", nargs="+", default=None, help="configurations to pool (default: all in every run)")
    ap.add_argument("--same-sha", action="store_true", help="refuse runs measured at different git commits")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        res = pool(args.runs, args.config, args.same_sha)
    except PoolError as e:
        print(f"pool_offload: {e}", file=sys.stderr)
        return 2
    emit(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
