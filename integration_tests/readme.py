"""The commands the READMEs show, read from the READMEs themselves, so a test runs exactly what a user copies."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READMES = (
    "README.md",
    "packages/core/README.md",
    "packages/train/README.md",
    "packages/export/README.md",
    "packages/serve/README.md",
    "containers/README.md",
    "benchmarks/README.md",
)
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(readme: str, language: str) -> list[str]:
    """The fenced blocks of one language (e.g. "bash", "python") in a README, in order."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    return [body for lang, body in _FENCE.findall(text) if lang == language]


def commands(readme: str) -> list[str]:
    """Every command in the README's bash blocks: continuation lines joined, comments dropped, one space between
    words (so the README can realign its columns without breaking a test)."""
    found = []
    for body in blocks(readme, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(" ".join(words))
    return found


def command(readme: str, start: str) -> list[str]:
    """The words of the one command in `readme` that starts with `start` (an error if none or several do)."""
    matches = [c for c in commands(readme) if c.startswith(start)]
    assert len(matches) == 1, f"{readme}: {len(matches)} commands start with {start!r}: {matches}"
    return shlex.split(matches[0])


def shell_command(readme: str, start: str) -> list[str]:
    """command(), but the words exactly as the shell splits them (command() normalizes spaces, which loses the
    quotes of a word holding spaces, such as curl's JSON body)."""
    lines = [line for body in blocks(readme, "bash") for line in body.replace("\\\n", " ").splitlines()]
    matches = [shlex.split(line, comments=True) for line in lines if line.strip().startswith(start)]
    assert len(matches) == 1, f"{readme}: {len(matches)} commands start with {start!r}"
    return matches[0]


def miniature(
    words: list[str],
    paths: dict[str, str | Path] | None = None,
    options: dict[str, str] | None = None,
    settings: dict[str, str] | None = None,
) -> list[str]:
    """A README command scaled down for a test: a word (or the value of a key=value override) found in `paths`
    becomes the test's path, the value after an option in `options` is replaced (e.g. a process count), and a
    key=value override whose key is in `settings` gets that value (e.g. fewer steps). Every flag stays; each
    option and setting must find its word, and no absolute path of the README's may be left (a test never
    touches /models or /data), so a README edit cannot silently bypass the test."""
    paths, options, settings = paths or {}, options or {}, settings or {}
    out, unused = [], {*options, *settings}
    for i, word in enumerate(words):
        key, eq, value = word.partition("=")
        if i and words[i - 1] in options:
            unused.discard(words[i - 1])
            word = options[words[i - 1]]
        elif word in paths:
            word = str(paths[word])
        elif eq and not key.startswith("-") and key in settings:
            unused.discard(key)
            word = f"{key}={settings[key]}"
        elif eq and not key.startswith("-") and value in paths:
            word = f"{key}={paths[value]}"
        out.append(word)
    assert not unused, f"not in {shlex.join(words)}: {sorted(unused)}"
    absolute = [w for w in words if w.startswith("/") or w.partition("=")[2].startswith("/")]
    assert not [w for w in absolute if w in out], f"README paths left in {shlex.join(out)}"
    return out
