"""What every backend shares: the Backend interface and the fingerprints of the model a backend runs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from bidir_core.artifacts import MANIFEST, checkpoint_fingerprint
from bidir_core.checkpoint import EncoderConfig


class Backend(Protocol):
    name: str
    """torch, onnxruntime or tensorrt."""
    precision: str
    """Compute dtype (fp32, bf16, fp16): part of the job fingerprint, as it changes the embeddings."""
    description: str
    """What runs, for logs and the manifest, e.g. "torch cpu fp32" or "onnxruntime CPUExecutionProvider fp32"."""
    config: EncoderConfig
    tokenizer: object
    dim: int
    """Width of embed()'s output."""
    width: int
    """The model's full embedding width (dim is it, or the Matryoshka width asked for)."""
    fingerprint: str
    """sha256 of the model's weights and settings (changes when the model does)."""
    source_fingerprint: str
    """checkpoint_fingerprint() of the checkpoint the model is (torch) or was exported from (an export records it):
    what bidir-eval compares with the model it evaluates."""
    pin_memory: bool
    """Whether inputs should be pinned (the backend copies them to a GPU)."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """input_ids, attention_mask (B, T) int64 on CPU -> embeddings (B, dim) float32."""
        ...


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def model_fingerprint(source: Path) -> str:
    """A checkpoint folder's weights + settings, or a .gguf file's bytes."""
    return checkpoint_fingerprint(source) if source.is_dir() else _sha256_file(source)


def export_fingerprint(folder: Path) -> str:
    """An export's manifest names its source checkpoint's fingerprint, dtype, inputs and settings."""
    return _sha256_file(folder / MANIFEST)
