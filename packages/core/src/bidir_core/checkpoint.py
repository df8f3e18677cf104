"""The checkpoint artifact: a Hugging Face decoder folder plus bidir.json and
sentence-transformers metadata, so the folder loads in bidir, in transformers (`AutoModel`: a LlamaModel,
MistralModel, Qwen2Model, ... that attends as bidir does) and in sentence-transformers without bidir.

    config.json                 the family's stock fields; is_causal: false (or true, for attention "causal")
    model.safetensors           {Family}Model keys (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer files
    bidir.json                  EncoderConfig + format_version
    modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/, [2_Normalize/]

A reranker checkpoint (write_reranker, CrossEncoder.save_pretrained) is a {Family}ForSequenceClassification folder
instead: `model.*` decoder keys and the head `score.weight`, one label, bidir.json with "kind": "reranker" and the
RerankerConfig; read_settings reads either kind.

A folder is written under a temporary name and renamed when complete, so a folder with this name is never
half-written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bidir_core.errors import BidirError, one_line
from bidir_core.families import check_attention, family_of
from bidir_core.folders import (
    TOKENIZER_FILES,
    finish_interrupted_publish,
    publish_folder,
    start_writing,
    unknown_files,
)
from bidir_core.jsonfile import parse_fields, read_versioned_json
from bidir_core.pooling import check_pooling
from bidir_core.reranker_config import RERANKER, RerankerConfig, template_parts

FORMAT_VERSION = 1
BIDIR_JSON = "bidir.json"
EMBEDDER = "embedder"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class EncoderConfig:
    """How a BiEncoder turns token states into embeddings; stored in a checkpoint's bidir.json."""

    pooling: str = "avg"
    """One of avg, cls, last, weighted_avg (bidir_core.pooling)."""
    normalize: bool = True
    """L2-normalize embeddings (after Matryoshka truncation), so dot product is cosine similarity."""
    query_prefix: str = "query: "
    """Prepended by encode_queries; an instruction ("Instruct: ...\\nQuery: ") is a prefix too."""
    passage_prefix: str = "passage: "
    """Prepended by encode_documents."""
    matryoshka_dims: tuple[int, ...] = ()
    """Dimensions the model was trained to be truncated to (informational; encode(dim=...) takes any <= hidden)."""
    max_length: int = 512
    """Texts longer than this many tokens are truncated (and counted)."""
    attention: str = "bidirectional"
    """bidirectional (every token sees the whole text) or causal (each token sees the ones before it, as the
    model was pretrained: Qwen3-Embedding, e5-mistral; pair it with pooling "last"). config.json's is_causal says
    the same, for transformers and sentence-transformers. In memory the model config's is_causal is the record
    (bidir_core.sources.ModelSource says why); this field is its form in bidir.json and export manifests."""

    def __post_init__(self):
        check_pooling(self.pooling)
        check_attention(self.attention)
        if not isinstance(self.normalize, bool):
            raise BidirError(f"normalize must be true or false, got {self.normalize!r}")
        for name in ("query_prefix", "passage_prefix"):
            if not isinstance(getattr(self, name), str):
                raise BidirError(f"{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise BidirError(f"max_length must be a positive integer, got {self.max_length!r}")
        if not isinstance(self.matryoshka_dims, (list, tuple)):
            raise BidirError(f"matryoshka_dims must be a list of integers, got {self.matryoshka_dims!r}")
        dims = tuple(self.matryoshka_dims)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise BidirError(f"matryoshka_dims must be positive integers, got {list(dims)}")
        object.__setattr__(self, "matryoshka_dims", dims)

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **dataclasses.asdict(self),
            "matryoshka_dims": list(self.matryoshka_dims),
        }


# bidir.json's `kind`: what the checkpoint's model is, and the settings class that describes it. An embedder's
# bidir.json may have no kind key (every one written before rerankers existed).
SETTINGS_KINDS = {EMBEDDER: EncoderConfig, RERANKER: RerankerConfig}


def read_settings(folder: Path) -> EncoderConfig | RerankerConfig | None:
    """The one reader of bidir.json: the settings of the kind it names (EncoderConfig for an embedder, the
    default; RerankerConfig for "kind": "reranker"), or None when the folder has none (a plain Llama folder)."""
    path = folder / BIDIR_JSON
    if not path.is_file():
        return None
    raw = read_versioned_json(path, FORMAT_VERSION)
    kind = raw.pop("kind", EMBEDDER)
    if kind not in SETTINGS_KINDS:
        raise BidirError(f"{path}: unknown kind {kind!r} (known: {', '.join(SETTINGS_KINDS)})")
    settings_class = SETTINGS_KINDS[kind]
    known = {f.name for f in dataclasses.fields(settings_class)}
    for key in raw:
        if key not in known:
            raise BidirError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known | {'kind'}))})")
    return parse_fields(path, lambda: settings_class(**raw))


def read_encoder_config(folder: Path) -> EncoderConfig | None:
    """An embedder checkpoint's settings (read_settings), None without bidir.json; a reranker's is refused."""
    settings = read_settings(folder)
    if isinstance(settings, RerankerConfig):
        raise BidirError(f"{folder}: is a reranker ({BIDIR_JSON} kind {RERANKER!r}), not an embedder")
    return settings


def _config_json(config, causal: bool, dtype: torch.dtype) -> dict:
    # The family's fields only (no generic runtime switches such as return_dict or output_attentions); use_cache
    # off: an encoder has no generation cache, and transformers would otherwise build one on every forward.
    # is_causal is transformers' own switch (it picks the mask), so AutoModel attends as the model does.
    model_type = "llama" if config.model_type == "llama_bidirec" else config.model_type
    architectures = [family_of(config).hf_model]
    config = config.to_diff_dict()
    config.update(model_type=model_type, architectures=architectures, is_causal=causal, use_cache=False)
    config["dtype"] = str(dtype).removeprefix("torch.")
    # transformers >= 5 reads rope_parameters; older readers (and other tools) read rope_theta / rope_scaling and
    # would silently fall back to theta=10000 without them.
    rope = dict(config.get("rope_parameters") or {})
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    return config


def _write_weights(folder: Path, state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sentence_transformers(folder: Path, hidden_size: int, cfg: EncoderConfig) -> None:
    # Module type names use sentence_transformers.models.*, which every release from 2.x on resolves.
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    _write_json(
        folder / "sentence_bert_config.json", {"max_seq_length": cfg.max_length, "do_lower_case": False}
    )
    _write_json(
        folder / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": cfg.pooling == "cls",
            "pooling_mode_mean_tokens": cfg.pooling == "avg",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": cfg.pooling == "weighted_avg",
            "pooling_mode_lasttoken": cfg.pooling == "last",
            "include_prompt": True,  # bidir pools over the prefix tokens too
        },
    )
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": {"query": cfg.query_prefix, "document": cfg.passage_prefix},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def write_checkpoint(
    target: str | Path,
    model,
    tokenizer,
    encoder_config: EncoderConfig,
    *,
    overwrite: bool = False,
    exist_ok: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the checkpoint artifact of `model` (a LlamaBidirectionalModel) to target, atomically.

    An existing non-empty target is an error, unless overwrite=True and it is a bidir checkpoint holding only the
    files a checkpoint has (check_replaceable; a plain Hugging Face folder, possibly the source, is never
    replaced), which is then swapped for the new one; exist_ok=True keeps an existing complete checkpoint instead
    (a concurrent import finished first).
    Temporary folders that killed writes left beside target are removed first (folders.remove_stale_temps), and
    a write killed while replacing target is finished before target is checked, so the checks above see what is
    really there. An OSError while writing (a full disk) is a BidirError naming target, with nothing left there.
    """
    return write_weights(
        target,
        model.config,
        model.state_dict(),
        tokenizer,
        encoder_config,
        causal=model.causal,
        overwrite=overwrite,
        exist_ok=exist_ok,
        max_shard_bytes=max_shard_bytes,
    )


def write_weights(
    target: str | Path,
    config,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    encoder_config: EncoderConfig,
    *,
    causal: bool,
    overwrite: bool = False,
    exist_ok: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """write_checkpoint of a model given as its config and {Family}Model state dict (the tensors as they are: no
    model is built, so nothing checks them against the config here), attending causally or not."""
    _check_attention(target, causal, encoder_config)

    def fill(tmp: Path) -> None:
        dtype = state_dict["embed_tokens.weight"].dtype  # the model's dtype: its first parameter's
        _write_json(tmp / "config.json", _config_json(config, causal, dtype))
        _write_weights(tmp, state_dict, max_shard_bytes)
        tokenizer.save_pretrained(tmp)
        _write_sentence_transformers(tmp, config.hidden_size, encoder_config)
        _write_json(tmp / BIDIR_JSON, encoder_config.to_json())

    return _write_folder(target, fill, overwrite=overwrite, exist_ok=exist_ok)


def write_reranker(
    target: str | Path,
    model,
    score: torch.Tensor,
    tokenizer,
    reranker_config: RerankerConfig,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a reranker checkpoint, atomically and with write_checkpoint's rules for an existing target: a
    Hugging Face {Family}ForSequenceClassification folder (config.json with one label and the tokenizer's pad
    token, which transformers finds the last real token by; weights `model.*` and the head `score.weight`
    (1, H), fp32) plus the tokenizer and bidir.json (the RerankerConfig, kind "reranker")."""
    _check_attention(target, model.causal, reranker_config)
    if tuple(score.shape) != (1, model.config.hidden_size):
        raise BidirError(
            f"{Path(target).expanduser()}: not written: the score head has shape {list(score.shape)}, "
            f"expected [1, {model.config.hidden_size}]"
        )

    def fill(tmp: Path) -> None:
        decoder = model.state_dict()
        dtype = decoder["embed_tokens.weight"].dtype
        config = _config_json(model.config, model.causal, dtype)
        config.update(
            architectures=[family_of(model.config).name + "ForSequenceClassification"],
            id2label={"0": "LABEL_0"},  # one label: transformers' num_labels, stored as it writes it
            label2id={"LABEL_0": 0},
            pad_token_id=tokenizer.pad_token_id,
        )
        _write_json(tmp / "config.json", config)
        # The head in fp32 whatever the decoder's dtype: a reranker computes it in fp32 (transformers casts it to
        # the dtype it loads the model in).
        weights = {f"model.{k}": v for k, v in decoder.items()} | {"score.weight": score.float()}
        _write_weights(tmp, weights, max_shard_bytes)
        tokenizer.save_pretrained(tmp)
        chat_template = _pair_chat_template(reranker_config, tokenizer)
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        _write_json(
            tmp / BIDIR_JSON,
            {"format_version": FORMAT_VERSION, "kind": RERANKER, **dataclasses.asdict(reranker_config)},
        )

    return _write_folder(target, fill, overwrite=overwrite)


def _pair_chat_template(config: RerankerConfig, tokenizer) -> str | None:
    """A chat template that renders a pair given as messages of roles "query" and "document" (how
    sentence-transformers' CrossEncoder hands a pair to a model with a chat template) to the text bidir reads: the
    special tokens the tokenizer adds around a text, then the formatted pair. sentence-transformers tokenizes the
    rendered text without adding special tokens, so it reads bidir's tokens. Checked on a probe pair; None (no
    template written) when the rendering does not tokenize as bidir does."""
    plain = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x")
    at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), None)
    if at is None:
        return None
    role = 'messages | selectattr("role", "eq", "{}") | map(attribute="content") | first'
    fields = {"query": role.format("query"), "passage": role.format("document")}

    def text(literal: str) -> str:  # a literal as a Jinja string expression: no Jinja syntax inside it is run
        return f"{{{{ {json.dumps(literal, ensure_ascii=False)} }}}}" if literal else ""

    # the special tokens before a text (Llama's <s>) and after it, as text, around the formatted pair
    chat_template = text(tokenizer.decode(full[:at]))
    for literal, field in template_parts(config.template):
        chat_template += text(literal) + (f"{{{{ {fields[field]} }}}}" if field else "")
    chat_template += text(tokenizer.decode(full[at + len(plain) :]))
    probe = [{"role": "query", "content": "a {q}"}, {"role": "document", "content": "b {{p}}"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, chat_template=chat_template, tokenize=False)
    except Exception:  # noqa: BLE001 (a tokenizer that cannot render: no template, as before)
        return None
    if tokenizer.encode(rendered, add_special_tokens=False) != tokenizer.encode(
        config.format("a {q}", "b {{p}}")
    ):
        return None
    return chat_template


def _check_attention(target: str | Path, causal: bool, settings: EncoderConfig | RerankerConfig) -> None:
    if causal != (settings.attention == "causal"):
        what = "reranker" if isinstance(settings, RerankerConfig) else "encoder"
        raise BidirError(
            f"{Path(target).expanduser()}: not written: the model attends "
            f"{'causally' if causal else 'bidirectionally'} but the {what} config says "
            f"attention={settings.attention!r}"
        )


def _write_folder(target: str | Path, fill, *, overwrite: bool, exist_ok: bool = False) -> Path:
    """Publish the folder fill(tmp) writes at target (write_checkpoint says how an existing target is treated)."""
    target = Path(target).expanduser()
    finish_interrupted_publish(target)
    if target.exists() and not target.is_dir():
        raise BidirError(f"{target}: exists and is not a folder")
    complete = (target / BIDIR_JSON).is_file()
    occupied = target.is_dir() and any(target.iterdir())
    if occupied and exist_ok and complete:
        return target
    if occupied and not overwrite:
        raise BidirError(f"{target}: exists and is not empty (pass overwrite to replace it)")
    if occupied:
        check_replaceable(target)

    tmp = start_writing(target)
    try:
        fill(tmp)
        _publish(tmp, target, exist_ok)
    except OSError as e:  # a full disk, a quota: one line naming the checkpoint; nothing is left at target
        raise BidirError(f"{target}: not written: {e.strerror or one_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place
    return target


# What write_checkpoint writes (fnmatch patterns): a folder holding anything else is not replaced.
CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        BIDIR_JSON,
        "model.safetensors",
        "model-*-of-*.safetensors",
        "model.safetensors.index.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
    }
    | TOKENIZER_FILES
)


def check_replaceable(folder: Path) -> None:
    """Refuse to replace folder unless it is a bidir checkpoint (a readable bidir.json and config.json) holding
    only files a checkpoint has: a plain Hugging Face folder, possibly the source, or a checkpoint someone added
    files to, is never deleted."""
    refusing = f"{folder}: exists and is not a bidir checkpoint"
    if not (folder / BIDIR_JSON).is_file() or not (folder / "config.json").is_file():
        raise BidirError(f"{refusing} (no {BIDIR_JSON} and config.json); refusing to replace it")
    try:
        read_settings(folder)
    except BidirError as e:
        raise BidirError(f"{refusing} ({one_line(e)}); refusing to replace it") from None
    if unknown := unknown_files(folder, CHECKPOINT_FILES):
        raise BidirError(
            f"{folder}: holds {unknown[0]}"
            + (f" and {len(unknown) - 1} more file(s)" if len(unknown) > 1 else "")
            + ", which a bidir checkpoint does not have; refusing to replace it"
        )


def _publish(tmp: Path, target: Path, exist_ok: bool) -> None:
    """Rename the finished folder into place (publish_folder: the target is always a complete checkpoint); with
    exist_ok, a complete checkpoint another process published first is kept instead."""
    if exist_ok and (target / BIDIR_JSON).is_file():
        return  # another process finished the same import first
    try:
        publish_folder(tmp, target)
    except OSError:
        if exist_ok and (target / BIDIR_JSON).is_file():
            return  # lost a race to a complete import: fine
        raise
