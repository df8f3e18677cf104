"""The torch scorer: a reranker checkpoint through bidir_core.CrossEncoder, under the torch backend's rules (CPU or
CUDA, fp32 / bf16 / fp16, optionally torch.compile'd; packed on CPU, right-padded when compiled, pinned on CUDA: see
pytorch.py).

score() returns the raw logits (B,) in float32: CrossEncoder.forward pools and applies the head in fp32 whatever the
decoder's precision, so a bf16 decoder never rounds the score itself (a sigmoid of a bf16 logit would saturate to
1.0 for any logit past ~5.5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bidir_core.cross_encoder import CrossEncoder
from bidir_core.encoder import PACKED_DEFAULT
from bidir_core.packed import PackedBatch
from bidir_core.reranker_config import RERANKER
from bidir_core.sources import ModelSource, open_source
from bidir_serve.backends.base import Padded, model_fingerprint, no_dim, padded_max_padding
from bidir_serve.backends.pytorch import PRECISIONS, device_and_precision, torch_inputs


class TorchScorer:
    kind = RERANKER
    name = "torch"

    def __init__(
        self,
        model: str | Path | ModelSource,
        device: str | None = None,
        precision: str | None = None,
        compile: bool = False,
        packed: bool | None = None,
    ):
        self.device, precision = device_and_precision(device, precision)
        source = open_source(model)
        self.reranker = CrossEncoder.from_pretrained(
            source, dtype=PRECISIONS[precision], device=self.device
        ).eval()
        self.config, self.tokenizer = self.reranker.config, self.reranker.tokenizer
        self.fingerprint = self.source_fingerprint = model_fingerprint(source.path)
        self.precision = precision
        self.description = (
            f"torch {self.device.type} {precision}" + (" compiled" if compile else "") + " reranker"
        )
        # dynamic=True: one graph for every (batch, seq) instead of a recompile per new shape.
        self._forward = torch.compile(self.reranker, dynamic=True) if compile else self.reranker
        self.packed = (PACKED_DEFAULT[self.device.type] and not compile) if packed is None else packed

    @property
    def dim(self) -> int:
        raise no_dim(self.description)

    @property
    def max_padding(self) -> float | None:
        """None while the rows are packed; the padded form's bound otherwise (packed can be switched after load)."""
        return None if self.packed else padded_max_padding(self.device.type)

    def prepare(self, rows: Sequence[Sequence[int]]) -> PackedBatch | Padded:
        """The pair rows packed (N real tokens, no padding) or right-padded (B, T), on the host; pinned on CUDA."""
        return torch_inputs(rows, self.packed, self.tokenizer.pad_token_id, self.device)

    @torch.inference_mode()
    def score(self, inputs: PackedBatch | Padded) -> np.ndarray:
        # non_blocking: with pinned inputs the host-to-device copy overlaps the previous batch's work.
        if isinstance(inputs, PackedBatch):
            logits = self._forward(inputs.to(self.device, non_blocking=True))
        else:
            ids = inputs.input_ids.to(self.device, non_blocking=True)
            mask = inputs.attention_mask.to(self.device, non_blocking=True)
            logits = self._forward(ids, mask)
        return logits.float().cpu().numpy()  # (B,)
