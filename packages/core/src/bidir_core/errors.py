"""The one exception type for bad user input (a path, a file, a setting): CLIs print its message as one line."""


class BidirError(ValueError):
    """A user-facing error whose message names the file, key or value and what is wrong with it."""
