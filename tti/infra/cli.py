"""How every `python -m tti.…` command fails: a user's mistake in one line, a bug with its traceback.

Each command-line module ends with `run_cli(main)`. A `UserError` (a wrong config key, a damaged
checkpoint, ...) then prints `<command>: error: <message>` on stderr and exits with status 1;
one whose class sets `quiet = True` prints nothing (another torchrun rank already did). Any
other exception is a bug and keeps its traceback, as a UserError does with `--debug` anywhere
on the command line or TTI_DEBUG=1. argparse's errors keep its usage line and exit status 2.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TTI_DEBUG"
USER_ERROR_EXIT = 1


class UserError(Exception):
    """Base of the errors a user causes and can fix; its message says what and where. Subclass
    it beside the builtin type callers catch, e.g. `class ConfigError(UserError, ValueError)`,
    so library callers keep catching ValueError and CLIs print the message alone."""


def command_name() -> str:
    """`tti.sample` for `python -m tti.sample`, else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0] or "tti")


def run_cli(main: Callable[[list], object], argv: Sequence[str] | None = None) -> None:
    """Call main(argv without --debug), argv defaulting to sys.argv[1:]; a UserError becomes one
    line on stderr (under torchrun, each failing rank's, tagged with its rank) and exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        main([a for a in argv if a != DEBUG_FLAG])
    except UserError as error:
        if debug:
            raise
        if getattr(error, "quiet", False):
            sys.exit(USER_ERROR_EXIT)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f" (rank {os.environ.get('RANK', '?')})" if world > 1 else ""
        print(f"{command_name()}{rank}: error: {error} [{DEBUG_FLAG} shows the traceback]",
              file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def check_at_least(parser, args, bounds: dict) -> None:
    """parser.error unless each argument in `bounds` ({dest name: lowest allowed value}) is
    None or >= its bound (NaN fails)."""
    for name, low in bounds.items():
        value = getattr(args, name)
        if value is not None and not value >= low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
