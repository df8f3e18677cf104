"""The tensorrt backends: run an engine folder written by export-trt (bidir_core.artifacts.EngineManifest): an
embedder's (TensorRTBackend, `embeddings`) or a reranker's (TensorRTScorer, `scores`); both through Engine.

TensorRT *running* lives here only (building is bidir-export's). Written against the TensorRT 10/11 Python runtime
API: tensors are bound by name with set_input_shape / set_tensor_address on torch CUDA buffers, and execute_async_v3
runs on a torch CUDA stream. The engine has one or more optimization profiles, each a (batch, seq) range; a batch
runs under the first profile that fits it, and a batch larger than every profile's maximum is split into chunks
(rows are independent, so splitting does not change any embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bidir_core.artifacts import EngineManifest, Profile, read_manifest
from bidir_core.errors import BidirError
from bidir_core.matryoshka import check_dim, truncate_array
from bidir_core.reranker_config import RERANKER, RerankerConfig
from bidir_core.sources import EMBEDDER
from bidir_core.tokenization import load_tokenizer
from bidir_serve.backends.base import Padded, export_fingerprint, no_dim, pad_rows, padded_max_padding


def plan(profiles: tuple[Profile, ...], batch: int, seq: int) -> tuple[int, int]:
    """(profile index, rows per run) for a (batch, seq) input: the first profile that fits it whole; else, among
    the profiles that take `seq`, the one with the largest batch, the input split into runs of that many rows. A
    `seq` below every profile's minimum takes the profile with the smallest minimum (embed pads up to it)."""
    fitting = [i for i, p in enumerate(profiles) if p.fits(batch, seq)]
    if fitting:
        return fitting[0], batch
    by_seq = [i for i, p in enumerate(profiles) if p.min[1] <= seq <= p.max[1]]
    if not by_seq:
        if seq > max(p.max[1] for p in profiles):
            raise BidirError(f"sequence length {seq} is longer than every engine profile's maximum")
        by_seq = [min(range(len(profiles)), key=lambda i: profiles[i].min[1])]
    best = max(by_seq, key=lambda i: profiles[i].max[0])
    return best, profiles[best].max[0]


class Engine:
    """An engine folder loaded on this GPU: the manifest (of the given model kind), the execution context, and run()
    over its profiles. What the two backends share."""

    def __init__(self, folder: Path, kind: str):
        try:
            import tensorrt as trt
        except ImportError:
            raise BidirError(
                "the tensorrt backend needs the tensorrt package (pip install tensorrt)"
            ) from None
        if not torch.cuda.is_available():
            raise BidirError("the tensorrt backend needs a CUDA GPU")
        self.manifest: EngineManifest = read_manifest(folder, "tensorrt")
        if self.manifest.kind != kind:
            raise BidirError(
                f"{folder}: the engine's model is kind {self.manifest.kind}; this tensorrt backend runs kind {kind} "
                "(load_backend picks by kind)"
            )
        here = "{}.{}".format(*torch.cuda.get_device_capability())
        if here != self.manifest.compute_capability:
            raise BidirError(
                f"{folder}: the engine was built for compute capability {self.manifest.compute_capability} "
                f"({self.manifest.gpu_name}); this GPU is {here} ({torch.cuda.get_device_name()}): rebuild it here"
            )
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((folder / self.manifest.engine_file).read_bytes())
        if self.engine is None:
            raise BidirError(
                f"{folder}: TensorRT {trt.__version__} cannot load this engine "
                f"(built with TensorRT {self.manifest.tensorrt_version}): rebuild it with export-trt"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._active_profile = -1
        self.description = f"tensorrt {trt.__version__} {self.manifest.precision}"
        self.max_seq = max(p.max[1] for p in self.manifest.profiles)
        max_length = self.manifest.onnx.settings.max_length
        if max_length > self.max_seq:
            raise BidirError(
                f"{folder}: texts may have up to max_length={max_length} tokens but the engine's "
                f"profiles stop at {self.max_seq}: rebuild it with a longer profile"
            )

    def run(self, inputs: Padded, dim: int | None = None) -> torch.Tensor:
        """Padded rows -> the engine's output for them on the GPU, (B, hidden_size) or (B,) float32; dim feeds the
        `dimensions` input of an engine that has it. Split into runs by plan(), padded up to a profile's minimum."""
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        B, T = input_ids.shape
        profile, rows = plan(self.manifest.profiles, B, T)
        min_batch, min_seq = self.manifest.profiles[profile].min
        if min_seq > T:  # pad columns are masked out, so they change nothing
            input_ids = torch.nn.functional.pad(input_ids, (0, min_seq - T))
            attention_mask = torch.nn.functional.pad(attention_mask, (0, min_seq - T))
        out = [
            self._run(profile, input_ids[i : i + rows], attention_mask[i : i + rows], min_batch, dim)
            for i in range(0, B, rows)
        ]
        return torch.cat(out)

    def _run(
        self, profile: int, ids: torch.Tensor, mask: torch.Tensor, min_batch: int, dim: int | None
    ) -> torch.Tensor:
        b = ids.shape[0]
        if b < min_batch:  # repeat the last row to the profile's minimum batch; the extra outputs are dropped
            extra = min_batch - b
            ids = torch.cat([ids, ids[-1:].expand(extra, -1)])
            mask = torch.cat([mask, mask[-1:].expand(extra, -1)])
        onnx = self.manifest.onnx
        with torch.cuda.stream(self.stream):
            handle = self.stream.cuda_stream
            if profile != self._active_profile:
                self.context.set_optimization_profile_async(profile, handle)
                self._active_profile = profile
            tensors = {
                "input_ids": ids.to("cuda", non_blocking=True).contiguous(),
                "attention_mask": mask.to("cuda", non_blocking=True).contiguous(),
            }
            if onnx.with_dims:
                tensors["dimensions"] = torch.full((ids.shape[0],), dim, dtype=torch.long, device="cuda")
            # (B, H) embeddings, or a reranker's (B,) scores
            width = () if onnx.kind == RERANKER else (onnx.hidden_size,)
            out = torch.empty((ids.shape[0], *width), dtype=torch.float32, device="cuda")
            for name, tensor in tensors.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            self.context.set_tensor_address(onnx.output, out.data_ptr())
            if not self.context.execute_async_v3(handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return out[:b]


class TensorRTBackend:
    name = "tensorrt"
    kind = EMBEDDER
    max_padding = padded_max_padding("cuda")

    def __init__(self, folder: str | Path, dim: int | None = None):
        folder = Path(folder)
        self._engine = Engine(folder, EMBEDDER)
        self.manifest = self._engine.manifest
        onnx = self.manifest.onnx
        self.config = onnx.encoder
        self.tokenizer = load_tokenizer(folder)
        self.width = onnx.hidden_size
        self.dim = check_dim(dim, self.width)
        self.fingerprint = export_fingerprint(folder)
        self.source_fingerprint = onnx.source_fingerprint
        self.precision = self.manifest.precision
        self.description = self._engine.description
        self.max_seq = self._engine.max_seq

    def prepare(self, rows: Sequence[Sequence[int]]) -> Padded:
        """The rows right-padded (B, T) and pinned, so the engine's copies to the GPU are asynchronous."""
        return pad_rows(rows, self.tokenizer.pad_token_id, pin=True)

    @torch.inference_mode()
    def embed(self, inputs: Padded) -> np.ndarray:
        emb = self._engine.run(inputs, self.dim).cpu().numpy()  # (B, hidden_size)
        return truncate_array(emb, self.dim, self.config.normalize)


class TensorRTScorer:
    """A reranker's engine (manifest kind "reranker"): token rows of formatted pairs -> relevance logits (B,)
    float32, temperature applied, no sigmoid. The rows come from the pair tokenization with self.config."""

    name = "tensorrt"
    kind = RERANKER
    max_padding = padded_max_padding("cuda")

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self._engine = Engine(folder, RERANKER)
        self.manifest = self._engine.manifest
        onnx = self.manifest.onnx
        self.config: RerankerConfig = onnx.reranker
        self.tokenizer = load_tokenizer(folder)
        self.fingerprint = export_fingerprint(folder)
        self.source_fingerprint = onnx.source_fingerprint
        self.precision = self.manifest.precision
        self.description = self._engine.description + " reranker"
        self.max_seq = self._engine.max_seq

    @property
    def dim(self) -> int:
        raise no_dim(self.description)

    def prepare(self, rows: Sequence[Sequence[int]]) -> Padded:
        """The rows right-padded (B, T) and pinned, so the engine's copies to the GPU are asynchronous."""
        return pad_rows(rows, self.tokenizer.pad_token_id, pin=True)

    @torch.inference_mode()
    def score(self, inputs: Padded) -> np.ndarray:
        return self._engine.run(inputs).cpu().numpy()  # (B,) float32
