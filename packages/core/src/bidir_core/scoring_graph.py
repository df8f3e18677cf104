"""The graph that defines a reranker's ONNX artifact: the whole scoring path of a CrossEncoder, token ids in, one
relevance logit per pair out.

It lives in core beside embedding_graph.py for the same reason: bidir-export exports and verifies it, bidir-serve's
tests export it as a stand-in for export-onnx (serve must not import export).

    input_ids      (B, T) int64, the formatted pairs' tokens (CrossEncoder.tokenize_pairs)
    attention_mask (B, T) int64, 1 for real tokens (left or right padding)
    -> scores      (B,)   float32: the head's logit divided by the temperature (no sigmoid), as CrossEncoder.forward

Pooling, the head and the temperature are inside the graph, so a runtime only pads token rows. A token-logit
reranker (bidir-convert --reranker --yes-token) is the same graph: its head is the yes-minus-no row of the LM head,
read at the last real token under causal attention (the mask is part of the exported attention).
"""

from __future__ import annotations

import torch
from torch import nn

from bidir_core.cross_encoder import CrossEncoder

SCORES = "scores"
"""The graph's one output."""


class ScoringGraph(nn.Module):
    input_names = ("input_ids", "attention_mask")

    def __init__(self, cross_encoder: CrossEncoder):
        super().__init__()
        self.cross_encoder = cross_encoder

    @property
    def hidden_size(self) -> int:
        return self.cross_encoder.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # (B,) fp32: pooled in fp32 and the head in fp32 whatever the decoder's dtype (float64 for a float64 model)
        return self.cross_encoder(input_ids, attention_mask)
