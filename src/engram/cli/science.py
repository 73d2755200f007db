"""`engram sweep`, `engram report` and `engram prose-corpus`: the paper's experiments (engram.science)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def _sweep(args) -> int:
    from engram.science.sweep import SWEEP_FILE, status, sweep, sweep_name

    args_given = [a for a in sys.argv[1:] if a not in ("--status", "--dry-run")]
    command = "engram " + shlex.join(args_given) if sys.argv[1:2] == ["sweep"] else None
    if args.status:  # reads the sweep as planned; changes no file
        sweep_dir = Path(args.out) / sweep_name(args.experiment, args.preset, args.data, args.set or ())
        if not (sweep_dir / SWEEP_FILE).is_file():
            print(f"{sweep_dir}: not planned yet (run the sweep, or --dry-run to list its runs)")
            return 0
        st = status(sweep_dir)
        for k, names in st.items():
            more = " ..." if len(names) > 6 else ""
            print(f"{k}: {len(names)}" + (f"  ({', '.join(names[:6])}{more})" if names else ""))
        return 0
    try:
        left = sweep(args.experiment, args.preset, root=args.out, seeds=args.seeds, data=args.data,
                     prose=args.prose, overrides=args.set or (), jobs=args.jobs, command=command,
                     dry_run=args.dry_run)
    except KeyboardInterrupt:  # the sweep has stopped its workers and said how to go on: no traceback
        return 130
    if left:
        print(f"{left} run(s) unfinished: run the same command again to continue", file=sys.stderr)
        return 1
    return 0


def _report(args) -> int:
    from engram.science.report import build_report

    path = build_report(args.sweeps, args.out)
    print(f"report: {path}")
    return 0


def _prose_corpus(args) -> int:
    from engram.data.manpages import build_man_corpus

    m = build_man_corpus(args.out, root=args.root, max_mb=args.max_mb)
    print(f"{args.out}: {m['pages']} manual pages ({m['bytes'] / 2**20:.1f} MiB of text; {m['pages_seen']} seen)")
    return 0


def add_parsers(sub, formatter, at_least) -> None:
    from engram.science.grids import EXPERIMENTS, PRESETS

    s = sub.add_parser("sweep",
                       help="run one of the paper's experiments as a resumable grid of training runs")
    s.add_argument("experiment", choices=EXPERIMENTS,
                   help="alloc (U-curve over rho), scaling (memory slots), layers (placement), ablations, "
                        "tokens (gain vs token budget, on the default and a prose corpus)")
    s.add_argument("--preset", choices=PRESETS, default="quick",
                   help="quick: small models, minutes; full: the demo's model, 3 seeds, hours")
    s.add_argument("--seeds", type=at_least(0), nargs="+", help="seeds (default: the preset's)")
    s.add_argument("--data", nargs="+", help="corpus files/folders instead of the Python standard library")
    s.add_argument("--prose", nargs="+",
                   help="the tokens experiment's prose corpus (default: this machine's manual pages, built "
                        "once under --out)")
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a setting of every run (repeatable), e.g. --set model.head_bias=log_prior; "
                        "the sweep gets a folder of its own")
    s.add_argument("--out", default="science", help="sweep root: runs/, one folder per sweep, corpora/")
    s.add_argument("--jobs", type=at_least(1), help="runs at a time (default: one per core, at most 2)")
    s.add_argument("--dry-run", action="store_true", help="list the runs and their ids, train nothing")
    s.add_argument("--status", action="store_true", help="count finished, started and pending runs")
    s.set_defaults(func=_sweep)

    s = sub.add_parser("report",
                       help="CSV, plots and REPORT.md from finished sweeps")
    s.add_argument("sweeps", nargs="+", help="sweep folders (ROOT/EXPERIMENT-PRESET), and probe output folders "
                   "(appended under Probes)")
    s.add_argument("--out", default="science/report", help="folder for REPORT.md, the CSVs and plots")
    s.set_defaults(func=_report)

    s = sub.add_parser("prose-corpus",
                       help="render this machine's manual pages into a plain-text corpus folder (for --data)")
    s.add_argument("--out", required=True, help="folder to write (reused when complete)")
    s.add_argument("--root", default="/usr/share/man", help="manual page root")
    s.add_argument("--max-mb", type=float, default=40.0, help="stop after this much text")
    s.set_defaults(func=_prose_corpus)
