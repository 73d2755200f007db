"""The `engram` argument parser: one subcommand per job, each bound to its function."""

from __future__ import annotations

import argparse

from engram.cli import commands, serving


def _add_memory_args(s, default: str | None) -> None:
    s.add_argument("--memory", choices=["ram", "disk"], default=default,
                   help="where the Engram tables live: ram, or disk (a store directory, see export-memory)")
    s.add_argument("--store", help="store directory written by `engram export-memory` (for --memory disk)")
    s.add_argument("--cache-mb", type=float, default=0.0, help="hot-row cache budget in MiB (0: no cache)")
    s.add_argument("--policy", choices=["lru", "lfu", "static"], default="lru",
                   help="cache policy; static keeps the rows most used on the train split")
    s.add_argument("--profile-tokens", type=int, default=1 << 18,
                   help="train tokens counted for the static policy's access profile")
    s.add_argument("--data", nargs="+", help="corpus files/folders (default: the Python stdlib)")
    s.add_argument("--io", choices=["auto", "direct", "mmap"], default="auto",
                   help="disk reads: O_DIRECT via io_uring (direct), the memory mapping (mmap), or direct where "
                        "available (auto)")
    s.add_argument("--no-prefetch", action="store_true", help="fetch rows synchronously (no worker threads)")
    s.add_argument("--workers", type=int, default=2, help="prefetch threads")


def _preset_arg(s, kind: str, default: str) -> None:
    """--preset, restricted to the registered presets of ``kind``, each described in --help."""
    import engram.train.config  # noqa: F401  (registers the run presets)
    from engram.config import PRESET_KINDS, presets

    known = presets(kind)
    listing = "; ".join(f"{n}: {p.description}" for n, p in known.items()).replace("%", "%%")
    s.add_argument("--preset", choices=list(known), default=default, metavar="NAME",
                   help=f"{PRESET_KINDS[kind]} preset (default {default}). {listing}")


def _add_run_args(s, default_preset: str) -> None:
    _preset_arg(s, "run", default_preset)
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")
    s.add_argument("--data", nargs="+", help="corpus files/folders (text or JSONL); default: the Python stdlib")
    s.add_argument("--tokenizer", help="tokenizer instead of the locally trained BPE")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram", description="Engram: conditional memory via n-gram lookup")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("vocab-stats", help="compress a tokenizer's vocabulary and show the merged groups")
    s.add_argument("tokenizer", help="tokenizer directory, tokenizer file, or bundled name (mistral-tekken, "
                                     "mistral-sp, ...)")
    s.add_argument("--top", type=int, default=10, help="how many of the largest merged groups to show")
    s.add_argument("--save", help="write the compressed map to this .safetensors file")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a tokenizer's own Python code")
    s.set_defaults(func=commands._vocab_stats)

    s = sub.add_parser("hash", help="print the Engram row ids of a text (JSON)")
    s.add_argument("text")
    s.add_argument("--tokenizer", default="mistral-tekken")
    _preset_arg(s, "engram", "engram-reference")
    s.set_defaults(func=commands._hash)

    s = sub.add_parser("train", help="train a model (see --preset and --set)")
    _add_run_args(s, "debug")
    s.add_argument("--run-dir", help="run directory (default runs/PRESET-TIMESTAMP)")
    s.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    s.set_defaults(func=commands._train)

    s = sub.add_parser("compare", help="train an MoE baseline and its iso-parameter Engram variant")
    _add_run_args(s, "demo")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--experts-moved", type=int, default=8,
                   help="routed experts per MoE layer moved into memory (8 of the demo's 32: 25%%)")
    s.add_argument("--out", help="output directory (default runs/compare-PRESET-TIMESTAMP)")
    s.set_defaults(func=commands._compare)

    s = sub.add_parser("generate", help="sample from a trained model (KV cache + incremental hashing)")
    s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    s.add_argument("--max-new-tokens", type=int, default=100)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    _add_memory_args(s, default=None)
    s.set_defaults(func=serving._generate)

    s = sub.add_parser("export-memory", help="write a model's Engram tables to a store directory (for --memory disk)")
    s.add_argument("--model", required=True, help="a model directory (save_pretrained)")
    s.add_argument("--out", required=True, help="store directory to write (one file per layer + manifest.json)")
    s.add_argument("--layout-tokens", type=int, default=0,
                   help="train-split tokens profiled to store rows in co-access order (fewer disk reads per "
                        "cold n-gram; 0: rows in id order)")
    s.add_argument("--data", nargs="+", help="corpus files/folders for the layout profile (default: the Python stdlib)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    s.set_defaults(func=serving._export_memory)

    s = sub.add_parser("verify", help="check a store directory: every row's checksum, headers, layouts, manifest")
    s.add_argument("store", help="store directory written by `engram export-memory`")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=serving._verify)

    s = sub.add_parser("eval", help="validation loss and throughput with the tables in RAM or on disk")
    s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    _add_memory_args(s, default="ram")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seq-len", type=int, help="tokens per sequence (default: min(max_seq_len, 128))")
    s.add_argument("--eval-tokens", type=int, default=1 << 15, help="validation tokens to evaluate")
    s.add_argument("--cold", action="store_true", help="drop the store files from the page cache first")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=serving._eval)

    s = sub.add_parser("demo", help="compress a bundled tokenizer, hash a sentence, run the module")
    s.add_argument("--tokenizer", default="mistral-tekken")
    s.set_defaults(func=commands._demo)
    return p
