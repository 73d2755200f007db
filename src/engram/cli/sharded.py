"""`engram generate` / `engram eval` with ``--memory sharded``: the Engram tables row-sharded over the ranks.

Launched as ``torchrun --nproc_per_node=N -m engram generate|eval ...`` (any torchrun form, multi-node
included). Under torchrun with more than one rank, sharded is the default; ``ram``/``disk`` there are
refused (every rank would hold or cache the whole table, and print). In a single process sharded is a
world of one. Generation replicates the prompt on every rank; evaluation splits the batches over the
ranks. Only rank 0 prints; the outputs equal the single-process command's.
"""

from __future__ import annotations

import json
import os
import sys
import time

from engram.cli.commands import _reading_user_input

__all__ = ["evaluate", "generate", "resolve_memory"]


def resolve_memory(args, default: str | None) -> None:
    """Set ``args.memory`` when not given (sharded under a multi-rank torchrun, else ``default``), and refuse
    the combinations that make no sense across ranks."""
    from engram.config import UserError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.memory is None:
        args.memory = "sharded" if world > 1 else default
    elif world > 1 and args.memory != "sharded":
        raise UserError(f"--memory {args.memory} under torchrun with {world} ranks would load the whole tables on "
                        f"every rank; use --memory sharded (the default there)")
    if args.memory_budget_gb is not None and args.memory != "sharded":
        raise UserError("--memory-budget-gb applies to --memory sharded")


def _notices(args, command: str) -> None:
    ignored = [opt for opt, on in (("--cache-mb", args.cache_mb > 0), ("--no-prefetch", args.no_prefetch),
                                   ("--cold", getattr(args, "cold", False))) if on]
    if ignored:
        print(f"engram {command}: {', '.join(ignored)} has no effect with --memory sharded (each rank holds its "
              f"rows in RAM)", file=sys.stderr)


def _load(args, ctx):
    from pathlib import Path

    from engram.config import UserError
    from engram.distributed.serve import load_sharded

    if args.store and Path(args.store).exists() and not Path(args.store).is_dir():
        raise UserError(f"--store {args.store} is a file; it takes a store directory (see `engram export-memory`)")
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    with _reading_user_input():
        return load_sharded(args.model, args.store, group=ctx.memory_group, budget_bytes=budget, io=args.io)


def generate(args, tok, ids: list[int], n_new: int) -> int:
    """The sampled continuation of ``ids``, printed by rank 0 (the same on every rank: same prompt, same seed)."""
    import torch

    from engram.distributed.launch import init_distributed, shutdown

    # A rank that fails exits without shutdown(): its watchdog tells the others which rank and why.
    ctx = init_distributed(device="cpu")
    rank = ctx.rank
    if rank == 0:
        _notices(args, "generate")
    lm = _load(args, ctx)
    g = torch.Generator().manual_seed(args.seed)
    out = lm.generate(torch.tensor([ids]), n_new, temperature=args.temperature, top_k=args.top_k, generator=g)
    if rank == 0:
        print(tok.decode(out[0].tolist()))
        print(f"sharded memory: {lm.world} rank(s), {lm.memory.nbytes / 2**20:,.1f} MiB of table rows on rank 0",
              file=sys.stderr)
    shutdown(ctx)
    return 0


def evaluate(args, cfg, seq_len: int) -> int:
    """Validation loss with the batches split over the ranks; rank 0 prints it."""
    from engram.cli.serving import _tokenizer_spec
    from engram.config import UserError
    from engram.data import val_batches
    from engram.distributed.launch import init_distributed, shutdown

    ctx = init_distributed(device="cpu")
    rank, world = ctx.rank, ctx.world_size
    if rank == 0:
        _notices(args, "eval")
    lm = _load(args, ctx)  # the memory first: a bad store fails before the corpus is read
    data = _prepare_data(args, rank, world, _tokenizer_spec(args.model, args.tokenizer))
    if data.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {data.vocab_size} ids but the model only {cfg.vocab_size}")
    with _reading_user_input():
        batches = val_batches(data.val, args.batch_size, seq_len, args.eval_tokens)
    t0 = time.perf_counter()
    loss = lm.evaluate(batches)
    seconds = time.perf_counter() - t0
    if rank == 0:
        _print_eval(args, lm, loss, batches, seq_len, seconds)
    shutdown(ctx)
    return 0


def _print_eval(args, lm, loss: float, batches, seq_len: int, seconds: float) -> None:
    tokens = sum(x.numel() for x, _ in batches)
    if args.json:
        print(json.dumps({"val_loss": loss, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                          "memory": "sharded", "world_size": lm.world, "shard_bytes_rank0": lm.memory.nbytes,
                          "exchange_rank0": lm.memory.stats.as_dict()}))
        return
    print(f"val loss  {loss:.4f}  ({tokens:,} tokens in {len(batches)} batches of {seq_len})")
    print(f"tokens/s  {tokens / seconds:,.0f}  (memory sharded over {lm.world} rank(s), "
          f"{lm.memory.nbytes / 2**20:,.1f} MiB of table rows on rank 0)")


def _prepare_data(args, rank: int, world: int, tokenizer: str):
    """The corpus, tokenised (and cached) by rank 0 first, then read from the cache by the others."""
    import torch.distributed as dist

    from engram.data import prepare_data

    data = None
    if rank == 0:
        with _reading_user_input():
            data = prepare_data(args.data, tokenizer)
    if world > 1:
        dist.barrier()
    if rank != 0:
        with _reading_user_input():
            data = prepare_data(args.data, tokenizer, progress=False)
    return data
