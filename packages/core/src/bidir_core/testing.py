"""Tiny random models of every supported family (Llama, Mistral, Ministral, Ministral3, Qwen2, Qwen3) and a tiny
tokenizer, built locally (no download), for every package's tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, PreTrainedTokenizerFast

from bidir_core.checkpoint import EncoderConfig
from bidir_core.cross_encoder import CrossEncoder, new_score_head
from bidir_core.encoder import BiEncoder
from bidir_core.families import config_class
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.reranker_config import RerankerConfig

# A fixed corpus for the tiny tokenizer's BPE merges: any text still tokenizes (byte-level fallback).
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "query: how do i sort a list in python",
    "passage: return a new sorted list from the items in iterable",
    "bidirectional attention lets every token see the past and the future",
    "embeddings for semantic search and dense retrieval",
    "a llama checkpoint turned into an embedding model",
]
TINY_VOCAB_SIZE = 320

# Synthetic texts for tests and benchmarks: a small vocabulary that the tiny tokenizer splits into varied token counts.
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "embeddings", "search", "dense",
         "passages", "at", "night")  # fmt: skip


def random_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """n texts of 1..max_words WORDS each, seeded, in shuffled (not sorted) length order."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 320) with <pad>=0, <s>=1 (prepended, as Llama does), </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


# What a family's tiny config sets beyond the shared fields (transformers' defaults are sized for the real models).
FAMILY_OVERRIDES = {
    "llama": {},
    "mistral": {"sliding_window": 4096},  # as e5-mistral / Mistral-7B-v0.1: longer than any tiny text
    "ministral": {"head_dim": 16, "sliding_window": 4096},
    # Ministral3's yarn RoPE with its Llama-4 query scale, which starts after original_max_position_embeddings
    "ministral3": {
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "llama_4_scaling_beta": 0.1,
        },
    },
    "qwen2": {},  # q/k/v bias is the family's own
    "qwen3": {"head_dim": 32},  # N x D = 128, wider than hidden 64, as in the real Qwen3 models
}


def tiny_config(family: str = "llama", *, causal: bool = False, **overrides) -> LlamaConfig:
    """A 2-layer model of family (a model_type of families.FAMILIES) with grouped-query attention (4 query heads,
    2 KV heads), hidden 64; is_causal as given (bidirectional by default)."""
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,  # larger than Llama's 0.02 so attention patterns (and bugs) show in the outputs
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(FAMILY_OVERRIDES[family], **overrides)
    config = config_class(family)(**fields)
    config.is_causal = causal
    return config


def tiny_model(config: LlamaConfig | None = None, seed: int = 0) -> LlamaBidirectionalModel:
    torch.manual_seed(seed)
    model = LlamaBidirectionalModel(config or tiny_config())
    for name, p in model.named_parameters():  # random norms too, so a wrong norm placement is visible
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model.eval()


def tiny_encoder(
    config: EncoderConfig | None = None, seed: int = 0, family: str = "llama", **model_overrides
) -> BiEncoder:
    """A tiny BiEncoder of family; its attention mode is config's (bidirectional by default)."""
    causal = config is not None and config.attention == "causal"
    model = tiny_model(tiny_config(family, causal=causal, **model_overrides), seed=seed)
    return BiEncoder(model, tiny_tokenizer(), config)


def tiny_cross_encoder(
    config: RerankerConfig | None = None, seed: int = 0, family: str = "llama", **model_overrides
) -> CrossEncoder:
    """A tiny CrossEncoder of family with a random head (seeded); its attention mode is config's (bidirectional,
    avg pooling and NeMo's template by default)."""
    config = config or RerankerConfig()
    model = tiny_model(tiny_config(family, causal=config.attention == "causal", **model_overrides), seed=seed)
    return CrossEncoder(model, tiny_tokenizer(), config, new_score_head(model.config, seed=seed))


def write_hf_model(
    folder: str | Path,
    *,
    family: str = "llama",
    causal_lm: bool = True,
    classifier: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """A random transformers {Family}ForCausalLM (or {Family}Model; or with classifier=True a one-label
    {Family}ForSequenceClassification, a reranker) saved with its tokenizer, as a user's folder would be: the
    source side of every loading test. Returns the folder."""
    import transformers

    folder = Path(folder)
    config = tiny_config(family, **config_overrides)
    config.is_causal = True  # as a stock causal checkpoint says
    torch.manual_seed(seed)
    name = config_class(family).__name__.removesuffix("Config")
    if classifier:
        config.num_labels = 1
        model = getattr(transformers, f"{name}ForSequenceClassification")(config)
    else:
        model = getattr(transformers, f"{name}ForCausalLM" if causal_lm else f"{name}Model")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


write_hf_llama = write_hf_model  # family="llama" by default


def write_nvidia_llama_bidirec(
    folder: str | Path,
    *,
    pooling: str = "avg",
    marker: str | Path | None = None,
    seed: int = 0,
    reranker: bool = False,
    temperature: float = 0.02,
) -> Path:
    """A folder laid out as NVIDIA ships its llama_bidirec embedders (e.g. nvidia/llama-nemotron-embed-1b-v2):
    LlamaModel keys without a `model.` prefix; config.json with model_type llama_bidirec, NeMo's `pooling` name and
    `temperature`, and an `auto_map` naming llama_bidirectional_model.py beside it; a standard tokenizer_class.
    reranker=True: as its rerankers (nvidia/llama-nemotron-rerank-1b-v2): architectures
    LlamaBidirectionalForSequenceClassification, one label, weights `model.*` and the head `score.weight`.

    The .py file is a trap: importing it writes `marker` (when given) and raises, so a test sees whether a loader
    ran the folder's code. Returns the folder."""
    import json

    folder = write_hf_llama(folder, causal_lm=False, classifier=reranker, seed=seed)
    config = json.loads((folder / "config.json").read_text())
    architecture = "LlamaBidirectionalForSequenceClassification" if reranker else "LlamaBidirectionalModel"
    config.update(
        model_type="llama_bidirec",
        architectures=[architecture],
        auto_map={
            "AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
            "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel",
        }
        | (
            {"AutoModelForSequenceClassification": f"llama_bidirectional_model.{architecture}"}
            if reranker
            else {}
        ),
        pooling=pooling,
        temperature=temperature,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    trap = f"open({str(marker)!r}, 'w').write('ran')\n" if marker is not None else ""
    (folder / "llama_bidirectional_model.py").write_text(
        f"{trap}raise RuntimeError('the folder code of {folder.name} was run')\n"
    )
    return folder
