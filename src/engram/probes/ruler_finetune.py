"""`engram probe ruler-finetune`: fine-tune models on a mix holding the RULER-style tasks, then compare
them on the evaluation, seeds as repeats.

Small models trained on code score at chance on `engram probe ruler` out of the box: they never saw the
task format. Fine-tuning each model the same way on documents of the tasks (`engram.probes.ruler_mix`)
plus general text of its own corpus measures what the probe is meant to: which architecture learns to
retrieve from its context. Each (model, seed) gets its own mix (seeded from its own stream, never
the evaluation's) and its own fine-tune directory; a finished fine-tune is reused, an interrupted one
resumed, so a rerun only does what is missing.

The recipe (:func:`finetune_config`): the model's own training config with ``train.init_from`` the
model, ``train.lr`` a third of the pretraining rate (the loaded weights are already near a minimum; the
full rate would first undo part of them), a warmup of 5% of the steps, cosine to 10%, one evaluation at
the end and a checkpoint every third of the steps. ``overrides`` (``section.field=value``) change any of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engram.probes import ruler as R
from engram.probes import ruler_mix as M

LR_FRACTION = 1 / 3
# A fine-tune of seed s trains on the mix of seed MIX_SEED_OFFSET + s (its own stream besides: see ruler_mix).
MIX_SEED_OFFSET = 1000
EVAL_TOKENS = 16384


@dataclass
class Plan:
    """What the command does, shared by every (model, seed)."""

    tasks: tuple[str, ...]
    length: int
    steps: int
    seeds: tuple[int, ...]
    examples: int
    eval_seed: int
    sizes: dict
    general_ratio: float = 1.0
    mix_count: int | None = None
    overrides: tuple[str, ...] = ()
    supervise: str = "all"  # "all": every token of a mix corpus; "answer": the answers of task documents only
    follow_ups: int = 0  # with "answer": more questions per document after the first (ruler_sampler)
    copy_rows: float = 0.0  # with "answer": the fraction of batch rows that are copy documents (ruler_sampler)


# Named recipes for `probe ruler-finetune --preset NAME`: the options each sets (an option given on the
# command line wins; ``set`` overrides are added before the command line's own).
PRESETS: dict[str, dict] = {
    # Every gradient a retrieval signal: answers only, two more questions per document on the same lines,
    # the induction form of the needle task, a quarter of the rows copy documents (the demo models cannot
    # copy at all before), 64-token documents (little filler: more steps and a sharper signal per step),
    # the full pretraining rate. On the demo pair (two fine-tunes side by side, one core each) 1400 steps took
    # 39 minutes each and left both below chance: the strongest recipe tried so far, not yet one that works
    # (benchmarks/science/probes-demo/README.md). What holds it back is the induction circuit, and that
    # waits on the backbone's init: with tied N(0, 0.02) embeddings a fresh model of this architecture does not
    # learn to copy a span within 300 steps, with untied N(0, 0.1) ones it does by step 150, but only with a
    # 64-id vocabulary: with the demo's 8192 ids it does not within 300 steps unless its head is cut to the
    # task's ids or a logit bias holds the unused ids down from the first step (benchmarks/bench_induction.py).
    "retrieval": {"tasks": "mk-niah", "supervise": "answer", "follow_ups": 2, "copy_rows": 0.25, "pairs": 3,
                  "queries": 1, "length": 64, "steps": 1400, "seeds": [0, 1],
                  "set": ["train.seq_len=64", "train.lr=3e-3"]},
}


def model_name(model_dir: str | Path, taken: Sequence[str] = ()) -> str:
    """A short unique name: the run directory's name for ``RUN/model``, else the folder's own."""
    p = Path(model_dir).resolve()
    name = p.parent.name if p.name == "model" and p.parent.name else p.name
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def base_config(model_dir: str | Path):
    """The RunConfig that trained the model (its run directory's record), else its saved model config with
    the default training settings."""
    from engram.model.persistence import load_config
    from engram.probes.common import run_config_of
    from engram.train.config import RunConfig

    return run_config_of(model_dir) or RunConfig(model=load_config(model_dir))


def train_length(model_dir: str | Path) -> int:
    """The context the model was trained at: its run's ``train.seq_len``, else its ``max_seq_len``."""
    cfg = base_config(model_dir)
    return min(cfg.train.seq_len, cfg.model.max_seq_len)


def finetune_config(model_dir: str | Path, mix_dir: str | Path | None, *, seed: int, steps: int,
                    overrides: Sequence[str] = ()):
    """The fine-tune's RunConfig: the model's own config and batch shape, the recipe of the module
    docstring, the mix folder as the corpus with the model's tokenizer (``mix_dir=None``: the model's own
    corpus, whose validation loss then tells what the fine-tune forgot), then ``overrides``."""
    from engram.train.config import DataConfig, apply_overrides

    cfg = base_config(model_dir)
    tc = cfg.train
    tc.init_from, tc.seed, tc.steps = str(Path(model_dir).resolve()), seed, steps
    tc.lr *= LR_FRACTION
    tc.warmup_steps, tc.min_lr_ratio = max(1, steps // 20), 0.1
    tc.eval_every, tc.ckpt_every = steps, max(1, steps // 3)  # one evaluation; an interruption loses <1/3
    tc.eval_tokens = min(tc.eval_tokens, EVAL_TOKENS)
    tc.log_every = max(1, min(tc.log_every, steps // 10))
    if mix_dir is not None:
        cfg.data = DataConfig(data=[str(Path(mix_dir).resolve())], tokenizer=None, vocab_size=cfg.data.vocab_size,
                              val_permille=cfg.data.val_permille)
    cfg.preset = f"{cfg.preset}+ruler-finetune" if cfg.preset else "ruler-finetune"
    return apply_overrides(cfg, list(overrides))


def mix_count(cfg, length: int, general_ratio: float) -> int:
    """Task documents for a fine-tune to see each about once: the task share of its tokens over the mean
    document length (3/4 of ``length``)."""
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    return max(64, math.ceil(tokens / (1 + general_ratio) / (0.75 * length)))


def prepare_mix(mix_dir: Path, model_dir: str | Path, bundle, corpus_docs, plan: Plan, seed: int, count: int) -> dict:
    """The mix folder of one fine-tune (reused when complete and of the same plan): task documents over
    the train split of the model's corpus, and general documents of that split, ``general_ratio`` times
    the task documents' characters."""
    want = {"tasks": list(plan.tasks), "count": count, "length": plan.length, "seed": seed, **plan.sizes,
            "general_ratio": plan.general_ratio, "model": str(Path(model_dir).resolve())}
    old = M.read_mix(mix_dir)
    if old is not None and all(old.get(k) == v for k, v in want.items()):
        return old
    mix_dir.mkdir(parents=True, exist_ok=True)
    (mix_dir / M.MIX_META).unlink(missing_ok=True)
    docs = M.task_documents(bundle.tokenizer, bundle.train, plan.length, count, seed, plan.tasks,
                            drop_ids=(bundle.eos_id, bundle.pad_id), **plan.sizes)
    texts = [M.document_text(ex, bundle.tokenizer) for ex in docs]
    general = M.general_sample(corpus_docs, int(plan.general_ratio * sum(map(len, texts))), seed)
    M.write_jsonl(mix_dir / M.TASKS_FILE, texts)
    M.write_jsonl(mix_dir / M.GENERAL_FILE, general)
    from engram.atomic import write_json_atomic

    record = {**want, "format": "engram-ruler-mix-1", "stream": M.MIX_STREAM, "general_documents": len(general),
              "task_chars": sum(map(len, texts)), "general_chars": sum(map(len, general))}
    write_json_atomic(mix_dir / M.MIX_META, record)
    return record


def finetune(cfg, run_dir: Path, progress: bool, make_sampler: Callable | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``: skipped when finished, resumed when interrupted. ``make_sampler(seed,
    step)`` replaces the trainer's sampler of corpus windows (at the seed and step it starts from)."""
    import json

    from engram.train.trainer import Trainer

    summary = run_dir / "summary.json"

    def done() -> dict | None:
        s = json.loads(summary.read_text()) if summary.is_file() and (run_dir / "model").is_dir() else {}
        if s.get("status") != "finished" or s.get("step") != cfg.train.steps:
            return None
        return {"val_loss": s["val_loss"], "train_seconds": round(s["tokens"] / max(s["tokens_per_s"], 1e-9), 1)}

    if (old := done()) is not None:
        return {"reused": True, **old}
    resume = (run_dir / "config.json").is_file()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    if make_sampler is not None:
        trainer.sampler = make_sampler(trainer.sampler.seed, trainer.sampler.step)
    trainer.train()
    if (new := done()) is None:  # stopped (Ctrl-C, SIGTERM): the trainer saved a checkpoint to resume from
        from engram.config import UserError

        raise UserError(f"the fine-tune in {run_dir} stopped before step {cfg.train.steps}; run the same command "
                        "again to resume it")
    return {"reused": False, **new, "wall_seconds": round(time.perf_counter() - t0, 1)}


def task_sampler_factory(bundle, plan: Plan, cfg) -> Callable:
    """``make_sampler(seed, step)`` for :func:`finetune`: answer-supervised task documents over the train split
    of the model's corpus, in the fine-tune's batch shape, from the fine-tune's seed (the sampler's stream
    starts with ``MIX_STREAM``, never an evaluation seed; a resumed run passes its saved seed back)."""
    from engram.probes.ruler_sampler import TaskSampler

    def make(seed: int, step: int) -> TaskSampler:
        return TaskSampler(bundle.tokenizer, bundle.train, length=plan.length, seq_len=cfg.train.seq_len,
                           batch_size=cfg.train.batch_size, pad_id=bundle.pad_id, seed=seed,
                           step=step, tasks=plan.tasks, drop_ids=(bundle.eos_id, bundle.pad_id),
                           follow_ups=plan.follow_ups, copy_rows=plan.copy_rows, **plan.sizes)
    return make


def accuracy(model, examples: dict[str, list], tok) -> dict[str, float]:
    return {t: float(np.mean(R.evaluate(model, ex, tok))) for t, ex in examples.items()}


def spread(values: Sequence[float], n_examples: int) -> tuple[float, float]:
    """``(mean, standard error)`` of per-seed accuracies: the larger of the error over seeds and the binomial
    error of the mean over the ``n_examples`` prompts, which every seed shares (so seeds that happen to
    agree, or a single seed, do not read as certainty; ``p(1-p)`` is floored at ``1/n``)."""
    v = np.asarray(values, dtype=float)
    p = float(v.mean())
    binomial = math.sqrt(max(p * (1 - p), 1 / n_examples) / n_examples)
    over_seeds = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return p, max(over_seeds, binomial)


def run(model_dirs: Sequence[str], out: Path, plan: Plan, *, progress: bool = True,
        say: Callable[[str], None] = print) -> dict:
    """Fine-tune and evaluate every model for every seed; return the record the command saves."""
    from engram.data import load_corpus
    from engram.model import EngramLM
    from engram.probes.common import data_label, probe_data
    from engram.train.config import saved_tokenizer

    for d in model_dirs:  # every fine-tune's config is valid before any work
        cfg = finetune_config(d, out / "mix", seed=0, steps=plan.steps, overrides=plan.overrides)
        if plan.follow_ups and plan.supervise != "answer":
            raise ValueError("--follow-ups asks more questions of answer-supervised documents: it needs "
                             "--supervise answer")
        if not 0 <= plan.copy_rows < 1:
            raise ValueError(f"--copy-rows {plan.copy_rows}: a fraction of the batch rows, in [0, 1)")
        if plan.copy_rows and plan.supervise != "answer":
            raise ValueError("--copy-rows mixes copy documents into answer-supervised batches: it needs "
                             "--supervise answer")
        if plan.supervise == "answer" and plan.length > cfg.train.seq_len + 1:
            raise ValueError(f"--length {plan.length}: an answer-supervised document must fit one training window "
                             f"of train.seq_len {cfg.train.seq_len} (+1)")
    names: list[str] = []
    models = {}
    for d in model_dirs:
        name = model_name(d, names)
        names.append(name)
        original = EngramLM.from_pretrained(d).eval()
        bundle = probe_data(d, None, saved_tokenizer(str(d)), original.cfg.vocab_size)
        examples = {t: R.make_examples(t, bundle.tokenizer, bundle.val, plan.length, plan.examples, plan.eval_seed,
                                       **plan.sizes) for t in plan.tasks}
        say(f"== {name}: the original model at {plan.length} tokens ==")
        rec = {"dir": str(d), "data": data_label(d, None), "original": accuracy(original, examples, bundle.tokenizer),
               "runs": {}}
        del original  # the fine-tunes load their own copy
        answer = plan.supervise == "answer"
        base = base_config(d)
        corpus_docs = None if answer else load_corpus(base.data.data, base.data.val_permille).train
        for seed in plan.seeds:
            tag = f"{name}-seed{seed}"
            cfg = finetune_config(d, None if answer else out / "mix" / tag, seed=seed, steps=plan.steps,
                                  overrides=plan.overrides)
            if answer:
                make = task_sampler_factory(bundle, plan, cfg)
                count, info = plan.steps * cfg.train.batch_size, {}
                say(f"== {tag}: fine-tuning {plan.steps} steps on {count} task documents, answers supervised ==")
            else:
                make = None
                count = plan.mix_count or mix_count(cfg, plan.length, plan.general_ratio)
                mix = prepare_mix(out / "mix" / tag, d, bundle, corpus_docs, plan, MIX_SEED_OFFSET + seed, count)
                info = {"mix": str(out / "mix" / tag)}
                say(f"== {tag}: fine-tuning {plan.steps} steps on {count} task + {mix['general_documents']} "
                    f"general documents ==")
            ft = finetune(cfg, out / "runs" / tag, progress, make)
            tuned = EngramLM.from_pretrained(out / "runs" / tag / "model").eval()
            rec["runs"][str(seed)] = {"run_dir": str(out / "runs" / tag), **info, "task_documents": count, **ft,
                                      "accuracy": accuracy(tuned, examples, bundle.tokenizer)}
        rec["summary"] = {}
        for t in plan.tasks:
            mean, se = spread([r["accuracy"][t] for r in rec["runs"].values()], plan.examples)
            ch = R.chance(t, **plan.sizes)
            rec["summary"][t] = {"mean": mean, "se": se, "chance": ch, "above_chance": mean - 2 * se > ch}
        models[name] = rec
    return {"length": plan.length, "tasks": list(plan.tasks), "steps": plan.steps, "seeds": list(plan.seeds),
            "examples": plan.examples, "eval_seed": plan.eval_seed, **plan.sizes, "general_ratio": plan.general_ratio,
            "supervise": plan.supervise, "follow_ups": plan.follow_ups, "copy_rows": plan.copy_rows,
            "lr_fraction": LR_FRACTION,
            "overrides": list(plan.overrides), "models": models}


def verdict(record: dict) -> str:
    """Per model and task, whether the fine-tuned mean is above chance (mean - 2 se > chance), and per task
    which model is ahead and whether by more than twice the standard error of the difference."""
    models, parts = record["models"], []
    for t in record["tasks"]:
        above = [n for n, m in models.items() if m["summary"][t]["above_chance"]]
        line = (f"{t}: above chance after fine-tuning: " + (", ".join(above) if above else "no model"))
        if len(models) >= 2:
            ranked = sorted(models, key=lambda n: -models[n]["summary"][t]["mean"])
            a, b = (models[n]["summary"][t] for n in ranked[:2])
            gap, se = a["mean"] - b["mean"], math.hypot(a["se"], b["se"])
            if gap == 0:
                line += f"; {ranked[0]} and {ranked[1]} tie"
            else:
                clear = "clearly" if gap > 2 * se else "not clearly (within 2 se)"
                line += f"; {ranked[0]} leads {ranked[1]} by {gap:.3f}, {clear}"
        parts.append(line)
    return (f"At {record['length']} tokens, fine-tuned {record['steps']} steps, seeds "
            f"{', '.join(map(str, record['seeds']))}: " + "; ".join(parts) + ".")
