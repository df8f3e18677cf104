"""Masked next-token prediction (MNTP), the adaptation stage of LLM2Vec (BehnamGhader et al., 2024).

A causal LM has only ever predicted token i from tokens < i. Switched to bidirectional attention it sees the future
too, and before anything else it should learn to use it: MNTP masks a fraction of the input tokens and predicts the
original token i from the model's output at position i - 1 (where a causal LM's prediction of token i has always
come from), through the model's LM head (the input embeddings when tied, trained with them; else the checkpoint's
own head, frozen, as LLM2Vec leaves it). Only masked positions are scored. After
this stage the checkpoint is fine-tuned contrastively like any other.

Masking follows BERT: each eligible position (every real, non-special token but the first, which has no position
before it) is chosen with probability p; a chosen token becomes the mask token 80% of the time, a random token 10%,
and stays itself 10%. Every text of two or more tokens gets at least one. The masks of a row come from its own seed,
(run seed, epoch, position in the epoch), so they are the same on any number of ranks and after a resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bidir_core.batching import pad_batch
from bidir_core.datasets import read_texts
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.tokenization import tokenize
from bidir_train.config import TrainConfig
from bidir_train.objective import ShuffledSampler, first_rows
from bidir_train.step import input_chunks, packed_tokens
from bidir_train.weights import load_untied_head

IGNORE = -100
"""Label of a position that is not scored."""


@dataclass(frozen=True)
class TextRow:
    text: str
    seed: int  # this row's masking seed


@dataclass
class TextBatch:
    """Tokenized MNTP micro-batch (right padded): masked inputs, and the original token where a position was masked."""

    input_ids: torch.Tensor  # (B, T) int64, masked
    attention_mask: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64: original token at masked positions, IGNORE elsewhere
    tokens: int  # real (non-pad) tokens
    truncated: int  # texts cut to max_length


class Mntp:
    """The objective bidir_train.trainer runs for `objective: mntp` (see bidir_train.objective)."""

    @classmethod
    def sampler(cls, cfg: TrainConfig) -> TextSampler:
        return TextSampler(
            first_rows(read_texts(cfg.data.train, cfg.data.text_fields), cfg),
            global_batch_size=cfg.schedule.global_batch_size,
            seed=cfg.schedule.seed,
            where=cfg.data.train,
        )

    def __init__(self, cfg: TrainConfig, encoder: BiEncoder, device: torch.device):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        self.collate = MaskingCollator(
            encoder.tokenizer,
            max_length=cfg.mntp.max_length,
            probability=cfg.mntp.mask_probability,
            mask_token=cfg.mntp.mask_token,
        )
        self.head = load_untied_head(cfg, encoder, device)
        # An untied checkpoint without its head is refused now, before any step.
        lm_head_weight(encoder.model, self.head)

    def forward_backward(self, batch: TextBatch, *, scale: float = 1.0) -> float:
        return mntp_forward_backward(
            self.encoder.model,
            batch,
            device=self.device,
            autocast=self.encoder.autocast,
            head=self.head,
            scale=scale,
            chunk=self.cfg.schedule.forward_chunk_size,
            max_tokens=packed_tokens(self.cfg.schedule, self.device),
        )


class TextSampler(ShuffledSampler):
    """Texts -> the rows of (epoch, step): a fresh seeded permutation per epoch, global_batch_size rows a step,
    each with its own masking seed."""

    noun = "texts"

    def rows(self, epoch: int, step: int) -> list[TextRow]:
        start = step * self.global_batch_size  # the first row's position in the epoch
        return [
            TextRow(text, _row_seed(self.seed, epoch, start + k))
            for k, text in enumerate(super().rows(epoch, step))
        ]


def _row_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64


def mask_tokens(
    ids: Sequence[int],
    *,
    probability: float,
    mask_id: int,
    vocab_size: int,
    special_ids: set[int],
    generator: torch.Generator,
) -> tuple[list[int], list[int]]:
    """(masked input ids, labels) of one text; labels hold the original token at chosen positions, else IGNORE."""
    inputs, labels = list(ids), [IGNORE] * len(ids)
    eligible = [i for i in range(1, len(ids)) if ids[i] not in special_ids]
    if not eligible:
        return inputs, labels
    draws = torch.rand(len(ids), generator=generator).tolist()
    chosen = [i for i in eligible if draws[i] < probability]
    if not chosen:
        chosen = [eligible[int(torch.randint(len(eligible), (1,), generator=generator))]]
    for i in chosen:
        labels[i] = ids[i]
        kind = float(torch.rand(1, generator=generator))
        if kind < 0.8:
            inputs[i] = mask_id
        elif kind < 0.9:
            inputs[i] = int(torch.randint(vocab_size, (1,), generator=generator))
    return inputs, labels


class MaskingCollator:
    """TextRows -> TextBatch: tokenization with counted truncation, masking from each row's seed, right padding."""

    def __init__(self, tokenizer, *, max_length: int, probability: float, mask_token: str | None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.probability = probability
        self.mask_id = mask_token_id(tokenizer, mask_token)
        self.special_ids = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)

    def __call__(self, rows: list[TextRow]) -> TextBatch:
        ids, cut = tokenize(self.tokenizer, [r.text for r in rows], self.max_length)
        inputs, labels = [], []
        for row, row_ids in zip(rows, ids, strict=True):
            masked, row_labels = mask_tokens(
                row_ids,
                probability=self.probability,
                mask_id=self.mask_id,
                vocab_size=self.vocab_size,
                special_ids=self.special_ids,
                generator=torch.Generator().manual_seed(row.seed),
            )
            inputs.append(masked)
            labels.append(row_labels)
        input_ids, attention_mask = pad_batch(inputs, self.tokenizer.pad_token_id)
        label_ids, _ = pad_batch(labels, IGNORE)
        return TextBatch(input_ids, attention_mask, label_ids, int(attention_mask.sum()), cut)


def mask_token_id(tokenizer, mask_token: str | None) -> int:
    """The id of `mask_token`, or of the tokenizer's own mask token, or of "_" (what LLM2Vec uses for Llama, which
    has no mask token)."""
    token = mask_token or tokenizer.mask_token or "_"
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise BidirError(
            f"mntp.mask_token {token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one"
        )
    return ids[0]


def lm_head_weight(model, head: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head (V, H): `head` when the checkpoint has its own (untied, loaded by bidir_train.weights, frozen), else the
    model's input embeddings, which a tied checkpoint (SmolLM2, Llama 3.2) uses as its head and trains with them.

    Under FSDP2, call this after the model's forward: the root's parameters (embeddings included) stay gathered
    from forward until backward, so this is the full matrix and its gradient reaches the sharded parameter."""
    if head is not None:
        return head
    if not getattr(model.config, "tie_word_embeddings", False):
        raise BidirError(
            "MNTP predicts tokens through the LM head: this checkpoint's is untied and was not found "
            "(lm_head.weight / output.weight); start MNTP from the original causal checkpoint"
        )
    return model.embed_tokens.weight


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states that predict the masked tokens and those tokens: token i is predicted from position i - 1.
    hidden (B, T, H), labels (B, T) -> (M, H), (M,) for the M masked positions."""
    target = labels[:, 1:]  # (B, T-1): the label of position i + 1 ...
    picked = target != IGNORE
    return hidden[:, :-1][picked], target[picked]  # ... predicted from position i


def mntp_forward_backward(
    model,
    batch: TextBatch,
    *,
    device: torch.device,
    autocast: Callable,
    head: torch.Tensor | None = None,
    scale: float = 1.0,
    chunk: int | None = None,
    max_tokens: int | None = None,
) -> float:
    """Backward `scale * loss` of one micro-batch (the mean cross-entropy over its masked tokens); return the loss.
    With `chunk`, rows are run in length-sorted chunks (less padding), each backwarded at once (less memory); with
    `max_tokens`, in packed chunks of at most that many real tokens (no padding)."""
    n_masked = max(int((batch.labels[:, 1:] != IGNORE).sum()), 1)
    total = 0.0
    for rows, (ids, mask) in input_chunks(batch.input_ids, batch.attention_mask, chunk, max_tokens):
        if mask is None:  # packed: the labels of the real tokens, in the stream's order, as one row
            labels = batch.labels[rows][batch.attention_mask[rows].bool()][None]  # (1, N)
        else:
            labels = batch.labels[rows, : mask.shape[1]]
        labels = labels.to(device)
        with autocast():
            hidden = model(ids.to(device), None if mask is None else mask.to(device))  # (b, t, H) or (N, H)
            if mask is None:
                # One row of N tokens. A text's first token is never masked (nothing before it predicts it),
                # so no text's token is predicted from the end of the text before it.
                hidden = hidden[None]
            states, target = shifted_targets(hidden, labels)  # (m, H), (m,)
            weight = lm_head_weight(model, head)
            logits = F.linear(
                states, weight.to(states.dtype)
            )  # (m, V); a frozen fp32 head meets bf16 states on GPU
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / n_masked
        (loss * scale).backward()
        total += loss.item()
    return total
