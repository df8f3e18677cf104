"""BiEncoder: model + pooling + optional L2 normalization + Matryoshka truncation + query/passage prefixes.

The public API mirrors sentence-transformers where that fits: `encode(texts, batch_size=..., normalize=..., dim=...)`,
`encode_queries`, `encode_documents`, `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bidir_core.batching import PACKED_DEFAULT, PACKED_TOKENS, batched_forward
from bidir_core.checkpoint import EncoderConfig, write_checkpoint
from bidir_core.errors import BidirError
from bidir_core.families import check_max_length, is_causal_config
from bidir_core.matryoshka import check_dim, truncate
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.packed import PackedBatch
from bidir_core.pooling import pool, pool_packed
from bidir_core.reranker_config import RerankerConfig
from bidir_core.sources import ModelSource, open_source
from bidir_core.tokenization import tokenize

__all__ = ["PACKED_DEFAULT", "PACKED_TOKENS", "BiEncoder"]  # the packing defaults live in batching.py


class BiEncoder(nn.Module):
    """Texts -> embeddings. forward() is the tensor path (what export and training use); encode() is the text API."""

    def __init__(
        self,
        model: LlamaBidirectionalModel,
        tokenizer,
        config: EncoderConfig | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        source: ModelSource | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EncoderConfig(attention="causal" if model.causal else "bidirectional")
        self.source = source
        """The source model and config were read from (from_pretrained), which checked them against each other
        as it made them; None for an encoder built from a model in memory, checked here."""
        if source is None:
            check_settings(model.config, self.config)
        # A runtime choice, not part of the saved config: training on CPU runs the decoder stack in bf16 autocast
        # (forward() and so encode(), which the in-loop dev evaluation calls); pooling stays fp32.
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | ModelSource,
        *,
        config: EncoderConfig | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        max_length: int | None = None,
        matryoshka_dims: Sequence[int] | None = None,
        attention: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> BiEncoder:
        """Load any source LlamaBidirectionalModel.from_pretrained accepts (a ModelSource too). Settings come from
        config when given (e.g. an export manifest's), else from the source (ModelSource.encoder_config: its
        bidir.json, an NVIDIA llama_bidirec config's pooling, or the defaults, with pooling "last" for
        attention="causal"); arguments that are not None override them."""
        # Opening reads and checks bidir.json and config.json, so a bad one is reported as such (not by the
        # tokenizer, which reads config.json too); settings and tokenizer come before the (large) weights.
        source = open_source(source, attention or (config.attention if config is not None else None))
        settings = source.encoder_config(
            config,
            pooling=pooling,
            normalize=normalize,
            query_prefix=query_prefix,
            passage_prefix=passage_prefix,
            max_length=max_length,
            matryoshka_dims=matryoshka_dims,
        )
        tokenizer = source.tokenizer()
        model = LlamaBidirectionalModel.from_pretrained(source, dtype=dtype, device=device)
        return cls(model, tokenizer, settings, source=source)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor | PackedBatch,
        attention_mask: torch.Tensor | None = None,
        dim: int | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (B, T), or a PackedBatch of B texts (no mask) -> embeddings (B, dim or H),
        fp32."""
        with self.autocast():
            hidden = self.model(input_ids, attention_mask)  # (B, T, H), or (N, H) packed
        # Pool in fp32 even for a bf16 model (float64 stays float64: the export verification's reference).
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        if isinstance(input_ids, PackedBatch):
            emb = pool_packed(hidden, input_ids, self.config.pooling)
        else:
            emb = pool(hidden, attention_mask, self.config.pooling)
        # Matryoshka: a prefix of the dimensions (all of them by default), normalized as configured.
        normalize = self.config.normalize if normalize is None else normalize
        return truncate(emb, check_dim(dim, self.hidden_size), normalize)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the decoder stack runs in: torch.autocast to autocast_dtype on the model's device, or none."""
        return decoder_autocast(self.model, self.autocast_dtype)

    # no_grad rather than inference_mode: a model being trained under FSDP2 is evaluated with encode(), and FSDP2
    # cannot unshard its parameters into inference-mode tensors.
    @torch.no_grad()
    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool | None = None,
        dim: int | None = None,
        show_progress_bar: bool = False,
        packed: bool | None = None,
        max_tokens: int | None = None,
    ) -> np.ndarray:
        """Embed texts as they are (no prefix): float32 (N, D), or (D,) for a single str.

        Texts are sorted by token length and batched, then returned in input order. packed (None: PACKED_DEFAULT
        for the model's device): each batch is one packed token stream of at most max_tokens real tokens
        (default PACKED_TOKENS) and batch_size texts, no padding; else padded batches of batch_size texts (and at
        most max_tokens padded tokens when given), each padded little since lengths are sorted.
        Texts longer than max_length tokens are truncated, with a warning that counts them.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if dim is not None:
            dim = check_dim(dim, self.hidden_size)
        if not texts:
            return np.zeros((0, dim or self.hidden_size), dtype=np.float32)
        ids, n_truncated = tokenize(self.tokenizer, texts, self.config.max_length)
        if n_truncated:
            warnings.warn(
                f"{n_truncated} of {len(texts)} texts were longer than max_length={self.config.max_length} tokens "
                "and were truncated",
                stacklevel=2,
            )
        n_empty = sum(1 for row in ids if not row)
        if n_empty:
            warnings.warn(f"{n_empty} texts have no tokens; their embeddings are zero vectors", stacklevel=2)

        out = np.zeros((len(texts), dim or self.hidden_size), dtype=np.float32)
        batches = batched_forward(
            lambda *inputs: self(*inputs, dim=dim, normalize=normalize),
            ids,
            self.tokenizer.pad_token_id,
            next(self.model.parameters()).device,
            batch_size=batch_size,
            packed=packed,
            max_tokens=max_tokens,
            show_progress_bar=show_progress_bar,
        )
        for batch, emb in batches:
            out[batch] = emb.cpu().numpy()
        return out[0] if single else out

    def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """encode() with the query prefix prepended once to each text."""
        return self.encode([self.config.query_prefix + t for t in _as_list(texts)], **kwargs)

    def encode_documents(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """encode() with the passage prefix prepended once to each text."""
        return self.encode([self.config.passage_prefix + t for t in _as_list(texts)], **kwargs)

    def save_pretrained(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the checkpoint artifact (loads in bidir, transformers and sentence-transformers)."""
        return write_checkpoint(out_dir, self.model, self.tokenizer, self.config, overwrite=overwrite)


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise BidirError("encode_queries / encode_documents take a list of texts, not a single str")
    return list(texts)


def decoder_autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to dtype on the model's device, or no context (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def check_settings(config, settings: EncoderConfig | RerankerConfig) -> None:
    """An encoder's (or a reranker's) settings must suit its model config: the same attention mode
    (config.is_causal is the record of it, settings.attention its form on disk) and a max_length the attention
    covers."""
    causal = is_causal_config(config)
    if causal != (settings.attention == "causal"):
        what = "reranker" if isinstance(settings, RerankerConfig) else "encoder"
        raise BidirError(
            f"the model attends {'causally' if causal else 'bidirectionally'} but the {what} config "
            f"says attention={settings.attention!r}"
        )
    check_max_length(config, settings.max_length)
