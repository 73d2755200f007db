"""`engram import-v41`: a DeepSeek-V4.1 checkpoint's Engram tables into a store directory (engram.serve.v41_import)."""

from __future__ import annotations

import time
from pathlib import Path

from engram.cli.commands import _output_dir, _reading_user_input


def _import_v41(args) -> int:
    from engram.config import UserError
    from engram.serve.v41_import import import_v41

    if args.chunk_mb <= 0:
        raise UserError(f"--chunk-mb must be > 0, got {args.chunk_mb}")
    if not Path(args.checkpoint).is_dir():
        raise UserError(f"checkpoint directory {args.checkpoint} does not exist")
    _output_dir(args.out, "--out")
    from engram.v41 import V41Config

    with _reading_user_input():
        cfg = V41Config.from_pretrained(args.checkpoint)
    row_bytes = cfg.engram_head_dim * 33 // 32  # fp8 rows and their scales: what a chunk holds
    t0 = time.perf_counter()
    with _reading_user_input():
        out = import_v41(args.checkpoint, args.out, layers=args.layers,
                         chunk_rows=max(1, int(args.chunk_mb * 2**20) // row_bytes))
    seconds = time.perf_counter() - t0
    from engram.serve import read_manifest

    m = read_manifest(out)
    total = 0
    for lay, spec in sorted(m["layers"].items(), key=lambda kv: int(kv[0])):
        size = (out / spec["file"]).stat().st_size
        total += size
        print(f"layer {lay}: {out / spec['file']}  {spec['num_rows']:,} rows x {m['dim']} {m['dtype']}  "
              f"{size / 2**20:,.1f} MiB; dense weights: {spec['dense']}")
    print(f"manifest: {out / 'manifest.json'}  ({total / 2**20:,.1f} MiB in {seconds:.1f} s)")
    return 0


def add_parsers(sub, formatter, at_least) -> None:
    s = sub.add_parser("import-v41",
                       help="stream a DeepSeek-V4.1 checkpoint's Engram tables into a store directory")
    s.add_argument("checkpoint", help="checkpoint directory: config.json, model.safetensors.index.json, shards")
    s.add_argument("--out", required=True, help="store directory to write (one file per layer + manifest.json)")
    s.add_argument("--layers", type=at_least(0), nargs="+",
                   help="Engram layer ids to import (default: every one in the config)")
    s.add_argument("--chunk-mb", type=float, default=64.0,
                   help="table MiB read and written per step: memory stays at a few of these")
    s.set_defaults(func=_import_v41)
