"""BackendSpec: which backend runs which model, and where; the one description of a backend that batch-embed's and
the server's configs hold and load_backend takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bidir_core.errors import BidirError
from bidir_serve.backends.pytorch import PRECISIONS

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendSpec:
    """A backend to load, each setting checked here."""

    model: str | Path
    """A checkpoint folder, a .gguf file, the embedded default 'smollm2-135m', an ONNX export or an engine folder."""
    backend: str = "auto"
    """auto, torch, onnxruntime or tensorrt (auto: see bidir_serve.backends)."""
    device: str | None = None
    """cpu or cuda (None: cuda when available)."""
    precision: str | None = None
    """torch backend compute dtype: fp32, bf16 or fp16 (None: bf16 on CUDA, fp32 on CPU)."""
    compile: bool = False
    """torch backend: torch.compile the model (dynamic shapes)."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BidirError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BidirError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
