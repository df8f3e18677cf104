"""The one way every bidir command line ends: 0 when the work is done, 2 with one line on stderr when the input is
wrong (as argparse does for a bad flag), 130 on Ctrl-C. A CLI parses its arguments, then hands its work here."""

from __future__ import annotations

import sys
from collections.abc import Callable

from bidir_core.errors import BidirError, one_line

USER_ERROR = 2
INTERRUPTED = 130


def run_cli(prog: str, work: Callable[[], object]) -> int:
    """Run work() and map its end to an exit code. OSError counts as the user's: an unreadable input, an
    unwritable, full or misnamed output location."""
    try:
        work()
    except (BidirError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0
