"""`engram` commands on trained models: generate, export-memory, verify, eval (tables in RAM or on disk)."""

from __future__ import annotations

import json
import sys

from engram.cli.commands import _output_dir, _reading_user_input


def _model_config(model_dir: str):
    """The ModelConfig of the model directory ``--model`` names; a UserError that says what is wrong
    with the path (missing, a file, a run directory instead of its ``model/``) otherwise."""
    from pathlib import Path

    from engram.config import UserError
    from engram.model.persistence import CONFIG_FILE, WEIGHTS_FILE, load_config

    d = Path(model_dir)
    if not d.exists():
        raise UserError(f"--model {d}: no such directory")
    if not d.is_dir():
        raise UserError(f"--model {d} is a file; it takes a model directory (a run's RUN_DIR/model)")
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (d / name).is_file()]
    if missing:
        hint = (f"; did you mean {d / 'model'}?" if (d / "model" / WEIGHTS_FILE).is_file()
                else " (a trained model is in RUN_DIR/model)")
        raise UserError(f"--model {d} is not a model directory: it has no {missing[0]}{hint}")
    with _reading_user_input():
        return load_config(d)


def _tokenizer_spec(model_dir: str, override: str | None) -> str:
    from pathlib import Path

    from engram.config import UserError

    if override is not None:
        return override
    saved, named = Path(model_dir) / "tokenizer", Path(model_dir) / "tokenizer.txt"
    if saved.is_dir():
        return str(saved)
    if not named.is_file():
        raise UserError(f"{model_dir} has no tokenizer (neither tokenizer/ nor tokenizer.txt): pass --tokenizer")
    return named.read_text().strip()


def _serving_device(args):
    """The device ``--device`` names for the model (after `sharded.resolve_memory`): the CPU for
    ``--memory sharded``, whose ranks exchange rows over gloo for now."""
    import torch

    from engram.config import UserError
    from engram.train.probe import resolve_device

    if args.memory != "sharded":
        return resolve_device(args.device)
    if args.device not in ("auto", "cpu"):
        resolve_device(args.device)  # a spelling that names no device says so first
        raise UserError(f"--device {args.device}: --memory sharded runs on the CPU for now; use --device cpu "
                        f"(or auto)")
    return torch.device("cpu")


def _open_memory(args, profile_batches=None, device=None):
    """The OffloadedLM the --memory/--store/--cache-mb/--policy options describe, its backbone on ``device``
    (default: the CPU)."""
    from pathlib import Path

    from engram.config import UserError
    from engram.serve import access_profiles, open_memory

    if args.memory == "disk" and not args.store:
        raise UserError("--memory disk needs --store DIR (a directory written by `engram export-memory`)")
    if args.store and Path(args.store).exists() and not Path(args.store).is_dir():
        raise UserError(f"--store {args.store} is a file; it takes a store directory (see `engram export-memory`)")
    profile = None
    if args.policy == "static" and args.cache_mb > 0:
        from engram.model import EngramLM

        with _reading_user_input():
            bare = EngramLM.from_pretrained(args.model, tables=False)
        # Rank rows by their counts on the train split, never on what is evaluated.
        profile = access_profiles(bare, profile_batches())
    model = None
    if device is not None and device.type != "cpu":
        from engram.model import EngramLM

        with _reading_user_input():
            model = EngramLM.from_pretrained(args.model, tables=False, map_location=device).eval()
    with _reading_user_input():
        return open_memory(args.model, args.memory, args.store, cache_bytes=int(args.cache_mb * 2**20),
                           policy=args.policy, profile=profile, prefetch=not args.no_prefetch, workers=args.workers,
                           io=args.io, model=model)


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

    from engram.cli import sharded
    from engram.config import UserError
    from engram.model import EngramLM
    from engram.model.generation import generate
    from engram.tokenizer import load_tokenizer

    cfg = _model_config(args.model)
    sharded.resolve_memory(args, None)
    device = _serving_device(args)
    if args.memory is None and (args.store or args.cache_mb or args.no_prefetch):
        raise UserError("--store, --cache-mb and --no-prefetch apply to --memory ram|disk; pass --memory too")
    with _reading_user_input():
        tok = load_tokenizer(_tokenizer_spec(args.model, args.tokenizer))
    ids = tok(args.prompt, add_special_tokens=False).input_ids
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    n_new = _context_budget(len(ids), args.max_new_tokens, cfg.max_seq_len)
    if args.memory == "sharded":
        return sharded.generate(args, tok, ids, n_new)
    g = torch.Generator(device=device).manual_seed(args.seed)  # sampling draws where the logits are
    if args.memory is None:
        with _reading_user_input():
            model = EngramLM.from_pretrained(args.model, map_location=device).eval()
        with torch.no_grad():
            out = generate(model, torch.tensor([ids]), n_new, temperature=args.temperature, top_k=args.top_k,
                           generator=g)
        print(tok.decode(out[0].tolist()))
        return 0
    with _open_memory(args, lambda: _train_windows(args, 64), device) as lm:
        out = lm.generate(torch.tensor([ids]), n_new, temperature=args.temperature, top_k=args.top_k, generator=g)
        print(tok.decode(out[0].tolist()))
        _print_memory_stats(lm, sys.stderr)
    return 0


def _context_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """How many tokens `generate` samples: ``--max-new-tokens``, capped (with a notice on stderr) where
    prompt + new tokens would run past the model's context; a UserError when the prompt fills it."""
    from engram.config import UserError

    if max_new_tokens > 0 and prompt_tokens >= context:
        raise UserError(f"the prompt has {prompt_tokens} tokens and the model's context is {context}: "
                        f"no room for new tokens; use a shorter prompt")
    room = context - prompt_tokens
    if max_new_tokens > room:
        print(f"engram generate: --max-new-tokens {max_new_tokens} capped to {room} to fit the model's "
              f"{context}-token context (prompt: {prompt_tokens} tokens)", file=sys.stderr)
        return room
    return max_new_tokens


def _export_memory(args) -> int:
    from engram.config import UserError
    from engram.serve import export_tables, read_manifest
    from engram.store.format import read_header

    layouts = None
    if args.layout_tokens < 0:
        raise UserError(f"--layout-tokens must be >= 0, got {args.layout_tokens}")
    _model_config(args.model)
    _output_dir(args.out, "--out")
    if args.layout_tokens:
        from engram.model import EngramLM
        from engram.serve.export import co_access_layouts

        with _reading_user_input():
            model = EngramLM.from_pretrained(args.model, tables=False)
        seq_len = min(model.cfg.max_seq_len, 256)
        layouts = co_access_layouts(model, _train_windows(args, seq_len, args.layout_tokens))
    with _reading_user_input():
        out = export_tables(args.model, args.out, layouts=layouts, dtype=args.dtype)
    m = read_manifest(out)
    for lay, spec in sorted(m["layers"].items(), key=lambda kv: int(kv[0])):
        size = (out / spec["file"]).stat().st_size
        placed = (read_header(out / spec["file"]).meta.get("layout") or {}).get("placed")
        order = f"  co-access layout: {placed:,} rows placed" if placed is not None else ""
        print(f"layer {lay}: {out / spec['file']}  {spec['num_rows']:,} rows x {m['dim']} {m['dtype']}  "
              f"{size / 2**20:,.1f} MiB{order}")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


def _verify(args) -> int:
    from engram.serve.verify import verify_store_dir
    from engram.store.format import StoreFormatError

    with _reading_user_input():
        report = verify_store_dir(args.store, progress=False if args.no_progress else None)
    if not report.ok:  # one line, exit 2, like every other damaged-store error
        raise StoreFormatError(report.summary())
    print(report.summary())
    return 0


def _eval(args) -> int:
    import time

    from engram.cli import sharded
    from engram.config import UserError
    from engram.data import prepare_data, val_batches
    from engram.model import EngramLM

    _model_config(args.model)
    sharded.resolve_memory(args, "ram")
    device = _serving_device(args)
    with _reading_user_input():
        cfg = EngramLM.from_pretrained(args.model, tables=False).cfg
    seq_len = args.seq_len or min(cfg.max_seq_len, 128)
    if seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context ({cfg.max_seq_len} tokens)")
    if args.memory == "sharded":
        return sharded.evaluate(args, cfg, seq_len)
    # The memory first: a bad store fails before the corpus is read (and tokenised, on a first run).
    with _open_memory(args, lambda: _train_windows(args, seq_len), device) as lm:
        with _reading_user_input():
            data = prepare_data(args.data, _tokenizer_spec(args.model, args.tokenizer))
        if data.vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer has {data.vocab_size} ids but the model only {cfg.vocab_size}")
        with _reading_user_input():  # --batch-size, --seq-len, --eval-tokens against the split
            batches = val_batches(data.val, args.batch_size, seq_len, args.eval_tokens)
        batches = [(x.to(device), y.to(device)) for x, y in batches]
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
