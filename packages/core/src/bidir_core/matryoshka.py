"""Matryoshka dimensions: an embedding's first `dim` entries are an embedding too (re-normalized when the model
normalizes). The one check of a requested dim, the one rule of which dims a served model offers (the server's
`dimensions`, batch-embed's --dim), and the one truncation, for torch tensors and numpy arrays."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bidir_core.errors import BidirError


def check_dim(dim: int | None, hidden_size: int) -> int:
    """A requested dimension -> the dimension to keep (None: all of them)."""
    return _requested(dim, hidden_size, "dim", "embedding size")


def offered_dim(dim: int | None, width: int, trained_dims: Sequence[int], name: str = "dim") -> int:
    """A requested width -> the width to serve, by the rule the server and batch-embed share: the full width always;
    any 1..width for a model whose config lists matryoshka_dims (it was trained to be cut); nothing narrower for one
    that lists none, whose cut vectors were never trained to be embeddings. name: how the caller's user spells the
    setting (dimensions, --dim), for the message."""
    dim = _requested(dim, width, name, "embedding width")
    if dim != width and not trained_dims:
        raise BidirError(
            f"{name}={dim}: this model was not trained for Matryoshka truncation (its config lists no "
            f"matryoshka_dims), so {name} can only be its width {width}"
        )
    return dim


def _requested(dim: int | None, width: int, name: str, width_name: str) -> int:
    """dim as an int in 1..width (None: width), else one line naming the setting (name) and the width (width_name:
    how the caller's messages call it)."""
    if dim is None:
        return width
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise BidirError(f"{name} must be a positive integer, got {dim!r}")
    if dim > width:
        raise BidirError(f"{name}={dim} is larger than the model's {width_name} {width}")
    return int(dim)


def truncate(emb: torch.Tensor, dim: int, normalize: bool) -> torch.Tensor:
    """(B, H) -> (B, dim): the first dim entries, L2-normalized again when normalize."""
    emb = emb[:, :dim]
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


def truncate_array(emb: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """truncate() for float32 (B, H) numpy arrays, as runtimes return them: -> contiguous float32 (B, dim)."""
    if dim == emb.shape[1]:
        return emb
    emb = emb[:, :dim]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(emb, dtype=np.float32)
