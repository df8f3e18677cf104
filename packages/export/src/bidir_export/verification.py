"""Checking an exported artifact against PyTorch: a fixed set of input batches and one comparison rule.

Batches (seeded, so a re-check sees the same inputs): batch 1 x seq 1; a right-padded and a left-padded batch whose
rows have different lengths (one row a single token); and the largest shape requested, its rows of varied lengths.
Token ids are drawn uniformly from the vocabulary. With a `dimensions` input each row gets its own dimension.
A reranker's graph reads real pairs instead (pair_batches): VERIFICATION_PAIRS, formatted with the checkpoint's
template and tokenized as CrossEncoder.predict does, in the same plan (1x1, one pair, right- and left-padded pairs,
the largest shape).

The rule. The same weights run by PyTorch in float64 are the truth. Per row, error is the relative distance to it,
||x - x64|| / ||x64||, and a run's error is its largest row error over every batch. The artifact may be at most
FACTOR times further from the truth than PyTorch itself is when it computes in the artifact's precision, and never
further than MAX_ERROR:

    error(artifact) <= min(FACTOR * max(error(PyTorch in dtype), UNIT_ROUNDOFF[dtype]), MAX_ERROR)

Why this and not a fixed bar: the rounding error of fp32 (or bf16) arithmetic grows with depth, width, sequence
length and the size of the activations, so a fixed |diff| bar that passes a tiny model rejects a trained or a 1B
one (a fixed 1e-4 rejected SmolLM2 after the demo's 32 training steps). PyTorch's own error on the same inputs is the scale an
export is entitled to; the unit roundoff is the floor, since no run in that precision can be closer than its last
rounding. Broken graphs are wrong by far more: on SmolLM2 a graph that ignores the padding mask, drops a layer or
pools differently is 0.18..1.2 from float64, so MAX_ERROR keeps the bound below them even for a precision whose own
error is large (PyTorch bf16 on SmolLM2 is up to 0.16 off): such a precision cannot be verified for that model, and
the check says so instead of passing anything. Non-finite outputs always fail (an fp16 overflow shows as inf).
packages/export/README.md has the measured table that the constants come from.

A reranker's scores are one number per pair, and a per-row relative distance |s - s64| / |s64| is meaningless for a
scalar: it blows up for a score near 0, where any rounding is a huge relative error, and a random or trained
reranker scores many pairs near 0. So for scores, error is the largest absolute error over every verified pair,
relative to the largest score magnitude of the verification set (the infinity-norm distance of the whole score
vector):

    error(scores) = max_i |s_i - s64_i| / max_j |s64_j|      (i, j over every pair of every batch)

Scores are compared across pairs (a ranking), so the size that matters is the scale of the scores, not each
score's own size: every pair, near 0 or not, gets the same absolute allowance, and the 1x1 batch or a single pair is
judged on the same scale as the rest (a per-batch scale would again divide by one scalar). The maximum rather than a
norm keeps one wrong pair from being averaged away. The rest of the rule is unchanged (FACTOR, the unit roundoff,
MAX_ERROR): a missing temperature t is off by |1 - t| (0.5 at t = 0.5), last pooling for avg, an ignored padding
mask or a missing layer by 0.5..1.8 on the tiny reranker, far past MAX_ERROR (tests/test_scorer_verification.py).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bidir_core.artifacts import OnnxManifest, Verification
from bidir_core.batching import pad_batch
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.reranker_config import tokenize_pairs
from bidir_core.scoring_graph import ScoringGraph

# Measured (export/README.md): onnxruntime graphs sit at 0.4..2.0x PyTorch's own distance from float64 in the same
# precision (fp32 0.4..0.9, fp16 0.7..2.0). 4 (two bits) leaves room for other kernels and accumulation orders
# (TensorRT tactics, other CPUs).
FACTOR = 4.0
# Below every broken graph measured (>= 0.18); a cosine of about 0.995 to the true embedding.
MAX_ERROR = 0.1
# Half the distance between 1 and the next number: no result rounded to this precision is closer than that.
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What a reranker is verified on: realistic pairs of mixed lengths (a one-word query to a paragraph), relevant and
# not, so the scores spread as in use.
VERIFICATION_PAIRS = (
    ("what is the capital of france", "Paris is the capital and most populous city of France."),
    (
        "python sort list",
        "Use sorted(items) to get a new sorted list, or items.sort() to sort the list in place.",
    ),
    ("boiling point of water", "The Eiffel Tower was completed in 1889 for the World's Fair in Paris."),
    (
        "how do vaccines train the immune system",
        "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen. B cells learn to "
        "make antibodies against it and memory cells remain, so a later infection is met by a fast, strong "
        "response before the disease can take hold.",
    ),
    ("tides", "Tides are the rise and fall of sea levels caused by the gravity of the Moon and the Sun."),
    (
        "who wrote the origin of species and when was it published",
        "On the Origin of Species by Charles Darwin was published on 24 November 1859. It introduced the theory "
        "that populations evolve over generations through natural selection.",
    ),
    (
        "rust borrow checker error",
        "Bake the cake at 180 degrees for forty minutes, until a skewer comes out clean.",
    ),
    (
        "what causes inflation",
        "Inflation is a general rise in prices. It can come from demand growing faster than supply, from higher "
        "costs of production such as energy and wages, or from an expansion of the money supply; central banks "
        "respond by raising interest rates.",
    ),
)


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


def tolerance_rule(dtype: str, scores: bool = False) -> str:
    measure = "max |s - s64| / max |s64| over all pairs" if scores else "max row ||x - x64|| / ||x64||"
    return (
        f"error <= min({FACTOR:g} x max(PyTorch {dtype} error, {UNIT_ROUNDOFF[dtype]:.1e}), {MAX_ERROR:g}); "
        f"error = {measure} against float64 PyTorch"
    )


def verified_dims(manifest: OnnxManifest) -> list[int]:
    """The dimensions a graph with the `dimensions` input is verified at (rows cycle through them): the model's
    Matryoshka dims that fit its width, else the full width, a half and a quarter."""
    H = manifest.hidden_size
    return [d for d in manifest.encoder.matryoshka_dims if d <= H] or [H, max(1, H // 2), max(1, H // 4)]


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


def pair_batches(cross_encoder: CrossEncoder, largest: tuple[int, int]) -> list[Batch]:
    """A reranker's fixed batches from VERIFICATION_PAIRS, formatted and cut as CrossEncoder.predict does (the
    checkpoint's template, the passage's end cut), at most largest's sequence length: 1x1 (the first token of a
    pair: the graph's smallest shape), one pair alone, three pairs right-padded and the same left-padded (the
    longest, the middle and the shortest pair, cut to at most S, S/2 and S/4 tokens so their lengths differ), and
    `largest` (B, S): one pair whose passage is long enough to be cut to exactly S tokens, then the pairs in turn."""
    max_b, max_s = largest

    def rows_at(pairs, max_length: int) -> list[list[int]]:
        # the one pair tokenization, with another max_length
        config = dataclasses.replace(cross_encoder.config, max_length=max_length)
        return tokenize_pairs(cross_encoder.tokenizer, config, pairs)[0]

    pairs = sorted(VERIFICATION_PAIRS, key=lambda pair: len(rows_at([pair], max_s)[0]))  # shortest first
    rows = rows_at(VERIFICATION_PAIRS, max_s)
    three = [
        rows_at([pairs[-1]], max_s)[0],
        rows_at([pairs[len(pairs) // 2]], max(1, max_s // 2))[0],
        rows_at([pairs[0]], max(1, max_s // 4))[0],
    ]
    query, passage = pairs[-1][0], " ".join(p for _, p in pairs)
    while len(long := rows_at([(query, passage)], max_s)[0]) < max_s and len(passage) < 1 << 22:
        passage += " " + passage
    plans = [
        ([rows[0][:1]], "right"),
        ([rows[0]], "right"),
        (three, "right"),
        (three, "left"),
        ([long] + [rows[i % len(rows)] for i in range(max_b - 1)], "right"),
    ]
    pad_id = cross_encoder.tokenizer.pad_token_id
    return [Batch(*pad_batch(plan, pad_id, side), None) for plan, side in plans]  # (B, T) int64 each


@dataclass(frozen=True)
class Reference:
    """PyTorch's outputs on the verification batches: the truth and PyTorch's own run in the artifact's dtype."""

    float64: list[torch.Tensor]
    """(B, H) per batch (scores: (B,)), from the weights in float64."""
    same_dtype: list[torch.Tensor]
    """The same from the weights in the artifact's precision (fp32 pooling and head, as the graph does)."""


def reference_outputs(
    graph: nn.Module, batches: Sequence[Batch], dtype: str, device: str = "cpu"
) -> Reference:
    """Run graph (an fp32 EmbeddingGraph or ScoringGraph) on batches in float64 and in dtype.

    The float64 run converts graph in place and back (fp32 -> fp64 -> fp32 is exact), so a large model is never
    held twice in float64; the low-precision run works on a copy in that dtype."""

    def run(module: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [module(**{k: v.to(device) for k, v in b.feeds().items()}).double().cpu() for b in batches]

    if dtype == "fp32":
        same = run(graph)
    else:
        low = low_precision_copy(graph, dtype)
        same = run(low)
        del low
    try:
        truth = run(graph.double())
    finally:
        graph.float()
    return Reference(float64=truth, same_dtype=same)


def low_precision_copy(graph: nn.Module, dtype: str) -> nn.Module:
    """graph (fp32) as it runs in dtype: what is exported in that precision, and PyTorch's own run in it. A
    reranker's head stays fp32, as CrossEncoder keeps it in any dtype.

    No full fp32 copy is made first: each floating parameter and buffer is cast as it is copied (deepcopy takes the
    memo's object for each id it meets)."""
    dt = TORCH_DTYPES[dtype]
    memo = {id(p): nn.Parameter(p.detach().to(dt), requires_grad=False) for p in graph.parameters()}
    memo |= {id(b): b.detach().to(dt) for b in graph.buffers() if b.is_floating_point()}
    low = copy.deepcopy(graph, memo).to(dt)
    if isinstance(graph, ScoringGraph):  # (1, H): the fp32 weight itself, not its rounded copy
        head = graph.cross_encoder.score.weight.detach().float().clone()
        low.cross_encoder.score.weight = nn.Parameter(head, requires_grad=False)
    return low


def row_errors(got: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B, H), (B, H) float64 -> (B,) relative distance per row; a row that is zero in both (all padding) is 0."""
    scale = truth.norm(dim=-1)
    diff = (got - truth).norm(dim=-1)
    return torch.where(scale > 0, diff / scale.clamp(min=torch.finfo(truth.dtype).tiny), diff)


def score_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """(N,), (N,) float64 scores of every verified pair -> max |got - truth| / max |truth| (module docstring)."""
    scale = float(truth.abs().max())
    diff = float((got - truth).abs().max())
    return diff / scale if scale > 0 else diff


def output_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """The rule's error of one run over every verified row: embeddings (rows, H) or scores (rows,)."""
    return score_error(got, truth) if truth.ndim == 1 else float(row_errors(got, truth).max())


def compare(
    batches: Sequence[Batch],
    reference: Reference,
    artifact: Callable[[Batch], torch.Tensor],
    dtype: str,
    runtime: str,
) -> Verification:
    """Run the artifact on every batch and apply the rule (module docstring) against reference: embeddings (B, H)
    or a reranker's scores (B,) (then min_cosine is None).

    A non-finite output fails, the artifact's or PyTorch's own in dtype (an fp16 overflow shows in both); the
    figures that it would make meaningless are None."""
    got = [artifact(b).detach().cpu().double() for b in batches]  # (B, H) or (B,) per batch
    for batch, g, truth in zip(batches, got, reference.float64, strict=True):
        if g.shape != truth.shape:
            raise ValueError(
                f"artifact returned shape {tuple(g.shape)} for {batch.shape}, expected {tuple(truth.shape)}"
            )
    truth = torch.cat(reference.float64)  # (rows, H) or (rows,)
    same, out = torch.cat(reference.same_dtype), torch.cat(got)
    scores = truth.ndim == 1
    torch_finite, artifact_finite = bool(torch.isfinite(same).all()), bool(torch.isfinite(out).all())
    reference_error = output_error(same, truth) if torch_finite else None
    bound = min(FACTOR * max(reference_error, UNIT_ROUNDOFF[dtype]), MAX_ERROR) if torch_finite else None
    error = max_abs = min_cos = None
    if artifact_finite:
        error = output_error(out, truth)
        max_abs = float((out - truth).abs().max())
    if artifact_finite and not scores:
        cos = F.cosine_similarity(out, truth, dim=-1, eps=1e-30)
        both_zero = (out.norm(dim=-1) == 0) & (truth.norm(dim=-1) == 0)  # all-padding rows count as identical
        min_cos = float(torch.where(both_zero, torch.ones_like(cos), cos).min())
    return Verification(
        passed=error is not None and bound is not None and error <= bound,
        max_abs_diff=max_abs,
        min_cosine=min_cos,
        tolerance=tolerance_rule(dtype, scores),
        shapes=tuple(b.shape for b in batches),
        runtime=runtime,
        error=error,
        reference_error=reference_error,
        bound=bound,
    )
