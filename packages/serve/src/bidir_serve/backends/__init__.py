"""Backends: one interface, `embed(prepare(token rows)) -> (B, D) float32 numpy` (each backend builds its own input
form from the rows: see base.Backend), over three runtimes, and the one factory that picks among them. A reranker is
served by a Scorer (base.Scorer: `score(prepare(pair rows)) -> (B,) float32` raw logits), which load_backend returns
for a reranker model: TorchScorer (pytorch_scorer.py) for a checkpoint whose kind is "reranker".

- `torch`:       a checkpoint (folder, .gguf or the embedded default's name) through bidir_core.BiEncoder, on CPU or
                 CUDA, fp32 / bf16 / fp16, optionally torch.compile'd (pytorch.py).
- `onnxruntime`: an ONNX export folder (bidir_core.artifacts manifest), CPU, CUDA or TensorRT execution provider
                 (onnxruntime.py).
- `tensorrt`:    a TensorRT engine folder (tensorrt.py).

base.py holds what they share (the Backend protocol, the padded input form, the model fingerprints); the runtime
modules import only base, and only this module and spec.py (BackendSpec: the torch backend's precision names) import
them.

`auto` picks by artifact and hardware: an engine folder -> tensorrt; an ONNX export -> onnxruntime (the CUDA
execution provider when onnxruntime has it and a GPU is present, else CPU); a checkpoint -> torch, bf16 on CUDA when
a GPU is present, else fp32 on CPU (bf16 on CPUs without bf16 units is slow, and fp32 keeps CPU results exact).

Every backend takes `dim` (Matryoshka truncation, re-normalized when the model normalizes) at construction, so
embed() always returns (B, dim or hidden_size).

A reranker's export (manifest kind "reranker") loads as a scorer instead: OnnxRuntimeScorer or TensorRTScorer,
score(prepare(rows)) -> (B,) float32 logits; it has no `dim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bidir_core.artifacts import EngineManifest, OnnxManifest, find_manifest
from bidir_core.errors import BidirError
from bidir_core.folders import interrupted_publish_hint
from bidir_core.reranker_config import RERANKER
from bidir_core.sources import open_source
from bidir_serve.backends.base import (
    Backend,
    Padded,
    Scorer,
    backend_kind,
    export_fingerprint,
    model_fingerprint,
)
from bidir_serve.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeScorer
from bidir_serve.backends.pytorch import PRECISIONS, TorchBackend
from bidir_serve.backends.pytorch_scorer import TorchScorer
from bidir_serve.backends.spec import BACKENDS, BackendSpec
from bidir_serve.backends.tensorrt import TensorRTBackend, TensorRTScorer

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendSpec",
    "ModelKind",
    "OnnxRuntimeBackend",
    "OnnxRuntimeScorer",
    "Padded",
    "Scorer",
    "TensorRTBackend",
    "TensorRTScorer",
    "TorchBackend",
    "TorchScorer",
    "auto_backend",
    "backend_kind",
    "export_fingerprint",
    "load_backend",
    "model_fingerprint",
    "model_kind",
]


@dataclass(frozen=True)
class ModelKind:
    kind: str
    """checkpoint, onnx or tensorrt."""
    manifest: OnnxManifest | EngineManifest | None = None


def model_kind(model: str | Path) -> ModelKind:
    """What a --model argument names: an export folder (by its manifest.json) or a checkpoint."""
    manifest = find_manifest(model)
    if manifest is None:
        return ModelKind("checkpoint")
    return ModelKind("onnx" if isinstance(manifest, OnnxManifest) else "tensorrt", manifest)


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
    spec: BackendSpec | str | Path,
    backend: str = "auto",
    *,
    dim: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    providers: list[str] | None = None,
) -> Backend | Scorer:
    """The backend `spec` describes (a checkpoint, an ONNX export folder or an engine folder), its output cut to `dim`
    columns when given; a Scorer when the model is a reranker (a checkpoint, or an export or engine folder whose
    manifest says so; then `dim` must be None). A model in place of a spec
    is the spec of that model and the settings given with it: load_backend("./ckpt", "torch", device="cpu") is
    load_backend(BackendSpec("./ckpt", "torch", device="cpu"))."""
    if not isinstance(spec, BackendSpec):
        spec = BackendSpec(spec, backend, device, precision, compile)
    elif (backend, device, precision, compile) != ("auto", None, None, False):
        raise TypeError("load_backend: a BackendSpec holds backend, device, precision and compile; not both")
    model, device = spec.model, spec.device
    found = model_kind(model)
    kind = found.kind
    name = auto_backend(kind) if spec.backend == "auto" else spec.backend
    if _NEEDS[name] != kind:
        if not Path(model).expanduser().exists():  # not "a checkpoint" either: nothing is there
            raise BidirError(
                f"{model}: no such folder (the {name} backend needs {_WHAT[_NEEDS[name]]})"
                + interrupted_publish_hint(model)
            )
        raise BidirError(f"{model}: the {name} backend needs {_WHAT[_NEEDS[name]]}, this is {_WHAT[kind]}")
    # The model's kind: a checkpoint's from its source, an export's or engine's from its manifest.
    source = open_source(model) if kind == "checkpoint" else None
    reranker = (source.kind if source is not None else found.manifest.kind) == RERANKER
    if reranker and dim is not None:
        raise BidirError(
            f"{model}: a reranker gives one score per pair, it has no embedding dim to cut (dim={dim})"
        )
    if name == "torch":
        if reranker:
            return TorchScorer(source, device=device, precision=spec.precision, compile=spec.compile)
        return TorchBackend(model, device=device, precision=spec.precision, compile=spec.compile, dim=dim)
    if name == "onnxruntime":
        if device == "cuda" and providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu" and providers is None:
            providers = ["CPUExecutionProvider"]
        if reranker:
            return OnnxRuntimeScorer(model, providers=providers)
        return OnnxRuntimeBackend(model, providers=providers, dim=dim)
    return TensorRTScorer(model) if reranker else TensorRTBackend(model, dim=dim)
