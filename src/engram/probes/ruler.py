"""`engram probe ruler`: RULER-style long-context retrieval, generated locally from a seed.

Three of RULER's synthetic tasks (Hsieh et al. 2024), sized to the model's context: multi-query needle-in-a-
haystack (``mq-niah``: several ``key = value`` lines hidden in corpus text, the values of some keys asked for
in a question), variable tracking (``vt``: ``var_a = 123`` then chains ``var_b = var_a``; which variables hold
the value?) and multi-key needle-in-a-haystack (``mk-niah``: the same lines, and the prompt ends with one
key's own left-hand side, ``key_x =``, for the model to complete, as RULER's answer prefix restates the key).
A fourth, ``kv-niah``, is mk-niah with ``key_x NNN`` lines, no ``=``: the prompt ends with ``key_x``.
``mk-niah`` is easier for a small model than ``mq-niah``: its answer is the token after an earlier match of the
prompt's last tokens (what an induction head copies), while ``mq-niah``'s question form needs the match and then
a jump past the ``=``. In mk-niah that match is two tokens long (the key's word, then the `` =`` that every line
shares); in ``kv-niah`` it is the key's last token alone, the one-token match ``A B ... A -> B`` of the simplest
induction head. The paper reports that Engram frees attention for such global context; these tasks measure it
on the model at hand. Every prompt has exactly one right answer, which :func:`verify` re-derives from the
prompt text alone.
"""

# Shapes: P prompts, C prompt length in tokens.

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

TASKS = ("mq-niah", "vt", "mk-niah", "kv-niah")  # the order seeds each task's stream: append, never reorder
DEFAULT_TASKS = ("mq-niah", "vt")
# Names that the stdlib BPE encodes as one token after "key_"/"var_", so a line costs few tokens of the context.
NEEDLE_TASKS = ("mq-niah", "mk-niah", "kv-niah")  # key/value lines
COMPLETION_TASKS = ("mk-niah", "kv-niah")  # the prompt ends with one key's line for the model to complete
_WORDS = "alpha anchor blue box cat day delta field ice left month pear red right star sun top tree week year".split()


@dataclass
class Example:
    """One prompt: its token ids, the answer text, and the values the verifier needs."""

    task: str
    ids: list[int]
    answer: str
    answer_ids: list[int]


def _needle_lines(rng, pairs: int, sep: str = " = ") -> tuple[list[str], dict[str, str]]:
    keys = rng.choice(_WORDS, pairs, replace=False)
    values = rng.choice(np.arange(100, 1000), pairs, replace=False)
    truth = {f"key_{k}": str(v) for k, v in zip(keys, values, strict=True)}
    return [f"\n{k}{sep}{v}\n" for k, v in truth.items()], truth


def _vt_lines(rng, hops: int) -> tuple[list[str], str, list[str]]:
    """A chain of ``hops`` copies from a literal, and a distractor chain as long from another literal."""
    if 2 * (hops + 1) > len(_WORDS):
        raise ValueError(f"at most {len(_WORDS) // 2 - 1} hops")
    names = [f"var_{w}" for w in rng.choice(_WORDS, 2 * (hops + 1), replace=False)]
    v1, v2 = (str(v) for v in rng.choice(np.arange(100, 1000), 2, replace=False))
    chain, other = names[: hops + 1], names[hops + 1:]
    lines = [f"\n{chain[0]} = {v1}\n", f"\n{other[0]} = {v2}\n"]
    for a, b, c, d in zip(chain, chain[1:], other, other[1:], strict=False):
        lines += [f"\n{b} = {a}\n", f"\n{d} = {c}\n"]
    return lines, v1, chain


def query_text(task: str, asked) -> str:
    """The question that ends a prompt: mq-niah, the values of the keys ``asked``; vt, the variables that hold
    the value ``asked``; mk-niah (kv-niah), the left-hand side of the key ``asked`` (a one-key list or the key),
    with (without) its ``=``."""
    if task == "mq-niah":
        return f"\n# values of {', '.join(asked)}:"
    if task in COMPLETION_TASKS:
        key = asked if isinstance(asked, str) else asked[0]
        return f"\n{key} =" if task == "mk-niah" else f"\n{key}"
    return f"\n# variables equal to {asked}:"


def assignments(text: str, task: str | None = None) -> list[tuple[str, str]]:
    """The ``name = value`` lines of a decoded prompt, in order (kv-niah: its ``key_x NNN`` lines)."""
    if task == "kv-niah":
        return re.findall(r"(?m)^(key_\w+) (\d+)$", text)
    return re.findall(r"(?m)^((?:key_|var_)\w+) = (\w+)$", text)


def build_example(task: str, tok, filler: np.ndarray, length: int, rng, *, pairs: int = 4, queries: int = 2,
                  hops: int = 1) -> Example:
    """One prompt of exactly ``length - len(answer_ids) - 1`` tokens (room to decode the answer and one more):
    the task's lines at random places in corpus filler (a window of ``filler`` token ids)."""
    if task == "mq-niah":
        lines, truth = _needle_lines(rng, pairs)
        asked = list(rng.choice(list(truth), queries, replace=False))
        query = query_text(task, asked)
        answer = " ".join(truth[k] for k in asked)
    elif task in COMPLETION_TASKS:
        lines, truth = _needle_lines(rng, pairs, " = " if task == "mk-niah" else " ")
        key = str(rng.choice(list(truth)))
        query, answer = query_text(task, key), truth[key]
    elif task == "vt":
        lines, value, chain = _vt_lines(rng, hops)
        query = query_text(task, value)
        answer = " ".join(chain)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    enc = lambda s: list(tok.encode(s))  # noqa: E731
    line_ids = [enc(s) for s in lines]
    query_ids, answer_ids = enc(query), enc(" " + answer)
    budget = length - len(answer_ids) - 1 - len(query_ids) - sum(map(len, line_ids))
    if budget < 0:
        raise ValueError(f"--length {length} is too short for a {task} prompt ({length - budget} tokens "
                         f"without filler)")
    start = int(rng.integers(0, len(filler) - budget)) if len(filler) > budget else 0
    hay = [int(t) for t in filler[start:start + budget]]
    # the lines go at sorted random cut points of the filler, in their order (a chain reads top-down)
    cuts = np.sort(rng.integers(0, budget + 1, len(line_ids)))
    ids, prev = [], 0
    for c, li in zip(cuts, line_ids, strict=True):
        ids += hay[prev:c] + li
        prev = c
    ids += hay[prev:] + query_ids
    return Example(task, ids, answer, answer_ids)


def verify(ex: Example, tok) -> str:
    """Re-derive the one correct answer from the decoded prompt alone; raise if there is none or several."""
    text = tok.decode(ex.ids)
    completes = ex.task in COMPLETION_TASKS
    assigns = assignments(text, ex.task)
    if completes:  # an answered key's line reads like its needle (follow-up questions): one value each
        assigns = list(dict.fromkeys(assigns))
    lhs = [a for a, _ in assigns]
    if len(set(lhs)) != len(lhs):
        raise ValueError("a name is assigned twice")
    env = dict(assigns)
    if completes:
        m = re.search(r"\n(key_\w+) =$" if ex.task == "mk-niah" else r"\n(key_\w+)$", text)
        if m is None:
            raise ValueError("no key to complete at the end of the prompt")
        if not env.get(m.group(1), "").isdigit():
            raise ValueError("the queried key has no literal value in the prompt")
        return env[m.group(1)]
    if ex.task == "mq-niah":
        m = re.search(r"# values of ([\w, ]+):$", text)
        if m is None:
            raise ValueError("no query at the end of the prompt")
        asked = m.group(1).split(", ")
        if not all(k in env and env[k].isdigit() for k in asked):
            raise ValueError("a queried key has no literal value in the prompt")
        return " ".join(env[k] for k in asked)
    m = re.search(r"# variables equal to (\d+):$", text)
    if m is None:
        raise ValueError("no query at the end of the prompt")

    def value(name, seen=()):
        v = env.get(name)
        if v is None or name in seen:
            return None
        return v if v.isdigit() else value(v, (*seen, name))

    holders = [a for a in lhs if a.startswith("var_") and value(a) == m.group(1)]
    if sum(1 for v in env.values() if v == m.group(1)) != 1:
        raise ValueError("the queried value is assigned as a literal more or less than once")
    return " ".join(holders)


def chance(task: str, *, pairs: int, queries: int, hops: int) -> float:
    """Exact-match rate of a guesser that knows the format: mq-niah, the values of the ``queries`` asked keys
    drawn from the ``pairs`` values in the prompt; vt, the ``hops+1`` holders drawn (in order) from the
    ``2*(hops+1)`` variables; mk-niah and kv-niah, one of the ``pairs`` values."""
    if task == "mq-niah":
        return 1.0 / math.perm(pairs, queries)
    if task in COMPLETION_TASKS:
        return 1.0 / pairs
    return 1.0 / math.perm(2 * (hops + 1), hops + 1)


def exact_match(generated_ids: list[int], ex: Example, tok) -> bool:
    """Whether the first line of the greedy continuation, split on whitespace, is the answer."""
    text = tok.decode(generated_ids).lstrip(" ").split("\n")[0]
    return text.split() == ex.answer.split()


def make_examples(task: str, tok, filler: np.ndarray, length: int, count: int, seed: int, **sizes) -> list[Example]:
    """``count`` verified examples of ``task`` (an example whose filler breaks uniqueness is drawn again)."""
    rng = np.random.default_rng([seed, TASKS.index(task)])
    out, tries = [], 0
    while len(out) < count:
        tries += 1
        if tries > 20 * count:
            raise ValueError(f"could not draw {count} {task} examples with a unique answer from this filler")
        ex = build_example(task, tok, filler, length, rng, **sizes)
        try:
            if verify(ex, tok) == ex.answer:
                out.append(ex)
        except ValueError:
            continue
    return out


def evaluate(model, examples: list[Example], tok, batch_size: int = 16) -> list[bool]:
    """Greedy-decode each prompt (all of one length, so they batch) and score exact match."""
    import torch

    from engram.model import generate

    hits = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        by_len: dict[tuple[int, int], list[int]] = {}
        for j, ex in enumerate(chunk):
            by_len.setdefault((len(ex.ids), len(ex.answer_ids)), []).append(j)
        got: dict[int, bool] = {}
        for (T, A), idx in by_len.items():
            with torch.no_grad():
                out = generate(model, torch.tensor([chunk[j].ids for j in idx]), A + 1, temperature=0)
            for j, row in zip(idx, out[:, T:].tolist(), strict=True):
                got[j] = exact_match(row, chunk[j], tok)
        hits += [got[j] for j in range(len(chunk))]
    return hits
