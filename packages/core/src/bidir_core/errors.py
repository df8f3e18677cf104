"""The one exception type for bad user input (a path, a file, a setting): CLIs print its message as one line."""

import re


class BidirError(ValueError):
    """A user-facing error whose message names the file, key or value and what is wrong with it."""


def one_line(error: BaseException) -> str:
    """A library's error message folded onto one line, without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(error).split()))
