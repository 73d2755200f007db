"""The `engram` command. It only parses arguments and calls into the package.

Errors: a known user error (see `is_user_error`) prints one line, ``engram: error: ...``, and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from engram.cli.parser import build_parser

__all__ = ["USER_ERRNOS", "build_parser", "error_line", "is_user_error", "main"]


# The errno values that describe the user's environment (a path missing, unreadable, unwritable or
# of the wrong kind; a full or read-only file system), never a bug: an OSError with one of them is
# reported as one line. Other OSErrors (EIO, EBADF, EINVAL, ...) keep their traceback.
USER_ERRNOS = frozenset(getattr(errno, name) for name in ("EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "ENOENT",
                                                           "EISDIR", "ENOTDIR") if hasattr(errno, name))


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a known user error, reported as one line rather than a traceback.

    Exactly these: `engram.config.UserError` (its `ConfigError` included: an invalid setting,
    override or preset name, and the ValueErrors raised while loading a tokenizer, corpus, model or
    store the user named, which the commands convert); a damaged or foreign store file
    (`StoreFormatError`) or checkpoint (`CheckpointError`); a missing, unreadable, unwritable or
    wrong-kind path, a full disk or a read-only file system: FileNotFoundError, PermissionError,
    IsADirectoryError, NotADirectoryError, or any OSError whose errno is in `USER_ERRNOS`.
    Anything else, a plain ValueError from the computation or an OSError such as EIO included, is
    a bug (or a failing device) and keeps its traceback.
    """
    from engram.config import UserError
    from engram.store.format import StoreFormatError
    from engram.train.checkpoint import CheckpointError

    if isinstance(e, (UserError, StoreFormatError, CheckpointError, FileNotFoundError, PermissionError,
                      IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(e, OSError) and e.errno in USER_ERRNOS


def error_line(e: BaseException) -> str:
    """The one line ``engram: error: ...`` that reports user error ``e`` (no newline).

    An OSError that names its file reads ``<what>: <path>`` (the path as is, no ``[Errno N]``);
    every other message is joined into one line.
    """
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        name = os.fsdecode(e.filename)
        named = re.search(rf"(?<!\S){re.escape(name)}(?![^\s:,;)])", e.strerror)  # a message that names it already
        msg = e.strerror if named else f"{e.strerror}: {name}"
        if e.filename2 is not None:
            msg += f" -> {os.fsdecode(e.filename2)}"
    elif isinstance(e, OSError) and e.strerror and len(e.args) == 2:
        msg = e.strerror
    else:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"engram: error: {msg or type(e).__name__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not is_user_error(e):
            raise
        # Under torchrun every rank usually meets the same error: rank 0 prints it; another rank hands its
        # own to the job's watchdog, so a rank-specific error still reaches the ranks that are left.
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "0"
        if rank == "0":
            print(error_line(e), file=sys.stderr)
        elif "engram.distributed.launch" in sys.modules:
            sys.modules["engram.distributed.launch"].report_failure(error_line(e).removeprefix("engram: error: "))
        return 2


if __name__ == "__main__":
    sys.exit(main())
