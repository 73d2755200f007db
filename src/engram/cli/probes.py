"""`engram gates` and `engram probe ...`: look inside a trained model (engram.probes).

Each command writes its numbers as JSON, a PNG figure and its own section of ``REPORT.md`` into ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engram.cli.commands import _output_dir, _reading_user_input


def _command(args, words: list[str]) -> str:
    """The command line that reproduces this run (rebuilt from the parsed options, so it reads the same
    whether the CLI or a test called it)."""
    import shlex

    parts = ["engram", *words]
    for k, v in vars(args).items():
        if k in ("func", "command", "probe") or v is None or v is False:
            continue
        opt = "--" + k.replace("_", "-")
        if k == "set":  # a repeatable option: once per value
            parts += [w for item in v for w in (opt, str(item))]
            continue
        parts += [opt] if v is True else [opt, *(map(str, v) if isinstance(v, list) else [str(v)])]
    return shlex.join(parts)


def _load(model_dir: str):
    """The model of a ``--model`` directory, in eval mode (one-line errors for a wrong path)."""
    from engram.cli.serving import _model_config
    from engram.model import EngramLM

    _model_config(model_dir)
    with _reading_user_input():
        return EngramLM.from_pretrained(model_dir).eval()


def _data(args, model):
    from engram.cli.serving import _tokenizer_spec
    from engram.probes.common import data_label, probe_data

    with _reading_user_input():
        bundle = probe_data(args.model, args.data, _tokenizer_spec(args.model, args.tokenizer), model.cfg.vocab_size)
    return bundle, data_label(args.model, args.data)


def _out(args) -> Path:
    _output_dir(args.out, "--out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _val_batches(args, bundle, models):
    from engram.config import UserError
    from engram.data import val_batches

    seq_len = args.seq_len or min(min(m.cfg.max_seq_len for m in models), 128)
    if any(seq_len > m.cfg.max_seq_len for m in models):
        raise UserError(f"--seq-len {seq_len} is longer than a model's context")
    with _reading_user_input():
        return val_batches(bundle.val, 8, seq_len, args.eval_tokens), seq_len


# ------------------------------------------------------------------------------------------------ gates

def _gates(args) -> int:
    from engram.atomic import atomic_write
    from engram.cli.serving import _tokenizer_spec
    from engram.config import UserError
    from engram.probes import gates as G
    from engram.probes.common import model_label, save_json, write_section
    from engram.tokenizer import load_tokenizer

    model = _load(args.model)
    if model.hasher is None:
        raise UserError(f"--model {args.model} has no Engram layers, so no gates to show")
    if args.file is not None:
        try:
            text = Path(args.file).read_text(errors="replace")
        except OSError as e:
            raise UserError(f"--file {args.file}: {e.strerror}") from e
    else:
        text = args.text
    with _reading_user_input():
        tok = load_tokenizer(_tokenizer_spec(args.model, args.tokenizer))
    ids = tok(text, add_special_tokens=False).input_ids
    if not ids:
        raise UserError("the text encodes to no tokens")
    if len(ids) > model.cfg.max_seq_len:
        print(f"engram gates: the text has {len(ids)} tokens; showing the first {model.cfg.max_seq_len} "
              f"(the model's context)", file=sys.stderr)
        ids = ids[: model.cfg.max_seq_len]
    out = _out(args)
    gates_TC, names = G.token_gates(model, ids)
    tokens = G.token_strings(tok, ids)
    save_json(out, "gates.json", {"tokens": tokens, "ids": ids, "columns": names, "gates": gates_TC.tolist()})
    G.heatmap(out / "gates.png", gates_TC, names, tokens)
    atomic_write(out / "gates.html", G.gates_html(gates_TC, names, tokens, f"Engram gates: {args.model}"))
    mean_C = gates_TC.mean(0).tolist()
    top = gates_TC.mean(1).topk(min(5, len(ids))).indices.tolist()
    rows = [[n, float(gates_TC[:, c].mean()), float(gates_TC[:, c].min()), float(gates_TC[:, c].max())]
            for c, n in enumerate(names)]
    verdict = (f"Mean gate {sum(mean_C) / len(mean_C):.3f} over {len(ids)} tokens; the memory is let in most on "
               + ", ".join(repr(tokens[i]) for i in top) + ".")
    write_section(out, "Engram gates", command=_command(args, ["gates"]), models=[model_label(args.model)],
                  data=f"{len(ids)} tokens of " + (args.file or "--text"), figure_file="gates.png",
                  header=["layer / branch", "mean gate", "min", "max"], rows=rows, verdict=verdict,
                  notes=["page: [gates.html](gates.html) (shaded text, values on hover)"])
    print(f"{out / 'gates.html'}\n{out / 'REPORT.md'}")
    return 0


# ----------------------------------------------------------------------------------------- memory-off

def _memory_off(args) -> int:
    from engram.probes import memory_off as P
    from engram.probes.common import figure, model_label, save_json, write_section

    model = _load(args.model)
    bundle, label = _data(args, model)
    out = _out(args)
    ctx = min(args.context, model.cfg.max_seq_len)
    mem = P.memorisation_probes(bundle.train, bundle.val, context=ctx, per_order=args.per_order, top=args.top,
                                exclude={bundle.eos_id, bundle.pad_id}, tokens=args.tokens, seed=args.seed)
    ind = P.induction_probes(model.cfg.vocab_size, context=ctx, count=args.count, seed=args.seed)
    results = [P.score(model, mem), P.score(model, ind)]
    save_json(out, "memory_off.json", {"context": ctx, "results": results})

    def plot(fig, ax):
        xs = range(len(results))
        ax.bar([x - 0.2 for x in xs], [r["on"] for r in results], 0.4, label="memory on")
        ax.bar([x + 0.2 for x in xs], [r["off"] for r in results], 0.4, label="memory off")
        ax.set_xticks(list(xs), [r["family"] for r in results])
        ax.set_ylabel("top-1 accuracy")
        ax.set_title("Probes with the Engram increments zeroed")
        ax.legend()

    figure(out / "memory_off.png", plot)
    rows = [[r["family"], r["probes"], r["on"], r["off"], r["retention"]] for r in results]
    rows += [[f"  {r['family']}, n={g}", v["n"], v["on"], v["off"], v["retention"]]
             for r in results[:1] for g, v in r["by_group"].items()]
    m, i = results
    if m["engram_layers"] == 0:
        verdict = "No Engram layers: the control, retention 1 by construction on both families."
    else:
        drop = ("loses more" if (m["retention"] or 0) < (i["retention"] or 0) else "does not lose more")
        verdict = (f"Without its memory the model keeps {P.fmt_ratio(m['retention'])} of its memorisation score "
                   f"and {P.fmt_ratio(i['retention'])} of its in-context score: memorisation {drop}.")
    write_section(out, "Memory off", command=_command(args, ["probe", "memory-off"]),
                  models=[model_label(args.model)], data=label, figure_file="memory_off.png",
                  header=["family", "probes", "top-1 on", "top-1 off", "retention off/on"], rows=rows,
                  verdict=verdict, notes=[f"context: {ctx} tokens per probe"])
    print(out / "REPORT.md")
    return 0


# ------------------------------------------------------------------------------------------ lens, cka

def _logit_lens(args) -> int:
    from engram.probes import lens as P
    from engram.probes.common import model_label, save_json, write_section

    models = [_load(args.model)] + ([_load(args.model2)] if args.model2 else [])
    bundle, label = _data(args, models[0])
    batches, seq_len = _val_batches(args, bundle, models)
    out = _out(args)
    names = [args.model] + ([args.model2] if args.model2 else [])
    curves = {n: (P.stream_names(m), P.lens_kl(m, batches)) for n, m in zip(names, models, strict=True)}
    save_json(out, "logit_lens.json", {"seq_len": seq_len, "tokens": sum(x.numel() for x, _ in batches),
                                       "models": {n: dict(zip(*c, strict=True)) for n, c in curves.items()}})
    P.lens_plot(out / "logit_lens.png", curves)
    depth = max(len(c[0]) for c in curves.values())
    longest = max(curves.values(), key=lambda c: len(c[0]))[0]
    rows = [[longest[s]] + [c[1][s] if s < len(c[1]) else None for c in curves.values()] for s in range(depth)]
    half = {n: next(i for i, v in enumerate(kl) if v <= kl[0] / 2) for n, (_, kl) in curves.items()}
    verdict = "; ".join(f"{n}: KL halves by stream point {half[n]} ({curves[n][0][half[n]]})" for n in names) + "."
    write_section(out, "Logit lens", command=_command(args, ["probe", "logit-lens"]),
                  models=[model_label(n) for n in names], data=label + f" (validation split, {seq_len}-token "
                  "windows)", figure_file="logit_lens.png", header=["stream point"] + names, rows=rows,
                  verdict=verdict)
    print(out / "REPORT.md")
    return 0


def _cka(args) -> int:
    from engram.probes import lens as P
    from engram.probes.common import model_label, save_json, write_section

    a, b = _load(args.model), _load(args.model2)
    bundle, label = _data(args, a)
    batches, seq_len = _val_batches(args, bundle, [a, b])
    out = _out(args)
    hs_a, hs_b = P.streams(a, batches)[0], P.streams(b, batches)[0]
    cka = P.cka_matrix(hs_a, hs_b)
    na, nb = P.stream_names(a), P.stream_names(b)
    save_json(out, "cka.json", {"rows": na, "columns": nb, "cka": cka, "tokens": len(hs_a[0])})
    P.cka_plot(out / "cka.png", cka, na, nb, args.model, args.model2)
    best = [max(range(len(nb)), key=lambda j, i=i: cka[i][j]) for i in range(len(na))]
    rows = [[na[i]] + cka[i] for i in range(len(na))]
    verdict = ("Closest layer of the second model for each of the first: "
               + ", ".join(f"{na[i]}->{nb[j]}" for i, j in enumerate(best)) + ".")
    write_section(out, "Layer CKA", command=_command(args, ["probe", "cka"]),
                  models=[model_label(args.model), model_label(args.model2)], data=label + " (validation split)",
                  figure_file="cka.png", header=["model \\ model2"] + nb, rows=rows, verdict=verdict)
    print(out / "REPORT.md")
    return 0


# ------------------------------------------------------------------------------------------- collisions

def _collisions(args) -> int:
    from engram.config import UserError
    from engram.probes import collisions as P
    from engram.probes.common import model_label, save_json, write_section

    model = _load(args.model)
    if model.hasher is None:
        raise UserError(f"--model {args.model} has no Engram layers, so no hashed tables")
    bundle, label = _data(args, model)
    out = _out(args)
    comp = model.vocab.lookup[bundle.train[: args.tokens]]
    rows_all = [r for layer in model.hasher.layer_ids for r in P.growth(model.hasher, comp, layer)]
    save_json(out, "collisions.json", {"tokens": len(comp), "rows": rows_all})
    P.growth_plot(out / "collisions.png", rows_all)
    full = [r for r in rows_all if r["fraction"] == 1.0]
    keys = ["layer", "order", "head", "table_rows", "distinct_ngrams", "rows_used", "expected_rows_used",
            "collision_rate", "expected_collision_rate", "ngrams_per_used_row"]
    worst = max(full, key=lambda r: r["collision_rate"])
    ratio = max(r["rows_used"] / r["expected_rows_used"] for r in full if r["expected_rows_used"])
    low = min(r["rows_used"] / r["expected_rows_used"] for r in full if r["expected_rows_used"])
    verdict = (f"On {len(comp):,} train tokens up to {worst['collision_rate']:.1%} of distinct n-grams share a row "
               f"(layer {worst['layer']}, {worst['order']}-grams, head {worst['head']}); rows used are "
               f"{low:.3f}-{ratio:.3f} x the uniform-hashing expectation.")
    write_section(out, "Hash collisions", command=_command(args, ["probe", "collisions"]),
                  models=[model_label(args.model)], data=label + f" (train split, first {len(comp):,} tokens)",
                  figure_file="collisions.png", header=[k.replace("_", " ") for k in keys],
                  rows=[[round(r[k], 1) if k == "expected_rows_used" else r[k] for k in keys] for r in full],
                  verdict=verdict, notes=["growth with corpus size (1/8, 1/4, 1/2, all of it): collisions.json"])
    print(out / "REPORT.md")
    return 0


# -------------------------------------------------------------------------------------------- parsers

def add_parsers(sub, formatter, at_least) -> None:
    from engram.cli.probes_ruler import add_parsers as add_ruler_parsers

    def model_args(s, data=True):
        s.add_argument("--model", required=True, help="a model directory written by training (run_dir/model)")
        s.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
        s.add_argument("--out", required=True, help="folder for the JSON, the PNG and REPORT.md")
        if data:
            s.add_argument("--data", nargs="+", help="corpus files/folders (default: the training run's corpus "
                                                     "and split, else the Python stdlib)")

    s = sub.add_parser("gates",
                       help="per-token Engram gates of every layer and branch: heatmap and shaded HTML page")
    model_args(s, data=False)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to read")
    src.add_argument("--file", help="a file holding the text")
    s.set_defaults(func=_gates)

    p = sub.add_parser("probe", help="probe a trained model (memory-off, logit-lens, cka, "
                                       "collisions, ruler, ruler-mix, ruler-finetune)")
    ps = p.add_subparsers(dest="probe", required=True, metavar="PROBE", help="the probe to run",
                          parser_class=lambda **kw: type(p)(formatter_class=formatter, **kw))

    s = ps.add_parser("memory-off",
                      help="memorisation and in-context probes with the Engram increments zeroed")
    model_args(s)
    s.add_argument("--context", type=at_least(8), default=64, help="tokens per probe (capped at max_seq_len)")
    s.add_argument("--top", type=at_least(1), default=64, help="most frequent train n-grams per order")
    s.add_argument("--per-order", type=at_least(1), default=128, help="memorisation probes per n-gram order")
    s.add_argument("--count", type=at_least(1), default=256, help="in-context probes")
    s.add_argument("--tokens", type=at_least(1), default=1 << 20, help="train tokens counted for n-grams")
    s.add_argument("--seed", type=int, default=0, help="seed of the probe draws")
    s.set_defaults(func=_memory_off)

    for name, fn, helptext in (("logit-lens", _logit_lens, "KL(final || logit lens) per layer, one or two models"),
                               ("cka", _cka, "linear CKA between every layer pair of two models")):
        s = ps.add_parser(name, help=helptext)
        model_args(s)
        s.add_argument("--model2", required=name == "cka", help="a second model directory to compare")
        s.add_argument("--seq-len", type=at_least(1), help="tokens per window (default: min(max_seq_len, 128))")
        s.add_argument("--eval-tokens", type=at_least(1), default=4096, help="validation tokens")
        s.set_defaults(func=fn)

    s = ps.add_parser("collisions",
                      help="hash-table occupancy and collisions on the train split vs uniform hashing")
    model_args(s)
    s.add_argument("--tokens", type=at_least(1), default=1 << 20, help="train tokens hashed")
    s.set_defaults(func=_collisions)

    add_ruler_parsers(ps, model_args, at_least)
