"""What a model argument can name, opened once: the one dispatch over bidir's input formats.

    source = open_source("./ckpt")          # resolves the name, reads config.json and bidir.json (once each)
    source.config, source.encoder_config()  # the model config; the encoder settings
    source.tokenizer(), source.read_weights(torch.bfloat16)   # read when asked for

Sources: a Hugging Face folder of a supported family (families.py: Llama, Mistral, Ministral, Ministral3, Qwen2,
Qwen3; ForCausalLM, ForSequenceClassification or the base model; one or sharded safetensors, or
pytorch_model.bin), an NVIDIA `llama_bidirec` folder (an embedder or a reranker), a bidir checkpoint (a Hugging
Face folder too; an embedder's or a reranker's), a .gguf file, or the name of the embedded default model. Its
`kind` says which model it holds: an embedder (BiEncoder) or a reranker (CrossEncoder). Each format has its reader
(hf_folder.py, gguf_import.py, embedded.py); a new input format gets its own reader module and a branch in
open_source. A ModelSource is handed to whatever builds from it
(LlamaBidirectionalModel.from_pretrained, BiEncoder.from_pretrained, the trainer's loader, the torch backend,
export), so no file of a source is read twice for one load.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig

from bidir_core.checkpoint import EMBEDDER, EncoderConfig, read_settings
from bidir_core.embedded import EMBEDDED_DEFAULT, embedded_checkpoint
from bidir_core.errors import BidirError
from bidir_core.families import check_attention, check_max_length, is_causal_config
from bidir_core.folders import interrupted_publish_hint
from bidir_core.gguf_import import gguf_config, read_gguf, read_gguf_tensor
from bidir_core.hf_folder import (
    build_config,
    read_config_dict,
    read_lm_head,
    read_state_dict,
    stored_attention,
)
from bidir_core.reranker_config import RERANKER, RerankerConfig
from bidir_core.tokenization import load_tokenizer

FORMATS = ("checkpoint", "huggingface", "llama_bidirec", "gguf", "embedded")
"""How a source is stored: a bidir checkpoint (a bidir.json), another Hugging Face folder, an NVIDIA llama_bidirec
folder, a .gguf file, or the embedded default (read from its cached checkpoint)."""
MODEL_KINDS = (EMBEDDER, RERANKER)
"""What a source's model is (ModelSource.kind): an embedder (a decoder whose states are pooled: BiEncoder) or a
reranker (the same plus a one-logit head, `score.weight`: CrossEncoder). A bidir checkpoint names its kind in
bidir.json; a Hugging Face folder is a reranker when config.json's architectures is a *ForSequenceClassification
with one label (NVIDIA's LlamaBidirectionalForSequenceClassification too). Everything else is an embedder, which
CrossEncoder loads only with a new head."""
SCORE_KEY = "score.weight"
"""A reranker's head in its weights: transformers' *ForSequenceClassification `score`, (1, H), no bias."""


@dataclass(frozen=True)
class ModelSource:
    """A source opened once: where it is, how it is stored, what model it is, its model config and stored encoder
    settings; its tokenizer and weights are read on demand.

    The attention mode has one record in memory, `config.is_causal`, and EncoderConfig.attention is only its form
    on disk (bidir.json, export manifests). The model config rather than the settings, because every user of a
    model has it and not every one has settings: the model's forward reads it (LlamaBidirectionalModel.causal),
    the trainer and MNTP build a model before or without an EncoderConfig, and transformers and
    sentence-transformers read config.json's is_causal. The settings keep the field because an ONNX export or a
    TensorRT engine carries them without a model config. So encoder_config() copies the mode from the config,
    never the other way, and with_attention is the one way to change it."""

    name: str
    """What the caller named: the path as given, or the embedded default's name (messages, export manifests)."""
    path: Path
    """The folder or .gguf file read (the embedded default: its cached checkpoint)."""
    format: str
    """How the model is stored: one of FORMATS."""
    config: LlamaConfig
    """The family's transformers config (LlamaConfig, Qwen2Config, ...), checked; is_causal is the attention mode."""
    stored: EncoderConfig | RerankerConfig | None = None
    """The settings the source stores (a checkpoint's bidir.json: an embedder's or a reranker's), or None."""
    config_pooling: str | None = None
    """A folder without bidir.json: its config.json `pooling` (NVIDIA llama_bidirec folders name theirs there, in
    NeMo's terms), or None."""
    config_temperature: float | None = None
    """An NVIDIA llama_bidirec reranker folder: its config.json `temperature` (the logit is divided by it), or None."""
    kind: str = EMBEDDER
    """What the model is for: one of MODEL_KINDS."""

    @property
    def attention(self) -> str:
        return "causal" if is_causal_config(self.config) else "bidirectional"

    @property
    def config_file(self) -> Path:
        """The file the model config came from, for errors: config.json of a folder, else the .gguf file."""
        return self.path if self.format == "gguf" else self.path / "config.json"

    def with_attention(self, attention: str | None) -> ModelSource:
        """This source attending as given (None: as it is); the files are not read again."""
        if attention is None or check_attention(attention) == self.attention:
            return self
        config = copy.deepcopy(self.config)
        config.is_causal = attention == "causal"
        return dataclasses.replace(self, config=config)

    def encoder_config(
        self,
        given: EncoderConfig | None = None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        max_length: int | None = None,
        matryoshka_dims: Sequence[int] | None = None,
    ) -> EncoderConfig:
        """The encoder settings: given (e.g. an export manifest's), else the source's own (bidir.json; else a
        config.json `pooling` in NeMo's meaning, see _nemo_pooling; else the defaults, with pooling "last" under
        causal attention), with the arguments that are not None; attention is the source's. Checked against the
        model config (a max_length its attention cannot cover), in one line naming the file. A reranker source is
        refused: its head would be dropped."""
        if self.kind == RERANKER:
            raise BidirError(f"{self.name}: is a reranker; load it with CrossEncoder")
        overrides = {
            "pooling": pooling,
            "normalize": normalize,
            "query_prefix": query_prefix,
            "passage_prefix": passage_prefix,
            "max_length": max_length,
            "matryoshka_dims": tuple(matryoshka_dims) if matryoshka_dims is not None else None,
        }
        fields = {k: v for k, v in overrides.items() if v is not None} | {"attention": self.attention}
        if given is not None or self.stored is not None:
            settings = dataclasses.replace(given or self.stored, **fields)
        else:
            where = self.path
            if self.config_pooling is not None and "pooling" not in fields:
                where = self.path / "config.json"
                fields["pooling"] = _nemo_pooling(self.config_pooling, fields.get("normalize", True), where)
            if self.attention == "causal":
                # Under causal attention only the last token has seen the whole text (Qwen3-Embedding, e5-mistral).
                fields.setdefault("pooling", "last")
            try:
                settings = EncoderConfig(**fields)
            except BidirError as e:
                raise BidirError(f"{where}: {e}") from None
        try:
            check_max_length(self.config, settings.max_length)
        except BidirError as e:
            raise BidirError(f"{self.config_file}: {e}") from None
        return settings

    def reranker_config(
        self,
        given: RerankerConfig | None = None,
        *,
        template: str | None = None,
        pooling: str | None = None,
        temperature: float | None = None,
        max_length: int | None = None,
    ) -> RerankerConfig:
        """The reranker settings: given, else the source's own (a reranker checkpoint's bidir.json; an NVIDIA
        reranker's config.json pooling and temperature; "last" pooling for a Hugging Face *ForSequenceClassification
        folder, as transformers pools; an embedder checkpoint's pooling and max_length; else the defaults, with
        pooling "last" under causal attention), with the arguments that are not None; attention is the source's.
        Checked against the model config, in one line naming the file."""
        overrides = {
            "template": template,
            "pooling": pooling,
            "temperature": temperature,
            "max_length": max_length,
        }
        fields = {k: v for k, v in overrides.items() if v is not None} | {"attention": self.attention}
        where = self.path
        if given is None and isinstance(self.stored, RerankerConfig):
            given = self.stored
        if given is None and self.kind == RERANKER and self.format == "llama_bidirec":
            where = self.path / "config.json"
            if self.config_pooling is not None and "pooling" not in fields:
                fields["pooling"] = _nemo_reranker_pooling(self.config_pooling, where)
            if self.config_temperature is not None:
                fields.setdefault("temperature", self.config_temperature)
        elif given is None and self.kind == RERANKER:
            fields.setdefault(
                "pooling", "last"
            )  # transformers' *ForSequenceClassification: the last real token
        elif given is None and isinstance(self.stored, EncoderConfig):
            # An embedder checkpoint (a reranker is often trained from one): its pooling and length carry over.
            fields.setdefault("pooling", self.stored.pooling)
            fields.setdefault("max_length", self.stored.max_length)
        if self.attention == "causal" and given is None:
            fields.setdefault("pooling", "last")  # only the last token has seen the whole pair
        try:
            settings = dataclasses.replace(given, **fields) if given is not None else RerankerConfig(**fields)
        except BidirError as e:
            raise BidirError(f"{where}: {e}") from None
        try:
            check_max_length(self.config, settings.max_length)
        except BidirError as e:
            raise BidirError(f"{self.config_file}: {e}") from None
        return settings

    def tokenizer(self):
        """The source's tokenizer, loaded now (with a pad token and right padding)."""
        return load_tokenizer(self.path, llama_bidirec=self.format == "llama_bidirec")

    def read_weights(self, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Path] | Path]:
        """(state dict in dtype under {Family}Model keys, where): `where` is the file each key came from (a folder)
        or the source itself, for errors. Not yet checked against the model: bidir_core.model does that. A
        reranker's head is left out (read_weights_and_head gives it)."""
        return self.read_weights_and_head(dtype)[:2]

    def read_weights_and_head(
        self, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], dict[str, Path] | Path, torch.Tensor | None]:
        """read_weights, and the head SCORE_KEY (in the dtype it is stored in, since a reranker computes it in
        fp32; None when the source has none) taken out of the state dict, each file read once; `where` still
        names the head's file. The head's shape is checked by the caller (bidir_core.cross_encoder)."""
        if self.format == "gguf":
            return read_gguf(self.path, dtype)[1], self.path, None
        state_dict, origin = read_state_dict(self.path, dtype, keep_dtype=frozenset({SCORE_KEY}))
        head = state_dict.pop(SCORE_KEY, None)
        return state_dict, origin or self.path, head

    def read_lm_head(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The LM head (vocab, hidden) of a source whose head is not its input embeddings (lm_head.weight of a
        Hugging Face folder, output.weight of a GGUF file), in dtype; None when the source has none (tied, or an
        embedder). An embedder never needs it; MNTP adaptation predicts tokens through it."""
        return load_lm_head(self.path, dtype)


def resolve_source(path_or_name: str | Path) -> Path:
    """A folder or .gguf path; the embedded default name resolves to its cached checkpoint (imported once)."""
    if str(path_or_name) == EMBEDDED_DEFAULT:
        return embedded_checkpoint()
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise BidirError(
            f"{path}: no such file or folder (expected a Llama checkpoint folder, a .gguf file or {EMBEDDED_DEFAULT!r})"
            + interrupted_publish_hint(path)
        )
    if path.is_file() and path.suffix != ".gguf":
        raise BidirError(f"{path}: not a checkpoint folder or a .gguf file")
    return path


def open_source(source: str | Path | ModelSource, attention: str | None = None) -> ModelSource:
    """Resolve a model argument and read its description: config.json and bidir.json once each (a folder), or the
    GGUF metadata. attention "bidirectional" or "causal"; None: the source's own (a checkpoint's bidir.json, whose
    config.json must agree; any other source is bidirectional). An opened source is returned as it is (attending
    as given)."""
    if isinstance(source, ModelSource):
        return source.with_attention(attention)
    path = resolve_source(source)
    attention = None if attention is None else check_attention(attention)
    name = str(source)
    if path.suffix == ".gguf":
        config = gguf_config(path)
        config.is_causal = attention == "causal"
        return ModelSource(name, path, "gguf", config)
    stored = read_settings(path)  # first: a checkpoint's settings are checked before its model config
    raw = read_config_dict(path)
    own = stored_attention(path, raw, stored)  # also checks that a checkpoint's two files agree
    fmt = "llama_bidirec" if raw["model_type"] == "llama_bidirec" else "huggingface"
    kind = _folder_kind(path, raw)
    if stored is None and kind == RERANKER and fmt == "huggingface" and raw.get("is_causal") is not False:
        # A stock *ForSequenceClassification was trained (and runs in transformers) causally.
        own = "causal"
    config = build_config(path, raw, own if attention is None else attention)
    if name == EMBEDDED_DEFAULT:
        return ModelSource(name, path, "embedded", config, stored)
    if stored is not None:
        kind = RERANKER if isinstance(stored, RerankerConfig) else EMBEDDER
        return ModelSource(name, path, "checkpoint", config, stored, kind=kind)
    temperature = raw.get("temperature") if kind == RERANKER and fmt == "llama_bidirec" else None
    return ModelSource(
        name, path, fmt, config, config_pooling=raw.get("pooling"), kind=kind, config_temperature=temperature
    )


def _folder_kind(folder: Path, raw: dict) -> str:
    """RERANKER for a config.json whose architectures is a *ForSequenceClassification (one label: a relevance
    logit; transformers stores num_labels as id2label, and its default is 2), else EMBEDDER."""
    architectures = raw.get("architectures") or []
    classifier = next(
        (a for a in architectures if isinstance(a, str) and a.endswith("ForSequenceClassification")), None
    )
    if classifier is None:
        return EMBEDDER
    id2label = raw.get("id2label")
    labels = len(id2label) if isinstance(id2label, dict) else raw.get("num_labels", 2)
    if labels != 1:
        raise BidirError(
            f"{folder / 'config.json'}: {classifier} with {labels} labels; a reranker has one (its relevance logit)"
        )
    return RERANKER


def load_lm_head(path_or_name: str | Path, dtype: torch.dtype) -> torch.Tensor | None:
    """ModelSource.read_lm_head of a source named by its path, without opening the rest of it."""
    path = resolve_source(path_or_name)
    if path.suffix == ".gguf":
        return read_gguf_tensor(path, "output.weight", dtype)
    return read_lm_head(path, dtype)


def _nemo_reranker_pooling(pooling, where: Path) -> str:
    """bidir's pooling for an NVIDIA reranker config's `pooling`: NeMo's LlamaBidirectionalForSequenceClassification
    pools avg, cls or last and falls back to cls for any other name, which is refused here rather than guessed."""
    if pooling not in ("avg", "cls", "last"):
        raise BidirError(
            f"{where}: pooling {pooling!r} is not one NeMo's reranker pools by (avg, cls, last); pass a pooling"
        )
    return pooling


# NVIDIA llama_bidirec configs name their pooling in NeMo's terms: its "mean" is our "avg".
_NEMO_POOLING = {"mean": "avg"}


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
        stacklevel=4,  # the caller of BiEncoder.from_pretrained (through ModelSource.encoder_config)
    )
    return "avg"
