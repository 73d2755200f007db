"""CPU and wall time per cold row read from a store file: direct reads (io_uring + O_DIRECT) vs the mapping.

On a machine whose cores also run the model, what a cold row costs is mostly CPU (the kernel's work
per read), not waiting. This measures both for `DiskStore` gathers of N random distinct rows of a
table much larger than any cache, with the file's page cache dropped before each run:

  * direct: `DiskStore(io="direct")` -- 512-byte-aligned O_DIRECT reads through io_uring, 128 in flight;
  * mmap: `DiskStore(io="mmap")` -- `posix_fadvise(WILLNEED)` per page run, then the copy faults the
    pages in;
  * mmap_faults: `DiskStore(io="mmap", readahead=False)` -- one page fault at a time.

CPU = this process's user + system time during the gather (`os.times`); reads done on behalf of the
process in kernel threads or interrupts may escape it. Rounds alternate the modes; medians reported.
`interference`: what N background reads add to a two-thread computation running meanwhile, per row,
next to the reading thread's own CPU and the VM's steal time (see `interference`).
`submit_latency`: wall time to submit n random direct reads and to collect them 3 ms later (median
of 40), which shows whether the device takes submissions asynchronously.

Run: .venv/bin/python benchmarks/bench_disk_reads.py --dir DIR [--gib 4] [--rows 50000] [--out F]
"""

# Legend: R table rows, d row width, U distinct rows read.

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from engram.store import blockdev, native_io
from engram.store.base import write_store
from engram.store.disk import DiskStore

from common import emit, machine_info, steal_seconds


def submit_latency(path: Path, R: int, dim: int, rng, reps: int = 40) -> dict:
    """Wall time of submitting n direct reads (``native_io.start_rows``) and of collecting them 3 ms later.

    On a device whose queue accepts a submission in microseconds the start returns at once and the
    reads land while the caller computes; where the submission itself waits for the device (some
    virtual disks), the start takes as long as the reads and the early submission hides nothing.
    """
    out = {}
    with DiskStore.open(path, io="direct") as store:
        ring = native_io.Ring(fd=store._dfd)
        try:
            for n in (1, 8, 32, 128):
                t_start, t_collect = [], []
                for _ in range(reps):
                    rows = np.unique(rng.integers(0, R, n))
                    buf = np.empty((rows.size, dim), np.float32)
                    t0 = time.perf_counter()
                    pending = native_io.start_rows(ring, store._dfd, rows, dim * 4, store.header.data_offset,
                                                   store._block, buf)
                    t1 = time.perf_counter()
                    time.sleep(0.003)
                    t2 = time.perf_counter()
                    pending.wait()
                    t3 = time.perf_counter()
                    assert np.array_equal(buf[:, 0], rows.astype(np.float32)), "rows read back wrong"
                    t_start.append(t1 - t0)
                    t_collect.append(t3 - t2)
                out[str(n)] = {"start_us": round(1e6 * statistics.median(t_start), 1),
                               "collect_after_3ms_us": round(1e6 * statistics.median(t_collect), 1)}
        finally:
            ring.close()
    return out


def interference(path: Path, R: int, dim: int, rng, reads: int, reps: int) -> dict:
    """What ``reads`` cold direct reads in a background thread cost a two-thread computation running
    meanwhile (~0.5 s of matrix products, the model's kind of work), paired over ``reps``.

    Each rep runs the computation alone and with the reads (order alternating) and records wall
    time, the reading thread's own CPU (``time.thread_time``) and the VM's steal (``/proc/stat``):
    the extra wall time over the reads' own CPU is what the reads cost beyond their guest CPU
    (a compute thread descheduled while the other waits at a barrier, host-side device emulation
    taking the vCPUs).
    """
    a, w = torch.randn(2048, 512), torch.randn(512, 1536)

    def compute():
        for _ in range(8):
            torch.relu(a @ w) @ w.T

    def read(rows, out):
        c0 = time.thread_time()
        with DiskStore.open(path, io="direct") as store:
            got = store.gather(rows)
            assert torch.equal(got[:, 0], rows.to(torch.float32)), "rows read back wrong"
            out["reads"] = store.direct_counts()["reads"]
        out["cpu_s"] = time.thread_time() - c0

    compute()
    extra, cpu, steal_with, steal_alone, n_reads, alone = [], [], [], [], [], []
    for rep in range(reps):
        rows = torch.from_numpy(np.unique(rng.integers(0, R, reads)))
        t = {}
        for mode in (("alone", "with") if rep % 2 == 0 else ("with", "alone")):
            out: dict = {}
            th = threading.Thread(target=read, args=(rows, out)) if mode == "with" else None
            s0, t0 = steal_seconds(), time.perf_counter()
            if th is not None:
                th.start()
            compute()
            if th is not None:
                th.join()
            t[mode] = (time.perf_counter() - t0, (steal_seconds() or 0.0) - (s0 or 0.0))
            if th is not None:
                if "cpu_s" not in out:
                    raise RuntimeError("the background reads failed (see the thread's traceback above)")
                cpu.append(out["cpu_s"] / rows.numel())
                n_reads.append(out["reads"])
        alone.append(t["alone"][0])
        extra.append((t["with"][0] - t["alone"][0]) / rows.numel())
        steal_with.append(t["with"][1] / rows.numel())
        steal_alone.append(t["alone"][1] / rows.numel())
    us = lambda v: round(1e6 * statistics.median(v), 2)  # noqa: E731
    return {"rows": reads, "reps": reps, "compute_s": round(statistics.median(alone), 3),
            "reads_per_rep": statistics.median(n_reads),
            "extra_wall_us_per_row": us(extra), "reader_cpu_us_per_row": us(cpu),
            "steal_us_per_row_with_reads": round(1e6 * statistics.mean(steal_with), 2),
            "steal_us_per_row_alone": round(1e6 * statistics.mean(steal_alone), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="disk-reads-bench")
    ap.add_argument("--gib", type=float, default=4.0, help="table size")
    ap.add_argument("--dim", type=int, default=64, help="fp32 row width (64: 256-byte rows)")
    ap.add_argument("--rows", type=int, default=50_000, help="distinct random rows per gather")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-schedulers", nargs="+", metavar="NAME",
                    help="also run the direct reads under each of these I/O schedulers of the file's device "
                         "(e.g. mq-deadline none; runs named direct@NAME; needs root, restored after each run)")
    ap.add_argument("--interference-rows", type=int, default=5000,
                    help="rows read in the background of a two-thread computation (0: skip that part)")
    ap.add_argument("--interference-reps", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    res: dict = {"benchmark": "disk_reads", "machine": machine_info(),
                 "direct_io": native_io.available(), "direct_io_reason": native_io.unavailable_reason()}
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    R = int(args.gib * 2**30) // (args.dim * 4)
    need = R * args.dim * 4 + 2**30
    if shutil.disk_usage(work).free < need:
        res["skipped"] = f"cannot run: {work} has {shutil.disk_usage(work).free / 2**30:.1f} GiB free, needs " \
                         f"{need / 2**30:.1f} GiB"
        emit(res, args.out)
        return
    path = work / "table.rows"
    t0 = time.perf_counter()

    def chunks():  # a generated table: writing it must not need it in RAM
        for start in range(0, R, 1 << 20):
            n = min(1 << 20, R - start)
            yield torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, args.dim).contiguous()

    write_store(path, chunks(), num_rows=R, dim=args.dim, dtype=torch.float32)
    res["table"] = {"rows": R, "row_bytes": args.dim * 4, "gib": round(R * args.dim * 4 / 2**30, 2),
                    "write_s": round(time.perf_counter() - t0, 1)}
    res["io_scheduler"] = blockdev.io_scheduler(path)
    modes = [("mmap", dict(io="mmap"), None), ("mmap_faults", dict(io="mmap", readahead=False), None)]
    if native_io.available():
        modes.insert(0, ("direct", dict(io="direct"), None))
        modes[1:1] = [(f"direct@{s}", dict(io="direct"), s) for s in args.io_schedulers or ()]
    rng = np.random.default_rng(0)
    runs: dict[str, list] = {m: [] for m, _, _ in modes}
    for _ in range(args.rounds):
        for name, kw, sched in modes:
            rows = torch.from_numpy(np.unique(rng.integers(0, R, args.rows)))
            with blockdev.scheduler_set(path, sched), DiskStore.open(path, **kw) as store:
                store.drop_page_cache()
                c0, w0 = os.times(), time.perf_counter()
                out = store.gather(rows)
                w1, c1 = time.perf_counter(), os.times()
                assert torch.equal(out[:, 0], rows.to(torch.float32)), "rows read back wrong"
                cpu = (c1.user - c0.user) + (c1.system - c0.system)
                runs[name].append({"wall_s": w1 - w0, "cpu_s": cpu, "rows": rows.numel(),
                                   "reads": store.direct_counts()["reads"] if kw["io"] == "direct" else None})
    if native_io.available():
        res["submit_latency"] = submit_latency(path, R, args.dim, rng)
        if args.interference_rows > 0:
            res["interference"] = interference(path, R, args.dim, rng, args.interference_rows,
                                               args.interference_reps)
    res["modes"] = {}
    for name, rs in runs.items():
        n = rs[0]["rows"]
        res["modes"][name] = {
            "rows_per_s": round(n / statistics.median(r["wall_s"] for r in rs)),
            "cpu_us_per_row": round(1e6 * statistics.median(r["cpu_s"] for r in rs) / n, 2),
            "wall_us_per_row": round(1e6 * statistics.median(r["wall_s"] for r in rs) / n, 2),
            "reads": rs[0]["reads"], "rounds": len(rs)}
    emit(res, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
