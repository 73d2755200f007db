"""The `engram` command. It only parses arguments and calls into the package.

Errors: a known user error (see `is_user_error`) prints one line, ``engram: error: ...``, and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


@contextlib.contextmanager
def _reading_user_input():
    """Wrap the loading of something the user named (a tokenizer, corpus, model or store
    directory): there a ValueError means that input is unusable, and becomes a UserError."""
    from engram.config import UserError

    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e


def _vocab_stats(args) -> int:
    from engram.tokenizer import CompressedVocab

    with _reading_user_input():
        vocab = CompressedVocab.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    s = vocab.stats(top=args.top)
    if args.save:
        with _reading_user_input():
            vocab.save(args.save)
    if args.json:
        print(json.dumps(s, ensure_ascii=False, indent=2))
        return 0
    print(f"tokenizer         {s['source']}")
    print(f"original ids      {s['original_size']:,}")
    print(f"compressed ids    {s['compressed_size']:,}")
    print(f"reduction         {s['ratio']:.2%}")
    print(f"merged groups     {s['merged_groups']:,}")
    print(f"\n{'key':>10}  {'size':>4}  original tokens")
    for g in s["top_groups"]:
        toks = ", ".join(repr(t) for t in g["tokens"][:10])
        more = ", ..." if g["size"] > 10 else ""
        print(f"{g['key']!r:>10}  {g['size']:>4}  {toks}{more}")
    if args.save:
        print(f"\nsaved to {args.save}")
    return 0


def _hash(args) -> int:
    import numpy as np

    from engram.config import engram_preset
    from engram.hashing import NgramHasher
    from engram.tokenizer import CompressedVocab

    cfg = engram_preset(args.preset)
    with _reading_user_input():
        vocab = CompressedVocab.from_pretrained(args.tokenizer)
    hasher = NgramHasher.from_config(cfg, vocab)
    ids = vocab.tokenizer(args.text).input_ids
    rows = hasher.hash(vocab(np.array([ids])))
    out = {"tokens": vocab.tokenizer.convert_ids_to_tokens(ids), "ids": ids,
           "compressed_ids": vocab(np.array(ids)).tolist(),
           "table_sizes": {str(k): v for k, v in hasher.table_sizes.items()},
           "rows": {str(k): v[0].tolist() for k, v in rows.items()}}
    print(json.dumps(out, ensure_ascii=False))
    return 0


def _demo(args) -> int:
    from engram.demo import run

    run(args.tokenizer)
    return 0


def _resolve_run_config(args):
    from engram.train.config import apply_overrides, run_preset

    cfg = run_preset(args.preset)
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.data={list(args.data)!r}")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={args.tokenizer!r}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _train(args) -> int:
    import time
    from pathlib import Path

    from engram.train.trainer import Trainer, TrainingDiverged, prepare_run_data

    cfg = _resolve_run_config(args)
    run_dir = Path(args.run_dir or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    with _reading_user_input():
        data = prepare_run_data(cfg)
    try:
        res = Trainer(cfg, run_dir, resume=args.resume, data=data, progress=not args.no_progress).train()
    except TrainingDiverged as e:
        print(f"engram train: {e}", file=sys.stderr)
        return 3
    val = f"{res.val_loss:.4f}" if res.val_loss is not None else "n/a"
    mfu = f", MFU {res.mfu:.1%}" if res.mfu else ""
    print(f"{res.status} at step {res.step}: {res.tokens:,} tokens, val loss {val}, "
          f"{res.tokens_per_s:,.0f} tokens/s{mfu}")
    print(f"run directory: {run_dir}")
    return 0 if res.status == "finished" else 130


def _compare(args) -> int:
    import time
    from pathlib import Path

    from engram.train.compare import run_compare, variants
    from engram.train.trainer import prepare_run_data

    cfg = _resolve_run_config(args)
    variants(cfg, args.experts_moved)  # an impossible split fails before the corpus is read
    out = Path(args.out or f"runs/compare-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    with _reading_user_input():
        data = prepare_run_data(cfg)
    run_compare(cfg, out, n_experts_moved=args.experts_moved, seeds=tuple(args.seeds),
                progress=not args.no_progress, data=data)
    return 0


def _tokenizer_spec(model_dir: str, override: str | None) -> str:
    from pathlib import Path

    if override is not None:
        return override
    saved = Path(model_dir) / "tokenizer"
    return str(saved) if saved.is_dir() else (Path(model_dir) / "tokenizer.txt").read_text().strip()


def _open_memory(args, profile_batches=None):
    """The OffloadedLM the --memory/--store/--cache-mb/--policy options describe."""
    from engram.config import UserError
    from engram.serve import access_profiles, open_memory

    if args.memory == "disk" and not args.store:
        raise UserError("--memory disk needs --store DIR (a directory written by `engram export-memory`)")
    profile = None
    if args.policy == "static" and args.cache_mb > 0:
        from engram.model import EngramLM

        with _reading_user_input():
            bare = EngramLM.from_pretrained(args.model, tables=False)
        # Rank rows by their counts on the train split, never on what is evaluated.
        profile = access_profiles(bare, profile_batches())
    with _reading_user_input():
        return open_memory(args.model, args.memory, args.store, cache_bytes=int(args.cache_mb * 2**20),
                           policy=args.policy, profile=profile, prefetch=not args.no_prefetch, workers=args.workers,
                           io=args.io)


def _print_memory_stats(lm, file) -> None:
    import logging

    from engram.serve import format_tier_stats

    tiers = lm.tier_stats()
    logging.getLogger("engram.serve").info("memory tier stats: %s", tiers)
    print(format_tier_stats(tiers), file=file)
    sched = _store_io_scheduler(lm)
    if sched is not None:
        hint = ("" if sched["active"] == "none" or "none" not in sched["available"] else
                " (random direct reads cost less CPU under 'none', NVMe's default; see README)")
        print(f"store device {sched['device']}: I/O scheduler {sched['active']}{hint}", file=file)


def _store_io_scheduler(lm) -> dict | None:
    """The I/O scheduler of the device under the first disk store behind ``lm`` (None: no disk store)."""
    from engram.store.blockdev import io_scheduler

    for s in lm.stores.values():
        disk = getattr(s, "backing", s)
        if getattr(disk, "tier", None) == "disk":
            return io_scheduler(disk.path)
    return None


def _train_windows(args, seq_len: int, tokens: int | None = None):
    """Token-id windows of the data's train split, for an access profile (``tokens``: --profile-tokens)."""
    from engram.data import BatchSampler, prepare_data

    with _reading_user_input():
        data = prepare_data(args.data, _tokenizer_spec(args.model, args.tokenizer))
    n = max(1, (args.profile_tokens if tokens is None else tokens) // (8 * seq_len))
    sampler = BatchSampler(data.train, 8, seq_len, seed=0)
    return [sampler.batch_at(i)[0] for i in range(n)]


def _generate(args) -> int:
    import torch

    from engram.config import UserError
    from engram.model import EngramLM
    from engram.model.generation import generate
    from engram.tokenizer import load_tokenizer

    with _reading_user_input():
        tok = load_tokenizer(_tokenizer_spec(args.model, args.tokenizer))
    ids = tok(args.prompt, add_special_tokens=False).input_ids
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    g = torch.Generator().manual_seed(args.seed)
    if args.memory is None and (args.store or args.cache_mb or args.no_prefetch):
        raise UserError("--store, --cache-mb and --no-prefetch apply to --memory ram|disk; pass --memory too")
    if args.memory is None:
        with _reading_user_input():
            model = EngramLM.from_pretrained(args.model).eval()
        with torch.no_grad():
            out = generate(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, generator=g)
        print(tok.decode(out[0].tolist()))
        return 0
    with _open_memory(args, lambda: _train_windows(args, 64)) as lm:
        out = lm.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, generator=g)
        print(tok.decode(out[0].tolist()))
        _print_memory_stats(lm, sys.stderr)
    return 0


def _export_memory(args) -> int:
    from engram.config import UserError
    from engram.serve import export_tables, read_manifest
    from engram.store.format import read_header

    layouts = None
    if args.layout_tokens < 0:
        raise UserError(f"--layout-tokens must be >= 0, got {args.layout_tokens}")
    if args.layout_tokens:
        from engram.model import EngramLM
        from engram.serve.export import co_access_layouts

        with _reading_user_input():
            model = EngramLM.from_pretrained(args.model, tables=False)
        seq_len = min(model.cfg.max_seq_len, 256)
        layouts = co_access_layouts(model, _train_windows(args, seq_len, args.layout_tokens))
    with _reading_user_input():
        out = export_tables(args.model, args.out, layouts=layouts)
    m = read_manifest(out)
    for lay, spec in sorted(m["layers"].items(), key=lambda kv: int(kv[0])):
        size = (out / spec["file"]).stat().st_size
        placed = (read_header(out / spec["file"]).meta.get("layout") or {}).get("placed")
        order = f"  co-access layout: {placed:,} rows placed" if placed is not None else ""
        print(f"layer {lay}: {out / spec['file']}  {spec['num_rows']:,} rows x {m['dim']} {m['dtype']}  "
              f"{size / 2**20:,.1f} MiB{order}")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


def _eval(args) -> int:
    import time

    from engram.config import UserError
    from engram.data import prepare_data, val_batches
    from engram.model import EngramLM

    with _reading_user_input():
        cfg = EngramLM.from_pretrained(args.model, tables=False).cfg
    seq_len = args.seq_len or min(cfg.max_seq_len, 128)
    # The memory first: a bad store fails before the corpus is read (and tokenised, on a first run).
    with _open_memory(args, lambda: _train_windows(args, seq_len)) as lm:
        with _reading_user_input():
            data = prepare_data(args.data, _tokenizer_spec(args.model, args.tokenizer))
        if data.vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer has {data.vocab_size} ids but the model only {cfg.vocab_size}")
        with _reading_user_input():  # --batch-size, --seq-len, --eval-tokens against the split
            batches = val_batches(data.val, args.batch_size, seq_len, args.eval_tokens)
        if args.cold and lm.drop_page_cache() == 0:
            print("engram eval: --cold has no effect with --memory ram", file=sys.stderr)
        t0 = time.perf_counter()
        loss = lm.evaluate(batches)
        seconds = time.perf_counter() - t0
        tokens = sum(x.numel() for x, _ in batches)
        tiers = lm.tier_stats()
        if args.json:
            print(json.dumps({"val_loss": loss, "tokens": tokens, "seconds": seconds,
                              "tokens_per_s": tokens / seconds, "memory": args.memory, "cache_mb": args.cache_mb,
                              "policy": args.policy, "prefetch": not args.no_prefetch, "tiers": tiers,
                              "io_scheduler": _store_io_scheduler(lm)}))
            return 0
        cache = f", cache {args.cache_mb:g} MiB {args.policy}" if args.cache_mb > 0 else ""
        print(f"val loss  {loss:.4f}  ({tokens:,} tokens in {len(batches)} batches of {seq_len})")
        print(f"tokens/s  {tokens / seconds:,.0f}  (memory {args.memory}{cache}, "
              f"prefetch {'off' if args.no_prefetch else 'on'})")
        _print_memory_stats(lm, sys.stdout)
    return 0


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
    s.set_defaults(func=_vocab_stats)

    s = sub.add_parser("hash", help="print the Engram row ids of a text (JSON)")
    s.add_argument("text")
    s.add_argument("--tokenizer", default="mistral-tekken")
    _preset_arg(s, "engram", "engram-reference")
    s.set_defaults(func=_hash)

    s = sub.add_parser("train", help="train a model (see --preset and --set)")
    _add_run_args(s, "debug")
    s.add_argument("--run-dir", help="run directory (default runs/PRESET-TIMESTAMP)")
    s.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    s.set_defaults(func=_train)

    s = sub.add_parser("compare", help="train an MoE baseline and its iso-parameter Engram variant")
    _add_run_args(s, "demo")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--experts-moved", type=int, default=8,
                   help="routed experts per MoE layer moved into memory (8 of the demo's 32: 25%%)")
    s.add_argument("--out", help="output directory (default runs/compare-PRESET-TIMESTAMP)")
    s.set_defaults(func=_compare)

    s = sub.add_parser("generate", help="sample from a trained model (KV cache + incremental hashing)")
    s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    s.add_argument("--max-new-tokens", type=int, default=100)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    _add_memory_args(s, default=None)
    s.set_defaults(func=_generate)

    s = sub.add_parser("export-memory", help="write a model's Engram tables to a store directory (for --memory disk)")
    s.add_argument("--model", required=True, help="a model directory (save_pretrained)")
    s.add_argument("--out", required=True, help="store directory to write (one file per layer + manifest.json)")
    s.add_argument("--layout-tokens", type=int, default=0,
                   help="train-split tokens profiled to store rows in co-access order (fewer disk reads per "
                        "cold n-gram; 0: rows in id order)")
    s.add_argument("--data", nargs="+", help="corpus files/folders for the layout profile (default: the Python stdlib)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    s.set_defaults(func=_export_memory)

    s = sub.add_parser("eval", help="validation loss and throughput with the tables in RAM or on disk")
    s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    _add_memory_args(s, default="ram")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seq-len", type=int, help="tokens per sequence (default: min(max_seq_len, 128))")
    s.add_argument("--eval-tokens", type=int, default=1 << 15, help="validation tokens to evaluate")
    s.add_argument("--cold", action="store_true", help="drop the store files from the page cache first")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_eval)

    s = sub.add_parser("demo", help="compress a bundled tokenizer, hash a sentence, run the module")
    s.add_argument("--tokenizer", default="mistral-tekken")
    s.set_defaults(func=_demo)
    return p


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a known user error, reported as one line rather than a traceback.

    Exactly these: `engram.config.UserError` (its `ConfigError` included: an invalid setting,
    override or preset name, and the ValueErrors raised while loading a tokenizer, corpus, model or
    store the user named, which the commands convert); a missing, unreadable or wrong-kind path
    (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError); a damaged or
    foreign store file (`StoreFormatError`) or checkpoint (`CheckpointError`). Anything else, a
    plain ValueError from the computation included, is a bug and keeps its traceback.
    """
    from engram.config import UserError
    from engram.store.format import StoreFormatError
    from engram.train.checkpoint import CheckpointError

    return isinstance(e, (UserError, StoreFormatError, CheckpointError, FileNotFoundError, PermissionError,
                          IsADirectoryError, NotADirectoryError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not is_user_error(e):
            raise
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"engram: error: {msg or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
