"""The `engram` argument parser: one subcommand per job, each bound to its function.

Every option has a one-line help that ends with its default (where it has one); ``--version``
names the package and torch versions; ``--list-presets`` prints the presets a command takes.
"""

from __future__ import annotations

import argparse
import sys

from engram.cli import commands, probes, science, serving, v41


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (not an absent one: None, an off flag) and keeps the
    line breaks of descriptions and epilogs (the preset listings)."""

    def _get_help_string(self, action):
        absent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if absent or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _VersionAction(argparse.Action):
    """``--version``: the package and torch versions, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib.metadata

        import torch

        try:
            version = importlib.metadata.version("engram")
        except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
            from engram import __version__ as version
        parser._print_message(f"engram {version} (torch {torch.__version__})\n", sys.stdout)
        parser.exit()


class _ListPresetsAction(argparse.Action):
    """``--list-presets``: each preset the command takes, with its one-line description, then exit."""

    def __init__(self, option_strings, kind: str, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)
        self.kind = kind

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(_preset_listing(self.kind) + "\n", sys.stdout)
        parser.exit()


def _at_least(lo: float, kind: type = int):
    """An argparse ``type`` for a number >= ``lo`` (finite, for floats): a bad value is argparse's
    usage error naming the option, before any work."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (value >= lo and value != float("inf")):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _preset_listing(kind: str) -> str:
    import engram.train.config  # noqa: F401  (registers the run presets)
    from engram.config import presets

    known = presets(kind)
    width = max(map(len, known))
    return "\n".join(f"{name:<{width}}  {p.description}" for name, p in known.items())


def _add_memory_args(s, default: str | None) -> None:
    s.add_argument("--memory", choices=["ram", "disk", "sharded"], default=None,
                   help="where the Engram tables live: ram, disk (a store directory, see export-memory), or sharded "
                        "(row ranges split over the ranks of `torchrun --nproc_per_node=N -m engram ...`, read from "
                        "--store or the model); default: " + (default or "loaded with the model, no memory tier")
                        + ", sharded under torchrun with more than one rank")
    s.add_argument("--store", help="store directory written by `engram export-memory` (for --memory disk or sharded)")
    s.add_argument("--memory-budget-gb", type=_at_least(0, float),
                   help="per-rank limit on the table shards in GiB (--memory sharded): a world too small for it is "
                        "refused before loading, naming the smallest one that fits")
    s.add_argument("--cache-mb", type=_at_least(0, float), default=0.0,
                   help="hot-row cache budget in MiB (0: no cache)")
    s.add_argument("--policy", choices=["lru", "lfu", "static"], default="lru",
                   help="cache policy; static keeps the rows most used on the train split")
    s.add_argument("--profile-tokens", type=_at_least(1), default=1 << 18,
                   help="train tokens counted for the static policy's access profile")
    s.add_argument("--data", nargs="+", help="corpus files/folders (default: the Python stdlib)")
    s.add_argument("--io", choices=["auto", "direct", "mmap"], default="auto",
                   help="disk reads: O_DIRECT via io_uring (direct), the memory mapping (mmap), or direct where "
                        "available (auto)")
    s.add_argument("--no-prefetch", action="store_true", help="fetch rows synchronously (no worker threads)")
    s.add_argument("--workers", type=_at_least(1), default=2, help="prefetch threads")


def _preset_arg(s, kind: str, default: str) -> None:
    """--preset, restricted to the registered presets of ``kind``, listed by --list-presets and in --help."""
    import engram.train.config  # noqa: F401  (registers the run presets)
    from engram.config import PRESET_KINDS, presets

    s.add_argument("--preset", choices=list(presets(kind)), default=default, metavar="NAME",
                   help=f"{PRESET_KINDS[kind]} preset (see the list below or --list-presets)")
    s.add_argument("--list-presets", action=_ListPresetsAction, kind=kind,
                   help=f"print the {PRESET_KINDS[kind]} presets with a line on each, then exit")
    s.epilog = f"{PRESET_KINDS[kind]} presets:\n" + "\n".join(
        "  " + line for line in _preset_listing(kind).replace("%", "%%").splitlines())


def _budget_arg(s) -> None:
    s.add_argument("--memory-budget-gb", type=_at_least(0, float), default=None,
                   help="memory each rank may spend on its Engram table shards; a world size whose shards do not "
                        "fit is refused before any work, naming the smallest one that does")


def _device_arg(s, what: str) -> None:
    s.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help=f"where {what} runs: auto (CUDA where torch sees a GPU, else the CPU), cpu, or a CUDA "
                        f"device")


def _add_run_args(s, default_preset: str) -> None:
    _preset_arg(s, "run", default_preset)
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field, checked against its type, e.g. --set train.steps=200 "
                        "(repeatable)")
    s.add_argument("--data", nargs="+", help="corpus files/folders (text or JSONL); default: the Python stdlib")
    s.add_argument("--tokenizer", help="tokenizer instead of the locally trained BPE")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_arg(s, "training (recorded in the run directory's meta.json; single-process runs only for now)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram", description="Engram: conditional memory via n-gram lookup",
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action=_VersionAction, help="print the engram and torch versions, then exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=lambda **kw: argparse.ArgumentParser(formatter_class=_HelpFormatter, **kw))

    s = sub.add_parser("vocab-stats", help="compress a tokenizer's vocabulary and show the merged groups")
    s.add_argument("tokenizer", help="tokenizer directory, tokenizer file, or bundled name (mistral-tekken, "
                                     "mistral-sp, ...)")
    s.add_argument("--top", type=_at_least(0), default=10, help="how many of the largest merged groups to show")
    s.add_argument("--save", help="write the compressed map to this .safetensors file")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a tokenizer's own Python code")
    s.set_defaults(func=commands._vocab_stats)

    s = sub.add_parser("hash", help="print the Engram row ids of a text (JSON)")
    s.add_argument("text", help="the text to tokenise and hash")
    s.add_argument("--tokenizer", default="mistral-tekken", help="tokenizer directory, file or bundled name")
    _preset_arg(s, "engram", "engram-reference")
    s.set_defaults(func=commands._hash)

    s = sub.add_parser("train", help="train a model (see --preset and --set)")
    _add_run_args(s, "debug")
    s.add_argument("--run-dir", help="run directory (default: runs/PRESET-TIMESTAMP)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest intact checkpoint, with the run's own "
                        "config (only train.steps and the eval/log/ckpt intervals may change, each reported)")
    _budget_arg(s)
    s.set_defaults(func=commands._train, preset=None)  # None: "not given", which --resume must tell apart

    s = sub.add_parser("compare", help="train an MoE baseline and its iso-parameter Engram variant")
    _add_run_args(s, "demo")
    s.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    s.add_argument("--experts-moved", type=int, default=8,
                   help="routed experts per MoE layer moved into memory (8 of the demo's 32: 25%%)")
    s.add_argument("--match-activated", action="store_true",
                   help="also match activated parameters (within 0.5%%) by narrowing the Engram variant's shared "
                        "experts; by default only the totals match and the variant activates a few %% more")
    s.add_argument("--flavour", choices=["demo", "v41"],
                   help="the Engram layer of the variant: the public demo's or DeepSeek-V4.1's (default: the "
                        "preset's model.engram.flavour)")
    s.add_argument("--out", help="output directory (default: runs/compare-PRESET-TIMESTAMP)")
    _budget_arg(s)
    s.set_defaults(func=commands._compare)

    s = sub.add_parser("generate", help="sample from a trained model (KV cache + incremental hashing)")
    s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    s.add_argument("--max-new-tokens", type=_at_least(0), default=100,
                   help="tokens to sample; capped, with a notice, where the model's context ends")
    s.add_argument("--temperature", type=_at_least(0, float), default=0.8, help="sampling temperature (0: greedy)")
    s.add_argument("--top-k", type=_at_least(1), default=50, help="sample among the k most likely tokens")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_memory_args(s, default=None)
    _device_arg(s, "the model (--memory sharded: the CPU only for now)")
    s.set_defaults(func=serving._generate)

    s = sub.add_parser("export-memory", help="write a model's Engram tables to a store directory (for --memory disk)")
    s.add_argument("--model", required=True, help="a model directory (save_pretrained)")
    s.add_argument("--out", required=True, help="store directory to write (one file per layer + manifest.json)")
    s.add_argument("--layout-tokens", type=int, default=0,  # < 0: the command's one-line error
                   help="train-split tokens profiled to store rows in co-access order (fewer disk reads per "
                        "cold n-gram; 0: rows in id order)")
    s.add_argument("--data", nargs="+", help="corpus files/folders for the layout profile (default: the Python stdlib)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    s.add_argument("--dtype", choices=["fp8"], default=None,
                   help="quantise the tables: fp8 = float8_e4m3fn rows with a power-of-two scale per 32 channels, "
                        "dequantised on lookup (default: the model's own table dtype)")
    s.set_defaults(func=serving._export_memory)

    s = sub.add_parser("verify", help="check a store directory: every row's checksum, headers, layouts, manifest")
    s.add_argument("store", help="store directory written by `engram export-memory`")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=serving._verify)

    s = sub.add_parser("eval", help="validation loss and throughput with the tables in RAM or on disk")
    s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
    s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    _add_memory_args(s, default="ram")
    s.add_argument("--batch-size", type=_at_least(1), default=8, help="sequences per batch")
    s.add_argument("--seq-len", type=_at_least(1), help="tokens per sequence (default: min(max_seq_len, 128))")
    s.add_argument("--eval-tokens", type=_at_least(1), default=1 << 15, help="validation tokens to evaluate")
    s.add_argument("--cold", action="store_true", help="drop the store files from the page cache first")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    _device_arg(s, "the model (--memory sharded: the CPU only for now)")
    s.set_defaults(func=serving._eval)

    s = sub.add_parser("demo", help="compress a bundled tokenizer, hash a sentence, run the module")
    s.add_argument("--tokenizer", default="mistral-tekken", help="tokenizer directory, file or bundled name")
    s.set_defaults(func=commands._demo)

    science.add_parsers(sub, _HelpFormatter, _at_least)
    probes.add_parsers(sub, _HelpFormatter, _at_least)
    v41.add_parsers(sub, _HelpFormatter, _at_least)
    return p
