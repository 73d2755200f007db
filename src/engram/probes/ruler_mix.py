"""Training documents for the RULER-style tasks: the fine-tuning half of `engram.probes.ruler`.

A task document is a prompt of :mod:`engram.probes.ruler` followed by its answer and a newline, exactly
what the evaluation's greedy decode must produce. The documents are drawn from their own random stream
(``MIX_STREAM``, never the evaluation's ``[seed, task]`` stream) over the *train* split of the model's
corpus, while the evaluation hides its lines in the validation split: whatever the two seeds, no
evaluation prompt is trained on. Each document's length is drawn in ``[length/2, length]`` tokens so that
a training window of ``length`` tokens usually holds a whole document, query and answer included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engram.atomic import atomic_write, write_json_atomic
from engram.probes import ruler as R

MIX_STREAM = 0x6D6978  # the first word of every mix's seed sequence; the evaluation's is its --seed
TASKS_FILE, GENERAL_FILE, MIX_META = "tasks.jsonl", "general.jsonl", "mix.json"


def task_documents(tok, filler: np.ndarray, length: int, count: int, seed: int, tasks=R.DEFAULT_TASKS, *,
                   drop_ids=(), **sizes) -> list[R.Example]:
    """``count`` verified examples, the tasks in turn, each of a length drawn in ``[length // 2, length]``
    (a task that needs more tokens than its draw gets ``length``). ``drop_ids`` (the end-of-text and pad
    ids) are taken out of the filler: a document is text, and their decoded form would read back as
    several ordinary tokens."""
    if len(drop_ids):
        filler = filler[~np.isin(filler, np.asarray(list(drop_ids), dtype=filler.dtype))]
    rng = np.random.default_rng([MIX_STREAM, seed])
    out: list[R.Example] = []
    for i in range(count):
        out.append(draw_example(tasks[i % len(tasks)], tok, filler, int(rng.integers(length // 2, length + 1)),
                                length, rng, **sizes))
    return out


def draw_example(task: str, tok, filler: np.ndarray, n: int, n_max: int, rng, **sizes) -> R.Example:
    """One verified example of ``n`` tokens (``n_max`` when the task needs more than ``n``), drawn again when
    the filler happens to break the uniqueness of its answer."""
    for _ in range(20):
        try:
            ex = R.build_example(task, tok, filler, n, rng, **sizes)
        except ValueError:
            if n >= n_max:
                raise
            n = n_max
            continue
        try:
            if R.verify(ex, tok) == ex.answer:
                return ex
        except ValueError:  # the filler happened to hold a line of the task's form: draw again
            continue
    raise ValueError(f"could not draw a {task} example with a unique answer from this filler")


def document_text(ex: R.Example, tok) -> str:
    """The text a model trains on: the prompt, the answer as the evaluation decodes it, and the newline
    that ends it (the evaluation reads up to the first newline)."""
    return tok.decode(list(ex.ids) + list(ex.answer_ids)) + "\n"


def write_jsonl(path: Path, texts) -> Path:
    """``{"text": ...}`` per line, atomically (the corpus reader takes one document per line)."""
    return atomic_write(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def write_mix(out_dir: str | Path, tok, filler: np.ndarray, *, length: int, count: int, seed: int,
              tasks=R.DEFAULT_TASKS, drop_ids=(), meta: dict | None = None, **sizes) -> dict:
    """Write ``tasks.jsonl`` (``count`` task documents) and ``mix.json`` (what it holds; written last, so a
    folder with it is complete) into ``out_dir``; return the record of ``mix.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = task_documents(tok, filler, length, count, seed, tuple(tasks), drop_ids=drop_ids, **sizes)
    texts = [document_text(ex, tok) for ex in docs]
    write_jsonl(out / TASKS_FILE, texts)
    lengths = [len(ex.ids) + len(ex.answer_ids) + 1 for ex in docs]
    record = {"format": "engram-ruler-mix-1", "tasks": list(tasks), "count": count, "length": length, "seed": seed,
              "stream": MIX_STREAM, **sizes, "tokens_min": min(lengths), "tokens_max": max(lengths),
              "tokens_total": sum(lengths), **(meta or {})}
    write_json_atomic(out / MIX_META, record)
    return record


def read_mix(out_dir: str | Path) -> dict | None:
    """The record of a complete mix folder, or None (no folder, or a write that did not finish)."""
    path = Path(out_dir) / MIX_META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def general_sample(documents, chars: int, seed: int) -> list[str]:
    """Texts of ``documents`` drawn at random without replacement until they hold ``chars`` characters (all
    of them if they hold fewer; the last one cut at a line end so one long file does not swamp the tasks):
    the general text a fine-tune keeps seeing beside the tasks."""
    order = np.random.default_rng([MIX_STREAM, seed, 1]).permutation(len(documents))
    out, total = [], 0
    for i in order:
        if total >= chars:
            break
        text = documents[i].text
        if total + len(text) > chars:
            cut = text.rfind("\n", 0, chars - total) + 1
            if cut == 0 and out:  # not a whole line left to fill
                break
            text = text[:cut] if cut > 0 else text[:chars - total]
        out.append(text)
        total += len(text)
    return out
