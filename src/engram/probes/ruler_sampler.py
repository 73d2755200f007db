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

Each batch is drawn from ``np.random.default_rng([MIX_STREAM, seed, step])``: it depends on (seed, step)
alone, so a resumed fine-tune sees the batches it would have seen, and the filler is the *train* split of
the model's corpus while the evaluation draws its filler from the validation split.
"""

# Shapes: B batch rows, T = seq_len positions.

from __future__ import annotations

import numpy as np
import torch

from engram.probes import ruler as R
from engram.probes.ruler_mix import MIX_STREAM, draw_example

IGNORE = -100  # the cross-entropy's ignore index


def supervised_row(ex: R.Example, end_ids: list[int]) -> tuple[list[int], list[int]]:
    """``(inputs, targets)`` of one document (its prompt, answer and ``end_ids``): targets only where the next
    token is part of the answer or of ``end_ids``."""
    seq = list(ex.ids) + list(ex.answer_ids) + list(end_ids)
    x, y = seq[:-1], seq[1:]
    first = len(ex.ids) - 1  # the position that predicts the first answer token
    return x, [IGNORE] * first + y[first:]


class TaskSampler:
    """Batches of ``batch_size`` answer-supervised task documents in ``seq_len`` positions; the
    ``engram.data.BatchSampler`` interface (``next``, ``batch_at``, ``state_dict``), so a Trainer takes it.

    Each document's length is drawn in ``[length // 2, length]`` tokens (newline included), the tasks in
    turn across the rows; ``length`` must fit ``seq_len + 1``.
    """

    def __init__(self, tok, filler: np.ndarray, *, length: int, seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, step: int = 0, tasks=R.TASKS, drop_ids=(), **sizes):
        if length > seq_len + 1:
            raise ValueError(f"documents of up to {length} tokens do not fit training windows of seq_len {seq_len}")
        if len(drop_ids):
            filler = filler[~np.isin(filler, np.asarray(list(drop_ids), dtype=filler.dtype))]
        self.tok, self.filler, self.length, self.seq_len = tok, filler, int(length), int(seq_len)
        self.batch_size, self.pad_id, self.tasks, self.sizes = int(batch_size), int(pad_id), tuple(tasks), sizes
        self.seed, self.step = int(seed), int(step)
        self.end_ids = list(tok.encode("\n"))

    def examples_at(self, step: int) -> list[R.Example]:
        """The documents of the batch at ``step`` (verified, each with exactly one right answer)."""
        rng = np.random.default_rng([MIX_STREAM, self.seed, int(step)])
        out = []
        for i in range(self.batch_size):
            task = self.tasks[(int(step) * self.batch_size + i) % len(self.tasks)]
            n = int(rng.integers(self.length // 2, self.length + 1)) - len(self.end_ids) + 1
            out.append(draw_example(task, self.tok, self.filler, n, max(n, self.length - len(self.end_ids) + 1),
                                    rng, **self.sizes))
        return out

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_BT, y_BT)`` int64 of ``step``, without moving the sampler."""
        x_BT = torch.full((self.batch_size, self.seq_len), self.pad_id, dtype=torch.int64)
        y_BT = torch.full((self.batch_size, self.seq_len), IGNORE, dtype=torch.int64)
        for b, ex in enumerate(self.examples_at(step)):
            x, y = supervised_row(ex, self.end_ids)
            x_BT[b, :len(x)] = torch.tensor(x)
            y_BT[b, :len(y)] = torch.tensor(y)
        return x_BT, y_BT

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
