"""The reranker's losses over groups of scored (query, passage) pairs, and the distillation terms they share with
the embedder.

Layout. A micro-batch of B queries is B groups of G = 1 + N pairs, grouped by query with the positive first: score
i * G is query i's positive, its N negatives follow. Scores s (B * G,) are a reranker's logits (or an embedder's
cosines over its own group); teacher scores t (B * G,) come from the data (pos_score / neg_scores). Every loss is
a mean over the B queries (and, for bce and margin_mse, over their pairs), so micro-batches average like the
contrastive loss's.

- group_ce: softmax cross-entropy over each group, the positive the target (NeMo AutoModel's reranker loss).
- bce: binary cross-entropy with logits per pair: positive 1, negatives 0 (the pointwise loss).
- kl: distillation, KL(softmax(t / T) || softmax(s / T)) per group, times T^2 so the gradient's size does not
  depend on T (Hinton et al., 2015; sentence-transformers' DistillKLDivLoss).
- margin_mse: distillation, the mean squared error of the student's margins s_pos - s_neg against the teacher's
  t_pos - t_neg, over each query's N negatives (Hofstaetter et al., 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bidir_core.errors import BidirError

RERANK_LOSSES = ("group_ce", "bce", "kl", "margin_mse")
DISTILL_LOSSES = ("kl", "margin_mse")
"""The losses that learn from teacher scores (rows without them are refused)."""


def _groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """(B * G,) or (B * G, 1) -> (B, G) fp32."""
    flat = scores.reshape(-1).float()
    if flat.numel() % group:
        raise BidirError(f"{flat.numel()} scores do not make groups of {group}")
    return flat.view(-1, group)


def group_ce(scores: torch.Tensor, group: int) -> torch.Tensor:
    s = _groups(scores, group)  # (B, G), positive in column 0
    return F.cross_entropy(s, torch.zeros(s.shape[0], dtype=torch.long, device=s.device))


def bce(scores: torch.Tensor, group: int) -> torch.Tensor:
    s = _groups(scores, group)
    labels = torch.zeros_like(s)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(s, labels)


def kl(scores: torch.Tensor, teacher: torch.Tensor, group: int, temperature: float = 1.0) -> torch.Tensor:
    s, t = _groups(scores, group) / temperature, _groups(teacher, group) / temperature
    # kl_div(input = log q_student, target = log p_teacher) = sum p (log p - log q); batchmean: mean over queries.
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    return kd * temperature**2


def margin_mse(scores: torch.Tensor, teacher: torch.Tensor, group: int) -> torch.Tensor:
    s, t = _groups(scores, group), _groups(teacher, group)
    student_margin = s[:, :1] - s[:, 1:]  # (B, N)
    teacher_margin = t[:, :1] - t[:, 1:]
    return F.mse_loss(student_margin, teacher_margin)


def rerank_loss(
    name: str,
    scores: torch.Tensor,
    group: int,
    teacher: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The loss `name` (RERANK_LOSSES) of scores (B * G,) in groups of `group`; teacher (B * G,) for kl and
    margin_mse, at `temperature` for kl."""
    if name in DISTILL_LOSSES and teacher is None:
        raise BidirError(f"loss {name} needs teacher scores (pos_score / neg_scores in the data)")
    if name == "group_ce":
        return group_ce(scores, group)
    if name == "bce":
        return bce(scores, group)
    if name == "kl":
        return kl(scores, teacher, group, temperature)
    if name == "margin_mse":
        return margin_mse(scores, teacher, group)
    raise BidirError(f"unknown reranker loss {name!r}; one of {', '.join(RERANK_LOSSES)}")
