"""The command lines' (`viper`, `viper-synth`) handling of a user's mistake: a missing file, a bad config key,
an unreadable checkpoint is one line on stderr and exit status 1, not a traceback; `--debug` anywhere on the
command line shows the traceback instead (and is removed before the arguments are parsed).

Only the console entry points go through `run_console`; `main(argv)` called from Python raises as before."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback of an error instead of its one-line message"
DEBUG_ENV = "VIPER_DEBUG"  # set by --debug, for sub-commands that print their own one-line errors

# The errors a user's input causes (each names the file, key or value at fault). ValueError covers
# ConfigError, ModelMismatchError, RecordError, PlanError and JSON that does not parse; OSError missing or
# unreadable files and folders. Others by name, so that checking needs no import of their (heavy) modules.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (ValueError, OSError)
USER_ERROR_NAMES = frozenset({"CheckpointRestoreError", "TooManySkippedError", "RewardDependencyError"})


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERROR_TYPES) or any(t.__name__ in USER_ERROR_NAMES for t in type(error).__mro__)


def one_line(error: BaseException, limit: int = 2000) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + " ..."


def debugging() -> bool:
    """Whether this command line asked for tracebacks (--debug)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_console(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """main(argv without --debug), its user errors reported as `prog: message` and exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    if debug:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    try:
        return int(main(argv) or 0)
    except Exception as e:  # noqa: BLE001 - a bug still raises (is_user_error is False for it)
        if debug or not is_user_error(e):
            raise
        print(f"{prog}: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1
