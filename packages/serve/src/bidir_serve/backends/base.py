"""What every backend shares: the Backend interface (embedders) and the Scorer interface (rerankers), the padded input
form, and the fingerprints of the model a backend runs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bidir_core.artifacts import MANIFEST, checkpoint_fingerprint
from bidir_core.batching import pad_batch
from bidir_core.checkpoint import EMBEDDER, EncoderConfig
from bidir_core.errors import BidirError
from bidir_core.reranker_config import RerankerConfig


class Backend(Protocol):
    """A model that embeds batches of token rows, in two steps: prepare(rows) builds the backend's own input form
    on the host, embed(inputs) runs the model on it.

    The callers hand a batch around as token rows (a list of token-id lists, already length-sorted and cut to a
    token budget by bidir_core.batching) and never pad: which form the model wants (one packed stream for the torch
    backend, right-padded (B, T) tensors for compiled torch and the exported graphs) and whether it is pinned (the
    backend copies it to a GPU) is the backend's business, so no caller pads what the backend would strip again.

    The split is where the threads are: batch-embed's producer thread calls prepare() for each batch of a window
    ahead of the model (padding, packing and pinning are host work that would otherwise stall the GPU between
    batches), and the consumer calls embed() only; the server's model thread calls both in turn. prepare() touches
    no model state, so it is safe on another thread while embed() runs."""

    kind: str
    """"embedder" (bidir_core.sources.MODEL_KINDS; a Scorer's is "reranker")."""
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
    max_padding: float | None
    """The most of a batch's padded tokens that may be padding (bidir_core.batching's max_padding), which the
    callers cut their batches by: padded_max_padding() for a backend that pads, None for one that packs."""
    fingerprint: str
    """sha256 of the model's weights and settings (changes when the model does)."""
    source_fingerprint: str
    """checkpoint_fingerprint() of the checkpoint the model is (torch) or was exported from (an export records it):
    what bidir-eval compares with the model it evaluates."""

    def prepare(self, rows: Sequence[Sequence[int]]) -> Any:
        """B token rows (none longer than config.max_length) -> this backend's input for them, on the host."""
        ...

    def embed(self, inputs: Any) -> np.ndarray:
        """What prepare() returned -> the rows' embeddings (B, dim) float32, in the rows' order."""
        ...


class Scorer(Protocol):
    """A reranker that scores batches of token rows, each row one (query, passage) pair formatted and tokenized by
    bidir_core.reranker_config.tokenize_pairs (the template is applied there, never by a backend). Two steps as
    Backend's, on the same threads: prepare(rows) builds the input form on the host, score(inputs) runs the model.
    A scorer has no `dim`: asking for it is a one-line BidirError."""

    kind: str
    """"reranker"."""
    name: str
    """torch, onnxruntime or tensorrt."""
    precision: str
    """Compute dtype (fp32, bf16, fp16) of the decoder; the pooling, head and score are fp32 whatever it is."""
    description: str
    """What runs, for logs, e.g. "torch cpu fp32 reranker"."""
    config: RerankerConfig
    """The template, pooling, temperature and max_length the model was trained and exported with."""
    max_padding: float | None
    """As Backend's."""
    tokenizer: object
    fingerprint: str
    source_fingerprint: str

    def prepare(self, rows: Sequence[Sequence[int]]) -> Any:
        """B pair rows (none longer than config.max_length) -> this backend's input for them, on the host."""
        ...

    def score(self, inputs: Any) -> np.ndarray:
        """What prepare() returned -> (B,) float32: each pair's raw logit (divided by the temperature, no sigmoid),
        in the rows' order."""
        ...


def backend_kind(backend: Backend | Scorer) -> str:
    """What a loaded backend serves: its `kind`, "embedder" for a backend class that does not say (every embedder
    backend was one before scorers came, as a manifest without a kind is an embedder's)."""
    return getattr(backend, "kind", EMBEDDER)


def no_dim(description: str) -> BidirError:
    """The error of asking a scorer for `dim`."""
    return BidirError(f"{description}: a reranker has no embedding dim; it scores (query, passage) pairs")


@dataclass(frozen=True)
class Padded:
    """Token rows as the exported graphs take them: right-padded with the tokenizer's pad id."""

    input_ids: torch.Tensor  # (B, T) int64, T the longest row (at least 1)
    attention_mask: torch.Tensor  # (B, T) int64: 1 on real tokens, 0 on padding


CPU_MAX_PADDING = 0.25
"""A padded batch on CPU is at most this much padding. A CPU's cost is linear in padded tokens and a small batch
loses little (the embedded default on onnxruntime CPU: a server of 1-text requests, each its own unpadded batch, ran
faster than batch-embed's 128-row batches), so rows of unlike lengths are better run apart; the server's batches mix
concurrent requests in arrival order, which is where this matters (benchmarks/README.md, Embedding server)."""


def padded_max_padding(device: str) -> float | None:
    """max_padding for a backend that pads on `device` ("cpu", "cuda"): bounded on CPU; on a GPU, where a bigger
    batch is worth some padding, not bounded (not measured there yet)."""
    return CPU_MAX_PADDING if device == "cpu" else None


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, pin: bool = False) -> Padded:
    """Right-pad `rows`; pinned (page-locked) when `pin`, so the copy to a GPU can be asynchronous."""
    input_ids, mask = pad_batch(rows, pad_id)
    if pin:
        input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
    return Padded(input_ids, mask)


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
