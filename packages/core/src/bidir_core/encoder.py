"""BiEncoder: model + pooling + optional L2 normalization + Matryoshka truncation + query/passage prefixes.

The public API mirrors sentence-transformers where that fits: `encode(texts, batch_size=..., normalize=..., dim=...)`,
`encode_queries`, `encode_documents`, `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.checkpoint import EncoderConfig, read_encoder_config, write_checkpoint
from bidir_core.errors import BidirError
from bidir_core.families import check_max_length
from bidir_core.hf_folder import load_config, read_config_dict
from bidir_core.matryoshka import check_dim, truncate
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.packed import PackedBatch, pack
from bidir_core.pooling import pool, pool_packed
from bidir_core.sources import resolve_source
from bidir_core.tokenization import load_tokenizer, tokenize

PACKED_DEFAULT = {"cpu": True, "cuda": False}
"""Whether encode() (and the serve torch backend) packs by default, per device type: the faster path by
benchmarks/bench_encode.py and bench_batch_embed.py on CPU (figures: the core README, "Packed batches"). CUDA stays
padded until benchmarks/gpu_suite.sh's packed rows have a measurement to decide it."""
PACKED_TOKENS = 4096
"""encode()'s default real-token budget per packed batch."""


class BiEncoder(nn.Module):
    """Texts -> embeddings. forward() is the tensor path (what export and training use); encode() is the text API."""

    def __init__(
        self,
        model: LlamaBidirectionalModel,
        tokenizer,
        config: EncoderConfig | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EncoderConfig(attention="causal" if model.causal else "bidirectional")
        if model.causal != (self.config.attention == "causal"):
            raise BidirError(
                f"the model attends {'causally' if model.causal else 'bidirectionally'} but the encoder config "
                f"says attention={self.config.attention!r}"
            )
        check_max_length(model.config, self.config.max_length)
        # A runtime choice, not part of the saved config: training on CPU runs the decoder stack in bf16 autocast
        # (forward() and so encode(), which the in-loop dev evaluation calls); pooling stays fp32.
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path,
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
        """Load any source LlamaBidirectionalModel.from_pretrained accepts. Settings come from config when given
        (e.g. an export manifest's), else from the checkpoint's bidir.json (an NVIDIA llama_bidirec config's
        `pooling` otherwise, in NeMo's meaning: see _nemo_pooling; else the defaults, with pooling "last" for
        attention="causal"); arguments that are not None override them."""
        source = resolve_source(path_or_name)
        overrides = {
            "pooling": pooling,
            "normalize": normalize,
            "query_prefix": query_prefix,
            "passage_prefix": passage_prefix,
            "max_length": max_length,
            "matryoshka_dims": tuple(matryoshka_dims) if matryoshka_dims is not None else None,
            "attention": attention,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        # Settings and tokenizer are checked before the (possibly large) weights are read.
        config = (
            _stored_config(source, overrides) if config is None else dataclasses.replace(config, **overrides)
        )
        if source.is_dir():
            # A bad config.json is reported as such, not by the tokenizer, which reads it too; so is a max_length
            # the config's attention cannot cover (a sliding window).
            model_config = load_config(source, config.attention)
            try:
                check_max_length(model_config, config.max_length)
            except BidirError as e:
                raise BidirError(f"{source / 'config.json'}: {e}") from None
        tokenizer = load_tokenizer(source)
        model = LlamaBidirectionalModel.from_pretrained(
            source, dtype=dtype, device=device, attention=config.attention
        )
        return cls(model, tokenizer, config)

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
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast_dtype)

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

        device = next(self.model.parameters()).device
        out = np.zeros((len(texts), dim or self.hidden_size), dtype=np.float32)
        packed = PACKED_DEFAULT[device.type] if packed is None else packed
        if packed:
            max_tokens = max_tokens or PACKED_TOKENS
        lengths = [len(row) for row in ids]
        batches = length_sorted_batches(lengths, batch_size, max_tokens, padded=not packed)
        with tqdm(total=len(texts), disable=not show_progress_bar, desc="encode", unit="text") as progress:
            for batch in batches:
                rows = [ids[i] for i in batch]
                if packed:
                    emb = self(pack(rows).to(device), dim=dim, normalize=normalize)
                else:
                    input_ids, attention_mask = pad_batch(rows, self.tokenizer.pad_token_id)
                    emb = self(input_ids.to(device), attention_mask.to(device), dim=dim, normalize=normalize)
                out[batch] = emb.cpu().numpy()
                progress.update(len(batch))
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


# NVIDIA llama_bidirec configs name their pooling in NeMo's terms: its "mean" is our "avg".
_NEMO_POOLING = {"mean": "avg"}


def _stored_config(source: Path, overrides: dict) -> EncoderConfig:
    """bidir.json, else an NVIDIA llama_bidirec config's pooling, else the defaults; then the overrides."""
    stored = read_encoder_config(source) if source.is_dir() else None
    if stored is not None:
        return dataclasses.replace(stored, **overrides)
    fields, where = dict(overrides), source
    if source.is_dir() and "pooling" not in fields:
        pooling = read_config_dict(source).get("pooling")
        if pooling is not None:
            where = source / "config.json"
            fields["pooling"] = _nemo_pooling(pooling, fields.get("normalize", True), where)
    if fields.get("attention") == "causal":
        # Under causal attention only the last token has seen the whole text (Qwen3-Embedding, e5-mistral).
        fields.setdefault("pooling", "last")
    try:
        return EncoderConfig(**fields)
    except BidirError as e:
        raise BidirError(f"{where}: {e}") from None


def _nemo_pooling(pooling, normalize: bool, where: Path):
    """bidir's name for the pooling an NVIDIA config names, never one that means something else.

    NeMo's "weighted_avg" is the masked SUM of the token states, not SGPT's position-weighted mean that bidir's
    weighted_avg is. A row's sum is its mean times its (positive) token count, so once L2-normalized the two are the
    same vector: with normalization on, the sum is loaded as avg. Un-normalized, bidir has no sum to offer.
    """
    if pooling != "weighted_avg":
        return _NEMO_POOLING.get(pooling, pooling)
    if not normalize:
        raise BidirError(
            f"{where}: pooling 'weighted_avg' in an NVIDIA llama_bidirec config is a plain sum of token states, "
            "which bidir offers only L2-normalized (where it equals 'avg'); keep normalization on or pass a pooling"
        )
    warnings.warn(
        f"{where}: NVIDIA's pooling 'weighted_avg' is a plain sum of token states; L2-normalized it gives the "
        "same embeddings as 'avg', which bidir uses",
        stacklevel=4,  # the caller of from_pretrained
    )
    return "avg"
