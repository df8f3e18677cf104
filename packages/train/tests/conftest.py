"""Shared fixtures: an isolated model cache, a tiny random model folder and small training / dev files."""

from __future__ import annotations

import json

import pytest

from bidir_core.pytest_plugin import *  # noqa: F403 (the cache, hardware skips, embedded default: see there)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random bidir checkpoint folder (hidden 64, 2 layers)."""
    from bidir_core.testing import tiny_encoder

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_encoder().save_pretrained(folder)
    return folder


TOPICS = ["sort", "parse", "open", "join", "split", "read", "write", "copy", "hash", "send", "load", "walk"]


@pytest.fixture(scope="session")
def train_jsonl(tmp_path_factory):
    """24 NeMo-style rows: query, one positive, three hard negatives."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = []
    for i in range(24):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "query": f"how do i {topic} item {i}",
                "pos_doc": f"{topic} returns the {topic}ed value of item {i}",
                "neg_doc": [f"{TOPICS[(i + k) % len(TOPICS)]} something else {i} {k}" for k in (1, 2, 3)],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
