"""The `engram` command. It only parses arguments and calls into the package.

Errors: a known user error (see `is_user_error`) prints one line, ``engram: error: ...``, and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from engram.cli.parser import build_parser

__all__ = ["build_parser", "is_user_error", "main"]


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a known user error, reported as one line rather than a traceback.

    Exactly these: `engram.config.UserError` (its `ConfigError` included: an invalid setting,
    override or preset name, and the ValueErrors raised while loading a tokenizer, corpus, model or
    store the user named, which the commands convert); a missing, unreadable or wrong-kind path
    (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError); a damaged or
    foreign store file (`StoreFormatError`) or checkpoint (`CheckpointError`). Anything else, a
    plain ValueError from the computation included, is a bug and keeps its traceback.
    """
    from engram.config import UserError
    from engram.store.format import StoreFormatError
    from engram.train.checkpoint import CheckpointError

    return isinstance(e, (UserError, StoreFormatError, CheckpointError, FileNotFoundError, PermissionError,
                          IsADirectoryError, NotADirectoryError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not is_user_error(e):
            raise
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"engram: error: {msg or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
