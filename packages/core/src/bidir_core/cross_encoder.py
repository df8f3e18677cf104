"""CrossEncoder: a reranker. The decoder reads a (query, passage) pair as one text and a linear head turns its pooled
states into one relevance logit.

    score(q, p) = score.weight . pool(decoder(tokens(template(q, p)))) / temperature        (one fp32 number)

It is NeMo's LlamaBidirectionalForSequenceClassification (bidirectional attention, avg pooling, a bias-free head
of one label, the logit divided by config.json's temperature) and transformers' *ForSequenceClassification
(causal attention, the last real token's state, the same head) with other settings, and the usual Qwen3-Reranker
style token-logit reranker too: logit("yes") - logit("no") at the last position is (lm_head[yes] - lm_head[no]) .
h_last, a head with that weight on "last" pooling under causal attention (bidir-convert --reranker builds it), so
the score has one form and no runtime mode. The text API mirrors sentence-transformers' CrossEncoder:
predict(pairs), rank(query, documents).

Shapes: B pairs, T tokens, H hidden.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bidir_core.batching import batched_forward
from bidir_core.checkpoint import write_reranker
from bidir_core.encoder import check_settings, decoder_autocast
from bidir_core.errors import BidirError
from bidir_core.model import LlamaBidirectionalModel, check_state_dict
from bidir_core.packed import PackedBatch
from bidir_core.pooling import pool, pool_packed
from bidir_core.reranker_config import RERANKER, RerankerConfig, tokenize_pairs
from bidir_core.sources import SCORE_KEY, ModelSource, open_source

ACTIVATIONS = ("sigmoid",)
"""predict()'s activation names (None: the raw logits)."""


class CrossEncoder(nn.Module):
    """(query, passage) pairs -> relevance logits. forward() is the tensor path (training calls it); predict() and
    rank() are the text API."""

    def __init__(
        self,
        model: LlamaBidirectionalModel,
        tokenizer,
        config: RerankerConfig,
        score: nn.Linear | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        source: ModelSource | None = None,
    ):
        super().__init__()
        hidden = model.config.hidden_size
        if score is None:
            score = new_score_head(model.config, seed=0, device=next(model.parameters()).device)
        if (
            not isinstance(score, nn.Linear)
            or score.bias is not None
            or tuple(score.weight.shape) != (1, hidden)
        ):
            raise BidirError(f"score must be nn.Linear({hidden}, 1, bias=False), got {score!r}")
        self.model = model
        self.score = score
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        """The source model, head and config were read from (from_pretrained, which checked them against each
        other); None for a reranker built from a model in memory, checked here."""
        if source is None:
            check_settings(model.config, config)
        # A runtime choice, as BiEncoder's: the decoder stack may run in autocast; pooling and head stay fp32.
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | ModelSource,
        *,
        config: RerankerConfig | None = None,
        template: str | None = None,
        pooling: str | None = None,
        temperature: float | None = None,
        max_length: int | None = None,
        attention: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        new_head: bool = False,
        seed: int = 0,
    ) -> CrossEncoder:
        """Load any source bidir_core.sources.open_source accepts. Settings come from config when given, else from
        the source (ModelSource.reranker_config), with the arguments that are not None overriding them.

        A source without a head (a plain decoder, an embedder checkpoint, "smollm2-135m") is refused unless
        new_head=True, which starts a head as transformers and NeMo initialize it: normal(0,
        config.initializer_range), from a generator seeded with `seed` (the global RNG is untouched); a stored
        head is then replaced too. The head is kept in fp32 whatever dtype the decoder is loaded in."""
        # Settings and tokenizer before the (large) weights, so a bad setting is reported at once.
        source = open_source(source, attention or (config.attention if config is not None else None))
        settings = source.reranker_config(
            config, template=template, pooling=pooling, temperature=temperature, max_length=max_length
        )
        if source.kind != RERANKER and not new_head:
            raise BidirError(
                f"{source.name}: has no reranker head ({SCORE_KEY}); pass new_head=True to start a new one"
            )
        tokenizer = source.tokenizer()
        state_dict, where, head = source.read_weights_and_head(dtype)
        head_file = where.get(SCORE_KEY, source.path) if isinstance(where, dict) else where
        if head is None and not new_head:
            raise BidirError(f"{source.path}: no {SCORE_KEY} in the weights (a reranker's head)")
        check_state_dict(source.config, state_dict, where)
        model = LlamaBidirectionalModel.from_state_dict(source.config, state_dict, device=device)
        if new_head:
            score = new_score_head(source.config, seed=seed, device=device)
        else:
            score = _head_from(head, source.config.hidden_size, head_file, device)
        return cls(model, tokenizer, settings, score, source=source)

    @classmethod
    def from_causal_lm(
        cls,
        source: str | Path | ModelSource,
        yes_token: str,
        no_token: str,
        *,
        template: str | None = None,
        pooling: str = "last",
        attention: str = "causal",
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> CrossEncoder:
        """A token-logit reranker (Qwen3-Reranker style: a causal LM asked whether the passage answers the query,
        its score logit(yes) - logit(no) at the last token) as a CrossEncoder. That difference is
        (lm_head[yes] - lm_head[no]) . h_last, so the head's weight is that row difference, on "last" pooling
        under the causal attention the LM was trained with: the same scores, in the one scorer form. Each token
        must be exactly one token of the tokenizer (encoded without special tokens); the template is the prompt
        the model expects around query and passage (e.g. its chat wrapping)."""
        source = open_source(source, attention)
        tokenizer = source.tokenizer()
        ids = [_single_token_id(tokenizer, token, source.path) for token in (yes_token, no_token)]
        if ids[0] == ids[1]:
            raise BidirError(
                f"{source.path}: {yes_token!r} and {no_token!r} are the same token (id {ids[0]})"
            )
        lm_head = source.read_lm_head(torch.float32)  # (vocab, H); None: tied to the input embeddings
        ce = cls.from_pretrained(source, template=template, pooling=pooling, max_length=max_length, dtype=dtype,
                                 device=device, new_head=True)  # fmt: skip
        if lm_head is None:
            if not getattr(source.config, "tie_word_embeddings", False):
                raise BidirError(
                    f"{source.path}: no LM head (lm_head.weight) and tie_word_embeddings is false"
                )
            lm_head = ce.model.embed_tokens.weight.detach().float()
        if lm_head.shape[0] <= max(ids):
            raise BidirError(
                f"{source.path}: the LM head has {lm_head.shape[0]} rows; token id {max(ids)} is past it"
            )
        ce.score = _linear((lm_head[ids[0]] - lm_head[ids[1]])[None].cpu(), device)  # (1, H)
        return ce

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor | PackedBatch, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids, attention_mask (B, T), or a PackedBatch of B pairs (no mask) -> logits (B,), fp32 (float64 for
        a float64 model), already divided by the temperature."""
        with self.autocast():
            hidden = self.model(input_ids, attention_mask)  # (B, T, H), or (N, H) packed
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        if isinstance(input_ids, PackedBatch):
            pooled = pool_packed(hidden, input_ids, self.config.pooling)  # (B, H)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            pooled = pool(hidden, attention_mask, self.config.pooling)  # (B, H)
        # The head in the pooled states' precision, never in the decoder's bf16.
        logits = F.linear(pooled, self.score.weight.to(pooled.dtype))  # (B, 1)
        return logits[:, 0] / self.config.temperature

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the decoder stack runs in (BiEncoder.autocast)."""
        return decoder_autocast(self.model, self.autocast_dtype)

    def format(self, query: str, passage: str) -> str:
        """The one text a pair is read as (RerankerConfig.format)."""
        return self.config.format(query, passage)

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], int]:
        """Token ids of each formatted pair and how many were cut to max_length (reranker_config.tokenize_pairs,
        the one home of pair tokenization)."""
        return tokenize_pairs(self.tokenizer, self.config, pairs)

    # no_grad rather than inference_mode, as BiEncoder.encode: a model being trained under FSDP2 is scored here.
    @torch.no_grad()
    def predict(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        activation: str | None = None,
        packed: bool | None = None,
        max_tokens: int | None = None,
        show_progress_bar: bool = False,
    ) -> np.ndarray:
        """Scores of (query, passage) pairs: float32 (N,), the logits (activation None) or their sigmoid
        ("sigmoid"). Batched as BiEncoder.encode: sorted by token length, packed by default on CPU
        (batching.batched_forward), returned in input order. Pairs longer than max_length tokens are cut, with a
        warning that counts them; a score that is not finite is an error naming the pair."""
        if activation is not None and activation not in ACTIVATIONS:
            raise BidirError(
                f"activation must be None or one of {', '.join(ACTIVATIONS)}, got {activation!r}"
            )
        pairs = list(pairs)
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        ids, n_truncated = self.tokenize_pairs(pairs)
        if n_truncated:
            warnings.warn(
                f"{n_truncated} of {len(pairs)} pairs were longer than max_length={self.config.max_length} tokens "
                "and were truncated",
                stacklevel=2,
            )
        out = np.zeros(len(pairs), dtype=np.float32)
        batches = batched_forward(
            self,
            ids,
            self.tokenizer.pad_token_id,
            next(self.model.parameters()).device,
            batch_size=batch_size,
            packed=packed,
            max_tokens=max_tokens,
            show_progress_bar=show_progress_bar,
            desc="predict",
        )
        for batch, logits in batches:
            out[batch] = logits.float().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            raise BidirError(
                f"pair {bad[0]}: the model scored it {out[bad[0]]} ({bad.size} of {len(pairs)} scores are not "
                "finite; the weights or the dtype overflow)"
            )
        if activation == "sigmoid":
            out = torch.sigmoid(torch.from_numpy(out)).numpy()
        return out

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        **predict_kwargs,
    ) -> list[dict]:
        """The documents by score for query, best first (equal scores keep corpus order), as sentence-transformers'
        CrossEncoder.rank: [{"corpus_id": index, "score": float, "text": document (return_documents)}], the top_k
        first ones (all when None)."""
        documents = list(documents)
        scores = self.predict([(query, doc) for doc in documents], **predict_kwargs)
        order = sorted(range(len(documents)), key=lambda i: -scores[i])  # stable: ties keep corpus order
        ranked = []
        for i in order[:top_k]:
            row = {"corpus_id": i, "score": float(scores[i])}
            if return_documents:
                row["text"] = documents[i]
            ranked.append(row)
        return ranked

    def save_pretrained(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the reranker checkpoint (checkpoint.write_reranker): loads in bidir and, as a
        {Family}ForSequenceClassification, in transformers."""
        return write_reranker(
            out_dir, self.model, self.score.weight.detach(), self.tokenizer, self.config, overwrite=overwrite
        )


def new_score_head(config, *, seed: int, device: str | torch.device | None = None) -> nn.Linear:
    """A fresh head nn.Linear(H, 1, bias=False) in fp32, weight ~ normal(0, config.initializer_range) as
    transformers and NeMo initialize a classifier (0.02 when the config has none), from its own generator seeded
    with seed: the same head for the same seed, whatever the global RNG."""
    std = getattr(config, "initializer_range", None) or 0.02
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, config.hidden_size, generator=generator) * std
    return _linear(weight, device)


def _single_token_id(tokenizer, token: str, where: Path) -> int:
    """The id of token, which must encode (no special tokens) to exactly one token id."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise BidirError(
            f"{where}: {token!r} is {len(ids)} tokens ({ids}) in this tokenizer; a yes/no token must be exactly one"
        )
    return ids[0]


def _head_from(head: torch.Tensor, hidden: int, file: Path, device) -> nn.Linear:
    """The stored head, checked (shape (1, H), finite), as an fp32 nn.Linear."""
    if tuple(head.shape) != (1, hidden):
        raise BidirError(
            f"{file}: {SCORE_KEY} has shape {list(head.shape)}; a reranker head is [1, {hidden}]"
        )
    head = head.float()
    if not torch.isfinite(head).all():
        raise BidirError(f"{file}: {SCORE_KEY} holds values that are not finite")
    return _linear(head, device)


def _linear(weight: torch.Tensor, device) -> nn.Linear:
    with torch.device("meta"):
        score = nn.Linear(weight.shape[1], 1, bias=False)
    score.weight = nn.Parameter(weight.to(device=device or "cpu", dtype=torch.float32))
    return score
