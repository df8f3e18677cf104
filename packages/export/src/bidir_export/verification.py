"""Checking an exported artifact against PyTorch: a fixed set of input batches and one comparison rule.

Batches (seeded, so a re-check sees the same inputs): batch 1 x seq 1; a right-padded and a left-padded batch whose
rows have different lengths (one row a single token); and the largest shape requested, its rows of varied lengths.
Token ids are drawn uniformly from the vocabulary. With a `dimensions` input each row gets its own dimension.

Tolerances: fp32 runs the same math as PyTorch in another order, so entries agree to ~1e-6 and 1e-4 leaves room
for long sequences; bf16 / fp16 graphs round every layer, so entries can move by ~1e-2 while the direction of the
embedding (what retrieval uses) stays put: per-row cosine >= 0.999.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bidir_core.artifacts import Verification

FP32_MAX_ABS_DIFF = 1e-4
LOW_PRECISION_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Batch:
    """One verification input: what the graph takes, as int64 CPU tensors."""

    input_ids: torch.Tensor
    """(B, T) token ids, 0 where padded."""
    attention_mask: torch.Tensor
    """(B, T) 1 for real tokens."""
    dimensions: torch.Tensor | None
    """(B,) per-row Matryoshka dimension, or None for a graph without that input."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def feeds(self) -> dict[str, torch.Tensor]:
        feeds = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.dimensions is not None:
            feeds["dimensions"] = self.dimensions
        return feeds


def tolerance_rule(dtype: str) -> str:
    if dtype == "fp32":
        return f"max_abs_diff <= {FP32_MAX_ABS_DIFF:g}"
    return f"min_cosine >= {LOW_PRECISION_MIN_COSINE:g}"


def verification_batches(
    vocab_size: int,
    largest: tuple[int, int],
    dims: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Batch]:
    """The fixed batches: 1x1, right- and left-padded (3 x up to 17), and `largest` (batch, seq).

    dims: the dimensions to cycle through per row (None: no dimensions input)."""
    g = torch.Generator().manual_seed(seed)
    max_b, max_s = largest
    small = min(17, max_s)
    padded_lengths = [small, max(1, small // 2), 1]
    big_lengths = [max_s] + torch.randint(1, max_s + 1, (max_b - 1,), generator=g).tolist()
    plans = [([1], "right"), (padded_lengths, "right"), (padded_lengths, "left"), (big_lengths, "right")]
    batches = []
    for lengths, side in plans:
        T = max(lengths)
        ids = torch.randint(0, vocab_size, (len(lengths), T), generator=g)
        mask = torch.zeros(len(lengths), T, dtype=torch.long)
        for row, n in enumerate(lengths):
            if side == "right":
                mask[row, :n] = 1
            else:
                mask[row, T - n :] = 1
        ids = ids * mask  # pad id 0 where padded; the graph must not read it anyway
        dimensions = None
        if dims is not None:
            dimensions = torch.tensor(
                [dims[row % len(dims)] for row in range(len(lengths))], dtype=torch.long
            )
        batches.append(Batch(ids, mask, dimensions))
    return batches


def compare(
    batches: Sequence[Batch],
    reference: Callable[[Batch], torch.Tensor],
    artifact: Callable[[Batch], torch.Tensor],
    dtype: str,
    runtime: str,
) -> Verification:
    """Run both on every batch; max |diff| over all entries, min per-row cosine, and whether the rule holds."""
    max_abs, min_cos = 0.0, 1.0
    finite = True
    for batch in batches:
        want = reference(batch).detach().float().cpu()  # (B, H)
        got = artifact(batch).detach().float().cpu()
        if got.shape != want.shape:
            raise ValueError(
                f"artifact returned shape {tuple(got.shape)} for {batch.shape}, expected {tuple(want.shape)}"
            )
        finite = finite and bool(torch.isfinite(got).all())
        max_abs = max(max_abs, float((got - want).abs().max()))
        # Rows that are zero in both (an all-padding row) count as identical.
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1, eps=1e-12)
        both_zero = (got.norm(dim=-1) == 0) & (want.norm(dim=-1) == 0)
        min_cos = min(min_cos, float(torch.where(both_zero, torch.ones_like(cos), cos).min()))
    if dtype == "fp32":
        passed = max_abs <= FP32_MAX_ABS_DIFF
    else:
        passed = min_cos >= LOW_PRECISION_MIN_COSINE
    return Verification(
        passed=bool(passed and finite),
        max_abs_diff=max_abs if finite else float("inf"),
        min_cosine=min_cos if finite else float("-inf"),
        tolerance=tolerance_rule(dtype),
        shapes=tuple(b.shape for b in batches),
        runtime=runtime,
    )
