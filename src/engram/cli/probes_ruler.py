"""`engram probe ruler`: RULER-style retrieval tasks at the model's context length (engram.probes.ruler)."""

from __future__ import annotations

from engram.cli.commands import _reading_user_input


def _ruler(args) -> int:
    from engram.cli.probes import _command, _data, _load, _out
    from engram.config import UserError
    from engram.probes import ruler as R
    from engram.probes.common import figure, model_label, save_json, write_section

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in R.TASKS]
    if bad or not tasks:
        raise UserError(f"--tasks {args.tasks}: unknown task {bad[0] if bad else '(none)'}; "
                        f"expected a comma-separated list of {', '.join(R.TASKS)}")
    if args.queries > args.pairs:
        raise UserError(f"--queries {args.queries} is more than --pairs {args.pairs}")
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
