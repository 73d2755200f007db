"""`engram probe ruler`, `ruler-mix` and `ruler-finetune`: RULER-style retrieval tasks at the model's context
length (engram.probes.ruler), the documents to fine-tune on (engram.probes.ruler_mix) and the fine-tuning
comparison (engram.probes.ruler_finetune)."""

from __future__ import annotations

import argparse

from engram.cli.commands import _reading_user_input

# Fine-tuning steps per model and seed. The demo models (batch 32 x 128 tokens) take 1.6-2.5 s a step on
# 2 CPU cores, one or two threads, so 300 steps for each of the two default seeds, set-up and evaluations
# included, stay under 30 minutes per model.
DEFAULT_STEPS = 300


def _ruler(args) -> int:
    from engram.cli.probes import _command, _data, _load, _out
    from engram.config import UserError
    from engram.probes import ruler as R
    from engram.probes.common import figure, model_label, save_json, write_section

    tasks = _tasks(args)
    model = _load(args.model)
    context = model.cfg.max_seq_len
    length = args.length or context
    if length > context:
        raise UserError(f"--length {length} is longer than the model's context ({context} tokens)")
    bundle, label = _data(args, model)
    out = _out(args)
    sizes = dict(pairs=args.pairs, queries=args.queries, hops=args.hops)
    results = []
    for task in tasks:
        with _reading_user_input():  # a --length too short for the task
            examples = R.make_examples(task, bundle.tokenizer, bundle.val, length, args.examples, args.seed, **sizes)
        hits = R.evaluate(model, examples, bundle.tokenizer)
        results.append({"task": task, "examples": len(hits), "exact_match": sum(hits) / len(hits),
                        "chance": R.chance(task, **sizes), "prompt_tokens": len(examples[0].ids),
                        "sample": {"prompt": bundle.tokenizer.decode(examples[0].ids), "answer": examples[0].answer}})
    save_json(out, "ruler.json", {"max_seq_len": context, "length": length, **sizes, "seed": args.seed,
                                  "results": results})

    def plot(fig, ax):
        xs = range(len(results))
        ax.bar(list(xs), [r["exact_match"] for r in results], 0.5, label="exact match (greedy)")
        ax.scatter(list(xs), [r["chance"] for r in results], marker="_", s=900, color="k", zorder=3,
                   label="chance")
        ax.set_xticks(list(xs), [r["task"] for r in results])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"RULER-style tasks at {length} tokens (max_seq_len {context})")
        ax.legend()

    figure(out / "ruler.png", plot)
    above = [r["task"] for r in results if r["exact_match"] > r["chance"]]
    verdict = (f"At {length} tokens (the model's max_seq_len is {context}) the model beats chance on "
               + (", ".join(above) if above else "no task") + f" of {', '.join(tasks)}.")
    write_section(out, "RULER-style retrieval", command=_command(args, ["probe", "ruler"]),
                  models=[model_label(args.model)], data=label + " (validation split as filler)",
                  figure_file="ruler.png", header=["task", "examples", "prompt tokens", "exact match", "chance"],
                  rows=[[r["task"], r["examples"], r["prompt_tokens"], r["exact_match"], r["chance"]]
                        for r in results], verdict=verdict,
                  notes=[f"max_seq_len: {context}; length: {length} tokens per example, answer included",
                         f"mq-niah: {args.pairs} pairs, {args.queries} queried; vt: chains of {args.hops} copies"])
    print(out / "REPORT.md")
    return 0


def _tasks(args) -> list[str]:
    from engram.config import UserError
    from engram.probes import ruler as R

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in R.TASKS]
    if bad or not tasks:
        raise UserError(f"--tasks {args.tasks}: unknown task {bad[0] if bad else '(none)'}; "
                        f"expected a comma-separated list of {', '.join(R.TASKS)}")
    if args.queries > args.pairs:
        raise UserError(f"--queries {args.queries} is more than --pairs {args.pairs}")
    return tasks


def _ruler_mix(args) -> int:
    """Write a JSONL corpus of task documents over the train split of the model's corpus."""
    from engram.cli.probes import _data, _load, _out
    from engram.config import UserError
    from engram.probes import ruler_mix as M

    tasks = _tasks(args)
    model = _load(args.model)
    length = args.length or model.cfg.max_seq_len
    if length > model.cfg.max_seq_len:
        raise UserError(f"--length {length} is longer than the model's context ({model.cfg.max_seq_len} tokens)")
    bundle, label = _data(args, model)
    out = _out(args)
    with _reading_user_input():
        rec = M.write_mix(out, bundle.tokenizer, bundle.train, length=length, count=args.count, seed=args.seed,
                          tasks=tasks, drop_ids=(bundle.eos_id, bundle.pad_id), pairs=args.pairs,
                          queries=args.queries, hops=args.hops,
                          meta={"model": str(args.model), "data": label + " (train split as filler)"})
    print(f"{out / M.TASKS_FILE}: {rec['count']} documents of {rec['tokens_min']}-{rec['tokens_max']} tokens "
          f"({rec['tokens_total']:,} in all)")
    return 0


def _ruler_finetune(args) -> int:
    from engram.cli.probes import _command, _out
    from engram.cli.serving import _model_config
    from engram.config import UserError
    from engram.probes import ruler as R
    from engram.probes import ruler_finetune as F
    from engram.probes.common import figure, fmt, model_label, save_json, write_section

    given = _resolve_preset(args)
    tasks = _tasks(args)
    for d in args.models:
        _model_config(d)
    with _reading_user_input():
        context = min(F.base_config(d).model.max_seq_len for d in args.models)
        trained = min(F.train_length(d) for d in args.models)
    length = args.length or trained
    if length > context:
        raise UserError(f"--length {length} is longer than a model's context ({context} tokens)")
    out = _out(args)
    sizes = dict(pairs=args.pairs, queries=args.queries, hops=args.hops)
    plan = F.Plan(tuple(tasks), length, args.steps, tuple(dict.fromkeys(args.seeds)), args.examples, args.eval_seed,
                  sizes, args.general_ratio, args.mix_count, tuple(args.set or ()), args.supervise,
                  args.follow_ups, args.copy_rows)
    with _reading_user_input():
        record = F.run(args.models, out, plan, progress=not args.no_progress)
    record["trained_seq_len"] = trained
    save_json(out, "ruler_finetune.json", record)
    models = record["models"]

    def plot(fig, ax):
        width = 0.8 / len(models)
        for i, (name, m) in enumerate(models.items()):
            xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(tasks))]
            color = f"C{i}"
            for r in m["runs"].values():
                ax.scatter(xs, [r["accuracy"][t] for t in tasks], color=color, alpha=0.6, s=22)
            ax.errorbar(xs, [m["summary"][t]["mean"] for t in tasks], yerr=[2 * m["summary"][t]["se"] for t in tasks],
                        color=color, fmt="_", markersize=24, capsize=4,
                        label=f"{name}: fine-tuned (dots: seeds; bar: mean +- 2 se)")
            ax.scatter(xs, [m["original"][t] for t in tasks], facecolors="none", edgecolors=color, marker="o", s=60,
                       label=f"{name}: original")
        for k, t in enumerate(tasks):
            ax.hlines(R.chance(t, **sizes), k - 0.45, k + 0.45, colors="k", linestyles="--",
                      label="chance" if k == 0 else None)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("exact match (greedy)")
        ax.set_title(f"RULER-style tasks at {length} tokens after {args.steps} fine-tuning steps")
        ax.legend(fontsize=7)

    figure(out / "ruler_finetune.png", plot)
    rows = [[name, t, m["original"][t], m["summary"][t]["mean"], m["summary"][t]["se"],
             " ".join(fmt(r["accuracy"][t], 3) for r in m["runs"].values()), m["summary"][t]["chance"],
             "yes" if m["summary"][t]["above_chance"] else "no"] for name, m in models.items() for t in tasks]
    spent = [r["train_seconds"] for m in models.values() for r in m["runs"].values()]
    write_section(out, "RULER-style retrieval after fine-tuning", command=_command(given, ["probe", "ruler-finetune"]),
                  models=[model_label(d) for d in args.models],
                  data="; ".join(f"{n}: {m['data']}" for n, m in models.items())
                  + " (evaluation: validation split as filler; mixes: train split)",
                  figure_file="ruler_finetune.png",
                  header=["model", "task", "original", "fine-tuned mean", "se", "per seed", "chance", "above chance"],
                  rows=rows, verdict=F.verdict(record),
                  notes=[f"length: {length} tokens per example, answer included (the models were trained at "
                         f"{trained}; the smallest context is {context})",
                         f"fine-tune: {args.steps} steps per model and seed, lr {F.LR_FRACTION:.3g} x the model's, "
                         f"warmup {max(1, args.steps // 20)} steps, init_from the model"
                         + (f", overrides {' '.join(args.set)}" if args.set else ""),
                         (f"training data: task documents of {length // 2}-{length} tokens, one per batch row, "
                          f"drawn per step over the train split"
                          + (f", each with {args.follow_ups} follow-up questions on the same lines"
                             if args.follow_ups else "")
                          + (f", {args.copy_rows:g} of each batch's rows copy documents (a random span twice, the "
                             f"repeat supervised)" if args.copy_rows else "")
                          + "; loss on the answers and their newlines only; runs under runs/"
                          if args.supervise == "answer" else
                          f"mix per fine-tune: task documents of {length // 2}-{length} tokens plus general text of "
                          f"the model's corpus ({args.general_ratio:g} x the task characters), loss on every "
                          f"token; runs and mixes under runs/ and mix/"),
                         f"evaluation: {args.examples} prompts per task, seed {args.eval_seed}, drawn alike for every "
                         f"model and seed; se: the larger of the error over seeds and the binomial error over the "
                         f"prompts; above chance: mean - 2 se > chance",
                         "training time per fine-tune (steps only): " + ", ".join(f"{s:.0f} s" for s in spent)])
    print(out / "REPORT.md")
    return 0


# ruler-finetune's options that a --preset may set, and their values without one.
FINETUNE_DEFAULTS = {"tasks": "mq-niah,vt", "pairs": 4, "queries": 2, "hops": 1, "seeds": [0, 1], "length": None,
                     "steps": DEFAULT_STEPS, "examples": 50, "eval_seed": 0, "general_ratio": 1.0,
                     "mix_count": None, "supervise": "all", "follow_ups": 0, "copy_rows": 0.0,
                     "set": None}


def _resolve_preset(args):
    """Fill ruler-finetune's options (parsed without defaults) from ``--preset`` then the plain defaults;
    return the namespace that names the run: the options as given, the preset's own left to its name."""
    from engram.probes.ruler_finetune import PRESETS

    preset = PRESETS[args.preset] if args.preset else {}
    shown = argparse.Namespace(**vars(args))
    for k, default in FINETUNE_DEFAULTS.items():
        mine = getattr(args, k, None)
        if k == "set":  # the preset's overrides first, so the command line's own win
            setattr(args, k, list(preset.get("set", [])) + list(mine or []) or None)
            setattr(shown, k, mine)
            continue
        if not hasattr(args, k):
            setattr(args, k, preset.get(k, default))
            setattr(shown, k, None if k in preset else getattr(args, k))
    return shown


def add_parsers(ps, model_args, at_least) -> None:
    """`probe ruler`, `probe ruler-mix` and `probe ruler-finetune`."""

    def task_args(s, default=lambda v: v, shown=lambda v: ""):
        s.add_argument("--tasks", default=default("mq-niah,vt"),
                       help="comma-separated: mq-niah (keys asked in a question), vt (variable tracking), mk-niah "
                            "(complete one key's line: the induction form), kv-niah (mk-niah without the '=': a "
                            "one-token match)" + shown("mq-niah,vt"))
        s.add_argument("--pairs", type=at_least(1), default=default(4),
                       help="mq-niah, mk-niah, kv-niah: key/value pairs in the haystack" + shown(4))
        s.add_argument("--queries", type=at_least(1), default=default(2),
                       help="mq-niah: keys asked for (mk-niah and kv-niah ask one)" + shown(2))
        s.add_argument("--hops", type=at_least(1), default=default(1), help="vt: copies in the chain" + shown(1))

    s = ps.add_parser("ruler",
                      help="RULER-style multi-query needle and variable tracking, greedy exact match")
    model_args(s)
    task_args(s)
    s.add_argument("--length", type=at_least(8), help="tokens per example, answer included (default: max_seq_len)")
    s.add_argument("--examples", type=at_least(1), default=50, help="examples per task")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated examples")
    s.set_defaults(func=_ruler)

    s = ps.add_parser("ruler-mix", help="write a JSONL corpus of RULER-style task documents (prompt, answer, "
                                        "newline) to fine-tune on")
    model_args(s)
    task_args(s)
    s.add_argument("--count", type=at_least(1), default=1000, help="documents, the tasks in turn")
    s.add_argument("--length", type=at_least(8), help="longest document in tokens; each is drawn in "
                                                      "[length/2, length] (default: max_seq_len)")
    s.add_argument("--seed", type=int, default=1, help="seed of the mix (drawn apart from any evaluation seed)")
    s.set_defaults(func=_ruler_mix)

    s = ps.add_parser("ruler-finetune", help="fine-tune models on a mix of RULER-style tasks and their corpus, "
                                             "then compare them on `probe ruler`, seeds as repeats")
    s.add_argument("--models", nargs="+", required=True, help="model directories written by training")
    s.add_argument("--out", required=True, help="folder for the runs, mixes, JSON, PNG and REPORT.md")
    from engram.probes.ruler_finetune import PRESETS

    s.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named recipe; the options it sets (an option given here wins): "
                        + "; ".join(f"{n}: " + " ".join(f"--{k.replace('_', '-')} "
                                                       + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                                                       for k, v in p.items()) for n, p in PRESETS.items()))
    # No parser defaults below: an option left out takes the preset's value, else the default its help names.
    off = lambda v: argparse.SUPPRESS  # noqa: E731
    shown = lambda v: f" (default: {v})"  # noqa: E731
    task_args(s, off, shown)
    s.add_argument("--seeds", nargs="+", type=int, default=off(0),
                   help="fine-tune seeds per model" + shown("0 1"))
    s.add_argument("--length", type=at_least(8), default=off(0),
                   help="evaluation tokens per example and longest mix document (default: the models' training "
                        "seq_len)")
    s.add_argument("--steps", type=at_least(1), default=off(0),
                   help="fine-tuning steps per model and seed (the default fits both seeds of a demo model in "
                        "under 30 minutes on 2 CPU cores)" + shown(DEFAULT_STEPS))
    s.add_argument("--examples", type=at_least(1), default=off(0), help="evaluation prompts per task" + shown(50))
    s.add_argument("--eval-seed", type=int, default=off(0),
                   help="seed of the evaluation prompts (probe ruler's default)" + shown(0))
    s.add_argument("--general-ratio", type=at_least(0, float), default=off(0),
                   help="characters of general corpus text per character of task documents in a mix" + shown(1.0))
    s.add_argument("--mix-count", type=at_least(1), default=off(0),
                   help="task documents per mix (default: enough for the fine-tune to see each about once)")
    s.add_argument("--supervise", choices=("all", "answer"), default=off(0),
                   help="all: train on every token of a mix of task documents and corpus text; answer: one task "
                        "document per batch row, the loss on its answer only (--general-ratio and --mix-count do "
                        "not apply)" + shown("all"))
    s.add_argument("--follow-ups", type=at_least(0), default=off(0),
                   help="with --supervise answer: after its answer, each document asks this many more questions "
                        "of the same lines (unasked keys first), every answer supervised" + shown(0))
    s.add_argument("--copy-rows", type=at_least(0, float), default=off(0),
                   help="with --supervise answer: this fraction of each batch's rows are copy documents (a random "
                        "token span, then the span again, the repeat supervised) to build the induction circuit "
                        "retrieval needs" + shown(0.0))
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override the fine-tune's config, e.g. train.lr=1e-3 (repeatable)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=_ruler_finetune)
