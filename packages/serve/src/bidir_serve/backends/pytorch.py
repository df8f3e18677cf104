"""The torch backend: a checkpoint (folder, .gguf or the embedded default's name) through bidir_core.BiEncoder, on
CPU or CUDA, fp32 / bf16 / fp16, optionally torch.compile'd. (Not named torch.py, which would shadow torch.)

prepare() packs a batch's token rows (bidir_core.packed.pack: its tokens as one stream, no padding) where that is
the faster path (bidir_core.encoder.PACKED_DEFAULT, measured by benchmarks/bench_batch_embed.py), and right-pads
them when compiled (a packed batch's per-text lengths would make torch.compile specialize on every batch); on CUDA
either form is pinned, so embed()'s copy to the GPU is asynchronous."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bidir_core.checkpoint import EMBEDDER
from bidir_core.devices import default_device
from bidir_core.encoder import PACKED_DEFAULT, BiEncoder
from bidir_core.errors import BidirError
from bidir_core.matryoshka import check_dim
from bidir_core.packed import PackedBatch, pack
from bidir_core.sources import open_source
from bidir_serve.backends.base import Padded, model_fingerprint, pad_rows, padded_max_padding

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_and_precision(device: str | None, precision: str | None) -> tuple[torch.device, str]:
    """The torch backends' defaults: cuda when available, bf16 on CUDA and fp32 on CPU."""
    device = torch.device(device or default_device())
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise BidirError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return device, precision


def torch_inputs(
    rows: Sequence[Sequence[int]], packed: bool, pad_id: int, device: torch.device
) -> PackedBatch | Padded:
    """The rows packed (N real tokens, no padding) or right-padded (B, T), on the host; pinned for a CUDA device."""
    pin = device.type == "cuda"
    if not packed:
        return pad_rows(rows, pad_id, pin)
    batch = pack(rows)
    return batch.pin_memory() if pin else batch


class TorchBackend:
    kind = EMBEDDER
    name = "torch"

    def __init__(
        self,
        model: str | Path,
        device: str | None = None,
        precision: str | None = None,
        compile: bool = False,
        dim: int | None = None,
        packed: bool | None = None,
    ):
        self.device, precision = device_and_precision(device, precision)
        source = open_source(model)
        self.encoder = BiEncoder.from_pretrained(
            source, dtype=PRECISIONS[precision], device=self.device
        ).eval()
        self.config, self.tokenizer = self.encoder.config, self.encoder.tokenizer
        self.width = self.encoder.hidden_size
        self.dim = check_dim(dim, self.width)
        self.fingerprint = self.source_fingerprint = model_fingerprint(source.path)
        self.precision = precision
        self.description = f"torch {self.device.type} {precision}" + (" compiled" if compile else "")
        # dynamic=True: one graph for every (batch, seq) instead of a recompile per new shape.
        self._forward = torch.compile(self.encoder, dynamic=True) if compile else self.encoder
        self.packed = (PACKED_DEFAULT[self.device.type] and not compile) if packed is None else packed

    @property
    def max_padding(self) -> float | None:
        """None while the rows are packed; the padded form's bound otherwise (packed can be switched after load)."""
        return None if self.packed else padded_max_padding(self.device.type)

    def prepare(self, rows: Sequence[Sequence[int]]) -> PackedBatch | Padded:
        """The rows packed (N real tokens, no padding) or right-padded (B, T), on the host; pinned on CUDA."""
        return torch_inputs(rows, self.packed, self.tokenizer.pad_token_id, self.device)

    @torch.inference_mode()
    def embed(self, inputs: PackedBatch | Padded) -> np.ndarray:
        # non_blocking: with pinned inputs the host-to-device copy overlaps the previous batch's work.
        dim = None if self.dim == self.encoder.hidden_size else self.dim
        if isinstance(inputs, PackedBatch):
            return self._forward(inputs.to(self.device, non_blocking=True), dim=dim).float().cpu().numpy()
        ids = inputs.input_ids.to(self.device, non_blocking=True)
        mask = inputs.attention_mask.to(self.device, non_blocking=True)
        return self._forward(ids, mask, dim=dim).float().cpu().numpy()  # (B, dim)
