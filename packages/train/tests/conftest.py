"""Shared fixtures: an isolated model cache, tiny random model folders (untied, and tied as MNTP reads its LM head),
a small training file, the process group of a test that builds the trainer's pieces itself, and a run stopped after
step 2 with the uninterrupted run it must resume into."""

from __future__ import annotations

import functools
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


@pytest.fixture(scope="session")
def tied_checkpoint(tmp_path_factory):
    """A tiny random checkpoint whose LM head is its input embeddings (as SmolLM2's)."""
    from bidir_core.testing import tiny_encoder

    folder = tmp_path_factory.mktemp("tied") / "model"
    tiny_encoder(tie_word_embeddings=True).save_pretrained(folder)
    return folder


@pytest.fixture
def device():
    """This process's training device, in a one-rank process group (made here unless one exists) that the test
    leaves as it found it."""
    import torch.distributed as dist

    from bidir_train.distributed import init_distributed

    created, device = init_distributed()
    yield device
    if created:
        dist.destroy_process_group()


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


@pytest.fixture(scope="session")
def tiny_args(tiny_checkpoint, train_jsonl):
    """train_testing.recipe_args on the tiny checkpoint and train.jsonl: tiny_args(out, *overrides)."""
    from train_testing import recipe_args

    return functools.partial(recipe_args, tiny_checkpoint, train_jsonl)


@pytest.fixture(scope="session")
def straight(tiny_args, tmp_path_factory):
    """4 uninterrupted RESUMABLE steps: the reference of a resumed run (test_train.py has its own, of 6 steps)."""
    from train_testing import RESUMABLE, train_recipe

    out = tmp_path_factory.mktemp("straight")
    train_recipe(tiny_args(out, *RESUMABLE))
    return out


@pytest.fixture
def stopped(tiny_checkpoint, train_jsonl, tmp_path):
    """A run stopped after step 2, checkpoints step-1 and step-2; returns (args to resume it, output_dir)."""
    from train_testing import stopped_run

    out = tmp_path / "run"
    args = stopped_run(tiny_checkpoint, train_jsonl, out, 2)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000001", "step-00000002"]
    return args, out
