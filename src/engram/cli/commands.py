"""`engram` commands on tokenizers and training: vocab-stats, hash, train, compare, demo."""

from __future__ import annotations

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


def _output_dir(path: str, option: str):
    """``path`` as the directory a command writes into, refused before any work when it or one of its
    parents is a file (one the user may not write fails at its creation, naming the path)."""
    from pathlib import Path

    from engram.config import UserError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {p} is a file, not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {p}: {parent} is a file, not a directory")
            break
    return p


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


def _resolve_run_config(args, base=None):
    """The RunConfig the options describe: ``--preset`` (or ``base``, a resumed run's own config)
    with ``--set``, ``--data`` and ``--tokenizer`` applied."""
    from engram.train.config import apply_overrides, run_preset

    cfg = base if base is not None else run_preset(args.preset or "debug")
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.data={list(args.data)!r}")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={args.tokenizer!r}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _resumed_run_config(args, run_dir):
    """A resumed run's config: its own record, with what the command line asks on top (the trainer
    accepts the changes `engram.train.resume.RESUMABLE` allows, reports them, refuses the rest)."""
    from engram.config import ConfigError
    from engram.train.config import RunConfig
    from engram.train.resume import load_run

    base = RunConfig.from_dict(load_run(run_dir).requested)
    if args.preset is not None and args.preset != base.preset:
        raise ConfigError(f"--resume: the run in {run_dir} was started with --preset {base.preset or '(none)'}, "
                          f"not {args.preset}; a resumed run keeps its own config")
    return _resolve_run_config(args, base)


def _distributed(args, run_dir=None):
    """The process group to train on when launched by torchrun (WORLD_SIZE set), or when resuming a run that was
    trained on several ranks in one process; None for a plain single-process run."""
    import os

    if "WORLD_SIZE" not in os.environ and run_dir is None:
        return None
    from engram.distributed.checkpoint import is_sharded_run
    from engram.distributed.launch import init_distributed

    if "WORLD_SIZE" not in os.environ and not is_sharded_run(run_dir):
        return None
    return init_distributed(device="cpu")


def _train_device(args, ctx):
    """The device ``--device`` names for training: any in a single process; the CPU for the row-sharded
    trainer (``--memory-budget-gb`` or torchrun), which the CLI runs over gloo for now."""
    from engram.config import UserError
    from engram.train.probe import resolve_device

    if ctx is None and getattr(args, "memory_budget_gb", None) is None:
        return resolve_device(args.device)
    if args.device not in ("auto", "cpu"):
        resolve_device(args.device)  # a spelling that names no device says so first
        raise UserError(f"--device {args.device}: the row-sharded trainer (torchrun or --memory-budget-gb) runs on "
                        f"the CPU for now; use --device cpu (or auto)")
    return resolve_device("cpu")


def _trainer_factory(args, ctx):
    """``make(cfg, run_dir, **kw)``: the single-process Trainer on ``--device``, or the row-sharded one on
    ``ctx`` (CPU)."""
    from engram.train.trainer import Trainer

    budget = getattr(args, "memory_budget_gb", None)
    device = _train_device(args, ctx)
    if ctx is None:
        if budget is not None:
            from engram.distributed.launch import init_distributed
            from engram.distributed.trainer import DistTrainer

            # The CLI trains on the CPU (gloo): no GPU selection yet, so NCCL is never picked under it.
            return lambda *a, **kw: DistTrainer(*a, ctx=init_distributed(device="cpu"),
                                                memory_budget_bytes=int(budget * 2**30),
                                                **kw)
        return lambda *a, **kw: Trainer(*a, device=device, **kw)
    from engram.distributed.trainer import DistTrainer

    return lambda *a, **kw: DistTrainer(*a, ctx=ctx, memory_budget_bytes=None if budget is None
                                        else int(budget * 2**30), **kw)


def _check_world(cfg, ctx) -> None:
    from engram.config import ConfigError

    if ctx is not None and cfg.train.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not divide over {ctx.world_size} ranks: "
                          f"the global batch is split evenly, so use a multiple of {ctx.world_size}")


def _train(args) -> int:
    import time

    from engram.config import UserError
    from engram.train.trainer import TrainingDiverged, prepare_run_data

    if args.resume:
        if not args.run_dir:
            raise UserError("--resume needs --run-dir DIR, the run to continue")
        run_dir = _output_dir(args.run_dir, "--run-dir")
        cfg = _resumed_run_config(args, run_dir)
        ctx = _distributed(args, run_dir)
    else:
        cfg = _resolve_run_config(args)
        ctx = _distributed(args)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        run_dir = _output_dir(args.run_dir or f"runs/{cfg.preset}-{stamp}", "--run-dir")
    _check_world(cfg, ctx)  # before the corpus is read
    make = _trainer_factory(args, ctx)  # a --device that names no device here fails here too
    main = ctx is None or ctx.is_main
    try:
        with _reading_user_input():
            if ctx is None:
                data = prepare_run_data(cfg)
            else:
                from engram.distributed.trainer import rank0_first

                data = rank0_first(lambda: prepare_run_data(cfg))
        res = make(cfg, run_dir, resume=args.resume, data=data, progress=not args.no_progress).train()
    except TrainingDiverged as e:  # not a user error, not a bug: its own exit status (all ranks agree on it)
        _leave(ctx)
        if main:
            print(f"engram: error: training diverged: {e}", file=sys.stderr)
        return 3
    # Only after success: a rank that fails exits without it, and its watchdog tells the others who failed.
    _leave(ctx)
    if main:
        val = f"{res.val_loss:.4f}" if res.val_loss is not None else "n/a"
        mfu = f", MFU {res.mfu:.1%}" if res.mfu else ""
        print(f"{res.status} at step {res.step}: {res.tokens:,} tokens, val loss {val}, "
              f"{res.tokens_per_s:,.0f} tokens/s{mfu}")
        print(f"run directory: {run_dir}")
    return 0 if res.status == "finished" else 130


def _compare(args) -> int:
    import time

    from engram.train.compare import run_compare, variants
    from engram.train.trainer import prepare_run_data

    cfg = _resolve_run_config(args)
    # An impossible split fails before the corpus is read.
    variants(cfg, args.experts_moved, match_activated=args.match_activated, flavour=args.flavour)
    out = _output_dir(args.out or f"runs/compare-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    ctx = _distributed(args)
    _check_world(cfg, ctx)
    make = _trainer_factory(args, ctx)
    with _reading_user_input():
        if ctx is None:
            data = prepare_run_data(cfg)
        else:
            from engram.distributed.trainer import rank0_first

            data = rank0_first(lambda: prepare_run_data(cfg))
    main = ctx is None or ctx.is_main
    run_compare(cfg, out, n_experts_moved=args.experts_moved, seeds=tuple(args.seeds),
                progress=not args.no_progress, data=data, trainer=make, main=main,
                out=print if main else (lambda *a, **k: None), match_activated=args.match_activated,
                flavour=args.flavour)
    _leave(ctx)
    return 0


def _leave(ctx) -> None:
    if ctx is not None:
        from engram.distributed.launch import shutdown

        shutdown(ctx)
