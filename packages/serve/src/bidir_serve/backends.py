"""Backends: one interface, `embed(input_ids, attention_mask) -> (B, D) float32 numpy`, over three runtimes.

- `torch`:       a checkpoint (folder, .gguf or the embedded default's name) through bidir_core.BiEncoder, on CPU or
                 CUDA, fp32 / bf16 / fp16, optionally torch.compile'd.
- `onnxruntime`: an ONNX export folder (bidir_core.artifacts manifest), CPU, CUDA or TensorRT execution provider.
- `tensorrt`:    a TensorRT engine folder (tensorrt_backend.py).

`auto` picks by artifact and hardware: an engine folder -> tensorrt; an ONNX export -> onnxruntime (the CUDA
execution provider when onnxruntime has it and a GPU is present, else CPU); a checkpoint -> torch, bf16 on CUDA when
a GPU is present, else fp32 on CPU (bf16 on CPUs without bf16 units is slow, and fp32 keeps CPU results exact).

Every backend takes `dim` (Matryoshka truncation, re-normalized when the model normalizes) at construction, so
embed() always returns (B, dim or hidden_size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from bidir_core.artifacts import MANIFEST, EngineManifest, OnnxManifest, checkpoint_fingerprint, read_manifest
from bidir_core.checkpoint import EncoderConfig
from bidir_core.errors import BidirError, one_line
from bidir_core.sources import resolve_source
from bidir_core.tokenization import load_tokenizer

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def truncate(emb: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """(B, H) -> (B, dim): a Matryoshka prefix, re-normalized when the model normalizes."""
    if dim == emb.shape[1]:
        return emb
    emb = emb[:, :dim]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(emb, dtype=np.float32)


def check_dim(dim: int | None, hidden_size: int) -> int:
    if dim is None:
        return hidden_size
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise BidirError(f"dim must be a positive integer, got {dim!r}")
    if dim > hidden_size:
        raise BidirError(f"dim={dim} is larger than the model's embedding size {hidden_size}")
    return dim


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        model: str | Path,
        device: str | None = None,
        precision: str | None = None,
        compile: bool = False,
        dim: int | None = None,
    ):
        from bidir_core.encoder import BiEncoder

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise BidirError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        source = resolve_source(model)
        self.encoder = BiEncoder.from_pretrained(
            source, dtype=PRECISIONS[precision], device=self.device
        ).eval()
        self.config, self.tokenizer = self.encoder.config, self.encoder.tokenizer
        self.dim = check_dim(dim, self.encoder.hidden_size)
        self.fingerprint = self.source_fingerprint = model_fingerprint(source)
        self.pin_memory = self.device.type == "cuda"
        self.precision = precision
        self.description = f"torch {self.device.type} {precision}" + (" compiled" if compile else "")
        # dynamic=True: one graph for every (batch, seq) instead of a recompile per new shape.
        self._forward = torch.compile(self.encoder, dynamic=True) if compile else self.encoder

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        # non_blocking: with pinned inputs the host-to-device copy overlaps the previous batch's work.
        ids = input_ids.to(self.device, non_blocking=True)
        mask = attention_mask.to(self.device, non_blocking=True)
        dim = None if self.dim == self.encoder.hidden_size else self.dim
        return self._forward(ids, mask, dim=dim).float().cpu().numpy()  # (B, dim)


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
        self.dim = check_dim(dim, self.manifest.hidden_size)
        self.fingerprint = export_fingerprint(folder)
        self.source_fingerprint = self.manifest.source_fingerprint
        self.pin_memory = False  # onnxruntime reads numpy arrays from host memory
        self.precision = self.manifest.dtype
        self.description = f"onnxruntime {self.session.get_providers()[0]} {self.manifest.dtype}"

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if self.manifest.with_dims:
            # The graph's per-row Matryoshka input; the slice below makes the output (B, dim) either way.
            feeds["dimensions"] = np.full((input_ids.shape[0],), self.dim, dtype=np.int64)
        (emb,) = self.session.run([self.manifest.output], feeds)  # (B, hidden_size) float32
        return truncate(np.asarray(emb, dtype=np.float32), self.dim, self.config.normalize)


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


@dataclass(frozen=True)
class ModelKind:
    kind: str
    """checkpoint, onnx or tensorrt."""
    manifest: OnnxManifest | EngineManifest | None = None


def model_kind(model: str | Path) -> ModelKind:
    """What a --model argument names: an export folder (by its manifest.json) or a checkpoint."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        return ModelKind("onnx" if isinstance(manifest, OnnxManifest) else "tensorrt", manifest)
    return ModelKind("checkpoint")


def auto_backend(kind: str) -> str:
    """The rule of `auto` (see the module docstring)."""
    return {"tensorrt": "tensorrt", "onnx": "onnxruntime", "checkpoint": "torch"}[kind]


_NEEDS = {"torch": "checkpoint", "onnxruntime": "onnx", "tensorrt": "tensorrt"}
_WHAT = {
    "checkpoint": "a checkpoint",
    "onnx": "an ONNX export folder",
    "tensorrt": "a TensorRT engine folder",
}


def load_backend(
    model: str | Path,
    backend: str = "auto",
    *,
    dim: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    providers: list[str] | None = None,
) -> Backend:
    """The backend for `model` (a checkpoint, an ONNX export folder or an engine folder)."""
    if backend not in BACKENDS:
        raise BidirError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kind = model_kind(model).kind
    name = auto_backend(kind) if backend == "auto" else backend
    if _NEEDS[name] != kind:
        if not Path(model).expanduser().exists():  # not "a checkpoint" either: nothing is there
            raise BidirError(f"{model}: no such folder (the {name} backend needs {_WHAT[_NEEDS[name]]})")
        raise BidirError(f"{model}: the {name} backend needs {_WHAT[_NEEDS[name]]}, this is {_WHAT[kind]}")
    if name == "torch":
        return TorchBackend(model, device=device, precision=precision, compile=compile, dim=dim)
    if name == "onnxruntime":
        if device == "cuda" and providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu" and providers is None:
            providers = ["CPUExecutionProvider"]
        return OnnxRuntimeBackend(model, providers=providers, dim=dim)
    from bidir_serve.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(model, dim=dim)
