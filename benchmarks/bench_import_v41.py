"""Streaming import benchmark: write a synthetic V4.1 checkpoint, `engram import-v41` it, measure.

Measures the import alone (a child process, so its figures are its own): wall time, peak RSS
(ru_maxrss of the import process and its children, from wait4), bytes written and throughput; the
checkpoint writer's time is reported apart. Before writing anything it checks the free disk space
of --dir: the checkpoint plus the store need ~2.2x the checkpoint's size; with less it prints
{"status": "skipped", "reason": ...} and exits 0. JSON goes to stdout and to --out with the machine.

    python benchmarks/bench_import_v41.py --gb 2            # a 2 GiB table checkpoint at released widths
    python benchmarks/bench_import_v41.py                   # the streaming benchmark: > 32 GB of tables
    python benchmarks/bench_import_v41.py --size tiny       # seconds (the test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine_info

HERE = Path(__file__).resolve().parent
NEED_FACTOR = 2.2  # checkpoint + store (the store is the tables plus 4 bytes per row and the dense weights)
RSS_LIMIT_MIB = 2048


def expected_bytes(size: str, gb: float | None) -> tuple[int, int]:
    """(table bytes, whole checkpoint bytes) that make_v41_checkpoint will write."""
    from make_v41_checkpoint import engram_config

    eng = engram_config(size, gb)
    E, D, H = eng["engram_head_dim"], eng["hidden_size"], eng["hc_mult"]
    C = (eng["engram_max_ngram_size"] - 1) * eng["engram_n_heads"]
    tables = sum(eng["engram_num_embeddings"]) * (E + E // 32)
    dense = 2 * (1024 * D + D
                 + len(eng["engram_layer_ids"]) * (D * (H + 1) * C * E + 2 * H * D))
    return tables, tables + dense


def _run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Run ``cmd``; returns (seconds, peak RSS MiB of it and its children, stderr tail)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}): {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, err[-500:]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "bench"], default="bench", help="checkpoint widths (make_v41_checkpoint)")
    p.add_argument("--gb", type=float, default=None, help="bench: total table GiB (default 33: over 32 GB)")
    p.add_argument("--dir", default=None, help="where to write checkpoint and store (default: a temp dir here)")
    p.add_argument("--chunk-mb", type=float, default=64.0, help="import chunk size (engram import-v41 --chunk-mb)")
    p.add_argument("--verify", action="store_true", help="also run `engram verify` on the store (reads it all)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and store")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    gb = a.gb if a.gb is not None else (33.0 if a.size == "bench" else None)
    table_bytes, ckpt_bytes = expected_bytes(a.size, gb)
    base = Path(a.dir) if a.dir else HERE
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    need = int(NEED_FACTOR * ckpt_bytes)
    result = {"benchmark": "import_v41", "size": a.size, "gb": gb, "table_bytes": table_bytes,
              "checkpoint_bytes": ckpt_bytes, "free_disk_bytes": free, "needed_disk_bytes": need,
              "chunk_mb": a.chunk_mb}
    if free < need:
        result.update(status="skipped", reason=f"{base} has {free / 2**30:.1f} GiB free, the checkpoint and its "
                                               f"store need ~{need / 2**30:.1f} GiB ({NEED_FACTOR}x "
                                               f"{ckpt_bytes / 2**30:.1f} GiB)", machine=machine_info())
        emit(result, a.out)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-import-v41-", dir=base))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        ckpt, store = work / "ckpt", work / "store"
        write_cmd = [sys.executable, str(HERE / "make_v41_checkpoint.py"), "--out", str(ckpt), "--size", a.size]
        if gb is not None:
            write_cmd += ["--gb", str(gb)]
        write_s, write_rss, _ = _run(write_cmd, env)
        imp_cmd = [sys.executable, "-m", "engram", "import-v41", str(ckpt), "--out", str(store),
                   "--chunk-mb", str(a.chunk_mb)]
        import_s, import_rss, _ = _run(imp_cmd, env)
        written = _dir_bytes(store)
        result.update(status="ok", checkpoint_bytes=_dir_bytes(ckpt), write_seconds=round(write_s, 2),
                      writer_peak_rss_mib=round(write_rss, 1), import_seconds=round(import_s, 2),
                      import_peak_rss_mib=round(import_rss, 1), rss_under_2gb=import_rss < RSS_LIMIT_MIB,
                      store_bytes=written, import_mib_per_s=round(table_bytes / 2**20 / import_s, 1),
                      written_mib_per_s=round(written / 2**20 / import_s, 1))
        if a.verify:
            verify_s, verify_rss, _ = _run([sys.executable, "-m", "engram", "verify", str(store), "--no-progress"], env)
            result.update(verify_seconds=round(verify_s, 2), verify_peak_rss_mib=round(verify_rss, 1))
        if a.keep:
            result["kept"] = str(work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"] = machine_info()
    emit(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
