"""The onnxruntime backends: an ONNX export folder (bidir_core.artifacts manifest) on the CPU, CUDA or TensorRT
execution provider. OnnxRuntimeBackend runs an embedder's export (`embeddings`), OnnxRuntimeScorer a reranker's
(`scores`: pooling, head and temperature are in the graph, so scoring is one session run on padded rows)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bidir_core.artifacts import OnnxManifest, read_manifest
from bidir_core.errors import BidirError, one_line
from bidir_core.matryoshka import check_dim, truncate_array
from bidir_core.reranker_config import RERANKER, RerankerConfig
from bidir_core.sources import EMBEDDER
from bidir_core.tokenization import load_tokenizer
from bidir_serve.backends.base import Padded, export_fingerprint, no_dim, pad_rows, padded_max_padding


def _open(folder: Path, kind: str, providers: list[str] | None):
    """(manifest, session) of the ONNX export at folder, which must hold a model of kind (embedder / reranker)."""
    import onnxruntime as ort

    manifest: OnnxManifest = read_manifest(folder, "onnx")
    if manifest.kind != kind:
        role = "scorer" if kind == RERANKER else "embedding backend"
        raise BidirError(
            f"{folder}: the export's model is kind {manifest.kind}; the onnxruntime {role} runs kind {kind} "
            "(load_backend picks by kind)"
        )
    available = ort.get_available_providers()
    if providers is None:
        use_cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
        providers = ["CUDAExecutionProvider"] * use_cuda + ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    if missing:
        raise BidirError(f"onnxruntime has no {missing[0]} here (available: {', '.join(available)})")
    model_file = folder / manifest.model_file
    try:
        session = ort.InferenceSession(str(model_file), providers=providers)
    # a truncated or garbled model.onnx: onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
    except Exception as e:
        raise BidirError(f"{model_file}: onnxruntime cannot load it ({one_line(e)})") from None
    return manifest, session


def _max_padding(session) -> float | None:
    """Padded batches: bounded padding when the session runs on the CPU provider."""
    return padded_max_padding("cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda")


class OnnxRuntimeBackend:
    name = "onnxruntime"
    kind = EMBEDDER

    def __init__(self, folder: str | Path, providers: list[str] | None = None, dim: int | None = None):
        folder = Path(folder)
        self.manifest, self.session = _open(folder, EMBEDDER, providers)
        self.max_padding = _max_padding(self.session)
        self.config = self.manifest.encoder
        self.tokenizer = load_tokenizer(folder)
        self.width = self.manifest.hidden_size
        self.dim = check_dim(dim, self.width)
        self.fingerprint = export_fingerprint(folder)
        self.source_fingerprint = self.manifest.source_fingerprint
        self.precision = self.manifest.dtype
        self.description = f"onnxruntime {self.session.get_providers()[0]} {self.manifest.dtype}"

    def prepare(self, rows: Sequence[Sequence[int]]) -> Padded:
        """The rows right-padded (B, T), unpinned: onnxruntime reads numpy arrays from host memory (and copies
        them to a GPU itself under the CUDA provider)."""
        return pad_rows(rows, self.tokenizer.pad_token_id)

    def embed(self, inputs: Padded) -> np.ndarray:
        feeds = {"input_ids": inputs.input_ids.numpy(), "attention_mask": inputs.attention_mask.numpy()}
        if self.manifest.with_dims:
            # The graph's per-row Matryoshka input; the slice below makes the output (B, dim) either way.
            feeds["dimensions"] = np.full((inputs.input_ids.shape[0],), self.dim, dtype=np.int64)
        (emb,) = self.session.run([self.manifest.output], feeds)  # (B, hidden_size) float32
        return truncate_array(np.asarray(emb, dtype=np.float32), self.dim, self.config.normalize)


class OnnxRuntimeScorer:
    """A reranker's ONNX export (manifest kind "reranker"): token rows of formatted pairs -> relevance logits.

    The rows come from the pair tokenization with self.config (the template the export carries), as for every
    scorer; score() returns the raw logits (temperature applied, no sigmoid)."""

    name = "onnxruntime"
    kind = RERANKER

    def __init__(self, folder: str | Path, providers: list[str] | None = None):
        folder = Path(folder)
        self.manifest, self.session = _open(folder, RERANKER, providers)
        self.max_padding = _max_padding(self.session)
        self.config: RerankerConfig = self.manifest.reranker
        self.tokenizer = load_tokenizer(folder)
        self.fingerprint = export_fingerprint(folder)
        self.source_fingerprint = self.manifest.source_fingerprint
        self.precision = self.manifest.dtype
        self.description = f"onnxruntime {self.session.get_providers()[0]} {self.manifest.dtype} reranker"

    @property
    def dim(self) -> int:
        raise no_dim(self.description)

    def prepare(self, rows: Sequence[Sequence[int]]) -> Padded:
        """The rows right-padded (B, T) on the host (onnxruntime copies them to a GPU itself)."""
        return pad_rows(rows, self.tokenizer.pad_token_id)

    def score(self, inputs: Padded) -> np.ndarray:
        feeds = {"input_ids": inputs.input_ids.numpy(), "attention_mask": inputs.attention_mask.numpy()}
        (scores,) = self.session.run([self.manifest.output], feeds)  # (B,) float32
        return np.asarray(scores, dtype=np.float32)
