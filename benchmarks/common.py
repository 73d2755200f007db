"""Shared helpers for the benchmark scripts: machine info and JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, library versions, git SHA."""
    import numpy as np
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem_gib,
        "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "git_sha": sha, "date": time.strftime("%Y-%m-%d"),
    }


def emit(result: dict, out: str | None = None) -> None:
    """Print the result as JSON (and write it to `out` when given)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def timeit(fn, *, repeat: int = 5, warmup: int = 1) -> dict:
    """Median and best wall time of `fn()` over `repeat` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "best_s": times[0], "repeat": repeat}


def _resample_idx(n: int, seed: int, resamples: int, strata: list[int] | None):
    """Bootstrap indices (resamples, n) into n items; with ``strata`` (group sizes summing to n, the
    items ordered by group) each group is resampled within itself and keeps its size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = [n] if strata is None else list(strata)
    if sum(sizes) != n:
        raise ValueError(f"strata sizes {sizes} do not add up to {n} items")
    parts, start = [], 0
    for k in sizes:
        parts.append(start + rng.integers(0, k, size=(resamples, k)))
        start += k
    return np.concatenate(parts, axis=1)


def median_ci(ratios, seed: int = 0, resamples: int = 2000, strata: list[int] | None = None) -> dict:
    """Median of paired ratios with a bootstrap 95% interval: ``{"median", "ci95", "pairs"}``
    (``strata``: see :func:`_resample_idx`)."""
    import numpy as np

    r = np.asarray(ratios, dtype=np.float64)
    boot = np.median(r[_resample_idx(len(r), seed, resamples, strata)], axis=1)
    return {"median": round(float(np.median(r)), 3),
            "ci95": [round(float(np.quantile(boot, 0.025)), 3), round(float(np.quantile(boot, 0.975)), 3)],
            "pairs": len(r)}


def total_ratio_ci(pairs, seed: int = 0, resamples: int = 2000, strata: list[int] | None = None) -> dict:
    """Throughput ratio of paired timings ``[(reference_s, candidate_s), ...]``: total reference time
    over total candidate time, with a bootstrap 95% interval over the pairs: ``{"ratio", "ci95", "pairs"}``.

    Unlike the median of per-pair ratios, every slow pair counts in full, as it does in tokens/s.
    """
    import numpy as np

    t = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    idx = _resample_idx(len(t), seed, resamples, strata)
    boot = t[idx, 0].sum(axis=1) / t[idx, 1].sum(axis=1)
    return {"ratio": round(float(t[:, 0].sum() / t[:, 1].sum()), 3),
            "ci95": [round(float(np.quantile(boot, 0.025)), 3), round(float(np.quantile(boot, 0.975)), 3)],
            "pairs": len(t)}


def steal_seconds(stat: str | Path = "/proc/stat") -> float | None:
    """CPU time the hypervisor ran something else on this VM's vCPUs, all CPUs together (Linux
    ``/proc/stat`` "steal", in clock ticks); None where not available.

    On a virtual machine whose device emulation shares the host cores with the vCPUs, a disk read
    also costs host CPU that the guest sees only as steal while its vCPUs are busy.
    """
    try:
        fields = Path(stat).read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
