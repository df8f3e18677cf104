"""Helpers for the tests of bad input: the one-line BidirError a refusal raises, a JSON file edited in place, and a
BiEncoder.from_pretrained that must refuse."""

from __future__ import annotations

import json

import pytest

from bidir_core import BidirError, BiEncoder


def one_line_error(excinfo, *needles: str) -> str:
    """The message of a raised BidirError: one line, naming every needle."""
    err = excinfo.value
    assert isinstance(err, BidirError) and isinstance(err, ValueError)
    message = str(err)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def load_error(path, **kwargs):
    """The excinfo of BiEncoder.from_pretrained(path, **kwargs), which must raise a BidirError."""
    with pytest.raises(BidirError) as excinfo:
        BiEncoder.from_pretrained(path, **kwargs)
    return excinfo
