"""The `engram` command. It only parses arguments and calls into the package."""

from __future__ import annotations

import argparse
import json
import sys


def _vocab_stats(args) -> int:
    from engram.tokenizer import CompressedVocab

    vocab = CompressedVocab.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    s = vocab.stats(top=args.top)
    if args.save:
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

    vocab = CompressedVocab.from_pretrained(args.tokenizer)
    hasher = NgramHasher.from_config(engram_preset(args.preset), vocab)
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
    s.add_argument("--preset", default="reference", help="EngramConfig preset (reference, demo, debug)")
    s.set_defaults(func=_hash)

    s = sub.add_parser("demo", help="compress a bundled tokenizer, hash a sentence, run the module")
    s.add_argument("--tokenizer", default="mistral-tekken")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError) as e:
        print(f"engram {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
