"""Answer-supervised batches of RULER-style task documents: the `--supervise answer` recipe of
`engram probe ruler-finetune`.

Fine-tuning on a corpus that mixes task documents into general text (``engram.probes.ruler_mix``) trains
on every token, and nearly all of them are filler: in a 128-token document, the few answer tokens that
need retrieval from the context weigh ~3% of the loss, and a random training window often cuts the
needles off from their query. The demo models learn the format that way and never the retrieval. This
sampler instead gives each batch row one whole document, prompt and answer, starting at position 0 and
padded on the right, with a target only on the answer and the newline that ends it (``-100``, the loss's
ignore index, everywhere else): every gradient is a retrieval signal. Right padding needs no token mask,
as every position that carries a target sees only the document before it.

With ``follow_ups`` > 0 a document goes on after its answer with that many more questions about the same
task lines (other keys, the other chain's value), each answer supervised: the lines and filler cost the
same, the retrieval signal per row grows with the questions. The first question is the evaluation's
form, so the evaluation prompt is a prefix of the training documents' form.

With ``copy_rows`` > 0 that fraction of each batch's rows are copy documents instead: a span of tokens drawn
at random from the filler, then the same span again, every token of the repeat after its first supervised.
Only copying predicts them, so every such row trains the induction circuit (find the earlier occurrence of
the current token, emit what followed it) that retrieval is built on, and that small models trained briefly
on code lack (the memory-off probe's in-context family scores 0 on the demo models).

Each batch is drawn from ``np.random.default_rng([MIX_STREAM, seed, step])``: it depends on (seed, step)
alone, so a resumed fine-tune sees the batches it would have seen, and the filler is the *train* split of
the model's corpus while the evaluation draws its filler from the validation split.
"""

# Shapes: B batch rows, T = seq_len positions.

from __future__ import annotations

import re

import numpy as np
import torch

from engram.data.tokens import StepSampler
from engram.probes import ruler as R
from engram.probes.ruler_mix import MIX_STREAM, draw_example

IGNORE = -100  # the cross-entropy's ignore index


def supervised_row(ex: R.Example, end_ids: list[int], follow=()) -> tuple[list[int], list[int]]:
    """``(inputs, targets)`` of one document (its prompt, answer and ``end_ids``, then each follow-up's
    question, answer and ``end_ids``): targets only where the next token is part of an answer or of the
    ``end_ids`` after it."""
    seq, keep = list(ex.ids), [False] * len(ex.ids)
    for q_ids, a_ids in [([], ex.answer_ids), *follow]:
        seq += list(q_ids) + list(a_ids) + list(end_ids)
        keep += [False] * len(q_ids) + [True] * (len(a_ids) + len(end_ids))
    x = seq[:-1]
    return x, [t if k else IGNORE for t, k in zip(seq[1:], keep[1:], strict=True)]


def follow_up(ex: R.Example, before: list[int], tok, rng, *, queries: int = 2, **_) -> tuple[list[int], list[int]]:
    """One more question about the task lines of ``ex``, asked after the token ids ``before`` (the prompt, its
    answers so far): ``(question_ids, answer_ids)``, the answer re-derived by :func:`ruler.verify` from the
    whole text so far, so it is the one right answer."""
    text = tok.decode(list(before))
    env = R.assignments(text, ex.task)
    completes = ex.task in R.COMPLETION_TASKS
    # Unasked keys (values) first: a question asked again could be answered by copying the earlier answer line.
    seen = {w for q in re.findall(r"# (?:values of|variables equal to) ([\w, ]+):", text) for w in q.split(", ")}
    if completes:  # an answered key's line repeats its needle: a key seen twice was asked
        names = [k for k, _ in env]
        seen = {k for k in names if names.count(k) > 1}
        env = list(dict.fromkeys(env))
    if ex.task in R.NEEDLE_TASKS:
        pool = [k for k, v in env if k.startswith("key_") and v.isdigit()]
        want = 1 if completes else min(queries, len(pool))
    else:
        pool, want = [v for _, v in env if v.isdigit()], 1
    fresh, old = [c for c in pool if c not in seen], [c for c in pool if c in seen]
    picked = list(rng.permutation(fresh))[:want]
    picked += list(rng.permutation(old))[:want - len(picked)]
    picked = [str(c) for c in picked]
    asked = R.query_text(ex.task, picked if ex.task != "vt" else picked[0])
    q_ids = list(tok.encode(asked))
    answer = R.verify(R.Example(ex.task, list(before) + q_ids, "", []), tok)
    return q_ids, list(tok.encode(" " + answer))


class TaskSampler(StepSampler):
    """Batches of ``batch_size`` answer-supervised task documents in ``seq_len`` positions; the
    ``engram.data.BatchSampler`` interface (``next``, ``batch_at``, ``state_dict``), so a Trainer takes it.

    Each document's length is drawn in ``[length // 2, length]`` tokens (newline included), the tasks in
    turn across the rows; ``length`` must fit ``seq_len + 1``.
    """

    def __init__(self, tok, filler: np.ndarray, *, length: int, seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, step: int = 0, tasks=R.DEFAULT_TASKS, drop_ids=(), follow_ups: int = 0,
                 copy_rows: float = 0.0, **sizes):
        if length > seq_len + 1:
            raise ValueError(f"documents of up to {length} tokens do not fit training windows of seq_len {seq_len}")
        if len(drop_ids):
            filler = filler[~np.isin(filler, np.asarray(list(drop_ids), dtype=filler.dtype))]
        self.tok, self.filler, self.length, self.seq_len = tok, filler, int(length), int(seq_len)
        self.batch_size, self.pad_id, self.tasks, self.sizes = int(batch_size), int(pad_id), tuple(tasks), sizes
        self.seed, self.step = int(seed), int(step)
        self.end_ids = list(tok.encode("\n"))
        self.follow_ups = int(follow_ups)
        if not 0.0 <= copy_rows < 1.0:
            raise ValueError(f"copy_rows {copy_rows}: the fraction of copy rows must be in [0, 1)")
        self.copy_count = int(round(copy_rows * self.batch_size))
        # Room kept for the follow-ups: the longest question and answer a task can have, measured once.
        self.reserve = self.follow_ups * max(self._qa_tokens(t) for t in self.tasks) if self.follow_ups else 0
        if self.length - self.reserve < 8:
            raise ValueError(f"documents of {self.length} tokens leave no room for a prompt and {self.follow_ups} "
                             f"follow-up questions")

    def _qa_tokens(self, task: str) -> int:
        sz = {"pairs": 4, "queries": 2, "hops": 1, **self.sizes}
        if task in R.COMPLETION_TASKS:
            return len(self.tok.encode(R.query_text(task, "key_" + R._WORDS[0]) + " 999\n")) + 2
        if task == "mq-niah":
            keys = [f"key_{w}" for w in R._WORDS[:sz["queries"]]]
            return len(self.tok.encode(R.query_text(task, keys) + " 999" * sz["queries"] + "\n")) + 2
        names = " ".join(f"var_{w}" for w in R._WORDS[:sz["hops"] + 1])
        return len(self.tok.encode(R.query_text(task, "999") + " " + names + "\n")) + 2

    def documents_at(self, step: int) -> list[tuple[R.Example, list[tuple[list[int], list[int]]]]]:
        """The documents of the batch at ``step``: each a verified example (exactly one right answer) and its
        follow-up ``(question_ids, answer_ids)``."""
        rng = np.random.default_rng([MIX_STREAM, self.seed, int(step)])
        out = []
        cap = self.length - len(self.end_ids) + 1 - self.reserve
        tasked = self.batch_size - self.copy_count
        for i in range(tasked):
            task = self.tasks[(int(step) * tasked + i) % len(self.tasks)]
            n = int(rng.integers(self.length // 2, self.length + 1)) - len(self.end_ids) + 1 - self.reserve
            try:
                ex = draw_example(task, self.tok, self.filler, max(n, 1), max(n, cap), rng, **self.sizes)
            except ValueError as e:
                if not self.reserve:
                    raise
                raise ValueError(f"{e}; {self.follow_ups} follow-up questions keep {self.reserve} of the "
                                 f"{self.length} tokens (fewer follow-ups, or fewer pairs)") from e
            follow, before = [], ex.ids + ex.answer_ids + self.end_ids
            for _ in range(self.follow_ups):
                try:
                    q_ids, a_ids = follow_up(ex, before, self.tok, rng, **self.sizes)
                except ValueError:  # no question with exactly one right answer is left: end the document
                    break
                if len(before) + len(q_ids) + len(a_ids) + len(self.end_ids) > self.length:
                    break
                follow.append((q_ids, a_ids))
                before = before + q_ids + a_ids + self.end_ids
            out.append((ex, follow))
        for _ in range(self.copy_count):
            out.append((self._copy_document(rng), []))
        return out

    def _copy_document(self, rng) -> R.Example:
        """A span of ``length/4 .. length/2 - 1`` filler tokens drawn at random, then its first token again: the
        rest of the span is the answer (supervised like a task's answer), so the document is the span twice."""
        k = int(rng.integers(max(2, self.length // 4), max(3, (self.length - len(self.end_ids)) // 2)))
        span = [int(t) for t in rng.choice(self.filler, k)]
        return R.Example("copy", span + span[:1], "", span[1:])

    def examples_at(self, step: int) -> list[R.Example]:
        """The first question of each task document of the batch at ``step`` (the evaluation's form); copy
        documents left out."""
        return [ex for ex, _ in self.documents_at(step) if ex.task != "copy"]

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_BT, y_BT)`` int64 of ``step``, without moving the sampler."""
        x_BT = torch.full((self.batch_size, self.seq_len), self.pad_id, dtype=torch.int64)
        y_BT = torch.full((self.batch_size, self.seq_len), IGNORE, dtype=torch.int64)
        for b, (ex, follow) in enumerate(self.documents_at(step)):
            x, y = supervised_row(ex, self.end_ids, follow)
            x_BT[b, :len(x)] = torch.tensor(x)
            y_BT[b, :len(y)] = torch.tensor(y)
        return x_BT, y_BT
