"""The onnxruntime backend: an ONNX export folder (bidir_core.artifacts manifest) on the CPU, CUDA or TensorRT
execution provider."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bidir_core.artifacts import OnnxManifest, read_manifest
from bidir_core.errors import BidirError, one_line
from bidir_core.matryoshka import check_dim, truncate_array
from bidir_core.tokenization import load_tokenizer
from bidir_serve.backends.base import Padded, export_fingerprint, pad_rows


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, folder: str | Path, providers: list[str] | None = None, dim: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest: OnnxManifest = read_manifest(folder, "onnx")
        available = ort.get_available_providers()
        if providers is None:
            use_cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
            providers = ["CUDAExecutionProvider"] * use_cuda + ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BidirError(f"onnxruntime has no {missing[0]} here (available: {', '.join(available)})")
        model_file = folder / self.manifest.model_file
        try:
            self.session = ort.InferenceSession(str(model_file), providers=providers)
        # a truncated or garbled model.onnx: onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        except Exception as e:
            raise BidirError(f"{model_file}: onnxruntime cannot load it ({one_line(e)})") from None
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
