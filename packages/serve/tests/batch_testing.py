"""Helpers of the batch-embed tests: a JSONL corpus, numbered texts, and a job run on them."""

from __future__ import annotations

import json
from pathlib import Path

from bidir_serve import BatchEmbedConfig, embed_corpus


def write_jsonl(path: Path, texts, ids=None) -> Path:
    """texts as JSONL rows {"id": ..., "text": ...}; ids default to "doc-<i>"."""
    ids = ids or [f"doc-{i}" for i in range(len(texts))]
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True)))
    return path


def embed(model, inp, out, **kw):
    """embed_corpus of model on inp into out (no progress bar); kw: further BatchEmbedConfig fields."""
    return embed_corpus(BatchEmbedConfig(str(model), str(inp), str(out), progress=False, **kw))


def numbered_texts(n):
    return [f"text number {i} about dense search" for i in range(n)]
