"""The graph that defines the ONNX artifact: the whole embedding path of a BiEncoder, token ids in, embeddings out.

It lives in core because the artifact crosses package lines: bidir-export exports and verifies it, bidir-serve's
tests export it as a stand-in for export-onnx (serve must not import export).

    input_ids      (B, T) int64
    attention_mask (B, T) int64, 1 for real tokens (left or right padding)
    dimensions     (B,)   int64, only with with_dims: each row's Matryoshka dimension, 1..hidden
    -> embeddings  (B, H) float32

With dimensions, the output keeps its width H so that one batch can mix dimensions: row i holds its first
dimensions[i] entries (re-normalized when the encoder normalizes) and zeros after them. A caller slices
embeddings[i, :dimensions[i]], which equals BiEncoder.forward(..., dim=dimensions[i]) for that row. Values outside
1..H are not checked inside the graph (a graph cannot raise): H or more keeps every entry, 0 or less gives a zero
row; the runtime validates them before calling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bidir_core.encoder import BiEncoder


class EmbeddingGraph(nn.Module):
    def __init__(self, encoder: BiEncoder, with_dims: bool = False):
        super().__init__()
        self.encoder = encoder
        self.with_dims = with_dims

    @property
    def input_names(self) -> tuple[str, ...]:
        return (
            ("input_ids", "attention_mask", "dimensions")
            if self.with_dims
            else ("input_ids", "attention_mask")
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, dimensions: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.with_dims:
            return self.encoder(input_ids, attention_mask)  # (B, H) fp32, pooled and normalized as configured
        emb = self.encoder(input_ids, attention_mask, normalize=False)  # (B, H) fp32
        H = emb.shape[-1]
        keep = torch.arange(H, device=emb.device)[None, :] < dimensions[:, None]  # (B, H) bool
        emb = emb * keep.to(emb.dtype)
        if self.encoder.config.normalize:
            emb = F.normalize(emb, p=2, dim=-1)  # the norm of the kept prefix only: the tail is zero
        return emb
