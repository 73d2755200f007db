"""What each rank prints: rank 0 speaks for the job, every rank's errors show, tagged with the rank.

With N ranks, N copies of every line and N progress bars fighting over one terminal hide the one line
that matters; but an error on rank 5 must still reach the user, and say it came from rank 5.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator

__all__ = ["RankPrefixed", "rank_zero_output"]


class RankPrefixed(io.TextIOBase):
    """A text stream that starts every line (and every ``\\r``-redrawn progress line) with ``prefix``."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix = stream, prefix
        self._at_start = True

    def write(self, s: str) -> int:
        out = []
        for piece in s.splitlines(keepends=True):
            if self._at_start and piece.strip("\r\n"):  # a bare line break is left as it is
                out.append(self.prefix)
            out.append(piece)
            self._at_start = piece.endswith(("\n", "\r"))
        self.stream.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):  # tqdm and print ask the stream for these
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self.stream, "errors", "strict")


@contextlib.contextmanager
def _tqdm_disabled() -> Iterator[None]:
    """Every tqdm bar made inside is disabled, whatever its caller passed as ``disable``.

    tqdm reads its ``TQDM_DISABLE`` environment default once, at import, and an explicit ``disable=False``
    wins over it; so the constructor every bar class shares is wrapped for the duration instead.
    """
    try:
        from tqdm import std
    except ImportError:  # no tqdm, no bars to silence
        yield
        return
    original = std.tqdm.__init__

    def silenced(self, *args, **kwargs):
        if len(args) > 10:  # `disable` is the 11th positional parameter
            args = (*args[:10], True, *args[11:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = silenced
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextlib.contextmanager
def rank_zero_output(ctx) -> Iterator[None]:
    """Inside: ranks other than 0 print nothing to stdout and show no tqdm bar, and every rank's stderr is
    tagged ``[rank R] ``; ``ctx`` is a `DistContext` (anything with ``rank`` and ``world_size``). A world of
    one is left as it is.

    Only Python-level output is redirected: what native code writes to the file descriptors themselves
    (NCCL's debug log, for one) still comes from every rank.
    """
    rank, world_size = ctx.rank, ctx.world_size
    if world_size <= 1:
        yield
        return
    old_out, old_err = sys.stdout, sys.stderr
    sys.stderr = RankPrefixed(old_err, f"[rank {rank}] ")
    with contextlib.ExitStack() as stack:
        if rank != 0:
            sys.stdout = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(_tqdm_disabled())
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old_out, old_err
