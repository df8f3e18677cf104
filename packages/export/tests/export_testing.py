"""Helpers for the bidir-export tests: onnxruntime on an export folder, padded input batches, and the hidden
(temporary) names a failed write may leave beside its target."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from bidir_core.reranker_config import RerankerConfig

SMALL_VERIFY = (3, 40)  # keeps the export's own verification quick on the tiny model
RERANKER_CONFIG = RerankerConfig(temperature=0.5, max_length=64)
"""The tiny reranker's settings (conftest's tiny_reranker); here, not in conftest, which a test importing it would
get another package's of when several packages' tests run in one pytest."""


def leftovers(folder: Path) -> list[str]:
    """The hidden names in folder: temporary folders a write left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@functools.lru_cache(maxsize=8)
def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(folder: Path, input_ids, attention_mask, dimensions=None) -> torch.Tensor:
    """The exported graph on onnxruntime CPU: (B, H) float32 as a torch tensor."""
    session = _session(str(folder / "model.onnx"))
    feeds = {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask)}
    if dimensions is not None:
        feeds["dimensions"] = np.asarray(dimensions)
    (out,) = session.run(["embeddings"], feeds)
    assert out.dtype == np.float32
    return torch.from_numpy(out)


def padded_inputs(vocab: int, batch: int, seq: int, side: str, seed: int = 1):
    """(input_ids, attention_mask) int64: row 0 full, then shorter rows, the last (if B > 1) a single token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    step = seq // max(batch - 1, 1)
    for row in range(batch):
        n = seq if row == 0 else 1 if row == batch - 1 else max(1, seq - row * step)
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n :] = 1
    return ids * mask, mask
