"""The decoder families bidir runs, and the few ways they differ from Llama.

One model (model.py) runs them all; a family is a row of this table, read where the model is built or checked:

    family      config.json model_type     difference from the Llama stack
    Llama       llama, llama_bidirec       (the reference)
    Mistral     mistral                    a sliding window on every layer when sliding_window is set
    Ministral   ministral                  per-layer sliding window (layer_types)
    Ministral3  ministral3                 a query scale growing past rope original_max_position_embeddings
    Qwen2       qwen2                      bias on q/k/v (not on o); per-layer sliding window (use_sliding_window)
    Qwen3       qwen3                      RMSNorm over each head's q and k (q_norm, k_norm), before RoPE

bidir attends over the whole text, in both attention modes: no sliding window, and no Ministral3 query scale.
Both are exactly the identity for texts of at most `attention_span(config)` tokens, so an encoder whose
max_length is longer than that is refused (check_max_length), naming the config key that limits it.

The attention mode itself (bidirectional or causal) is transformers' own switch, `config.is_causal`, which
sources.open_source sets from a checkpoint's bidir.json (or the caller's choice): `is_causal_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bidir_core.errors import BidirError

ATTENTION_MODES = ("bidirectional", "causal")


@dataclass(frozen=True)
class Family:
    name: str
    """The transformers class prefix: {name}Config, {name}Model (the oracle), {name}ForCausalLM."""
    qkv_bias: bool | None = None
    """Bias on q/k/v: True always (Qwen2); None: the config's attention_bias."""
    o_bias: bool | None = None
    """Bias on o_proj: False never (Qwen2); None: the config's attention_bias."""
    qk_norm: bool = False
    """RMSNorm over the head dimension of q and k after the projections, before RoPE (Qwen3)."""
    per_layer_window: bool = False
    """The sliding window applies to the layers config.layer_types marks "sliding_attention"; otherwise (Mistral,
    Ministral3) to every layer whenever sliding_window is set, as transformers does for them."""
    query_scale: bool = False
    """Ministral3's llama_4_scaling_beta query scale (1 below original_max_position_embeddings)."""

    @property
    def hf_model(self) -> str:
        return f"{self.name}Model"


_LLAMA = Family("Llama")
FAMILIES = {
    "llama": _LLAMA,
    "llama_bidirec": _LLAMA,  # NVIDIA's bidirectional Llama embedders: Llama weights and config
    "mistral": Family("Mistral"),
    "ministral": Family("Ministral", per_layer_window=True),
    "ministral3": Family("Ministral3", query_scale=True),
    "qwen2": Family("Qwen2", qkv_bias=True, o_bias=False, per_layer_window=True),
    "qwen3": Family("Qwen3", qk_norm=True, per_layer_window=True),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise BidirError(
            f"model_type {model_type!r} is not a supported decoder (bidir loads {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def config_class(model_type: str):
    """The transformers config class of a model_type (llama_bidirec: LlamaConfig)."""
    import transformers

    return getattr(transformers, f"{FAMILIES[model_type].name}Config")


def projection_bias(config) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj) of the family, as transformers builds it."""
    family, attention_bias = family_of(config), bool(getattr(config, "attention_bias", False))
    qkv = attention_bias if family.qkv_bias is None else family.qkv_bias
    return qkv, attention_bias if family.o_bias is None else family.o_bias


def attention_span(config) -> tuple[int, str] | None:
    """(tokens, config key): the longest text whose attention bidir computes exactly as the family does, and the
    key that limits it; None when no length limits it.

    A sliding window W lets a query see the keys less than W positions before it (transformers' causal rule;
    its bidirectional one, |i - j| <= W, is wider), so it changes nothing for a text of at most W tokens.
    Ministral3 multiplies each query by 1 + beta * log(1 + floor(position / original_max_position_embeddings)),
    which is 1 for the positions of a text of at most original_max_position_embeddings tokens."""
    family, limits = family_of(config), []
    window = getattr(config, "sliding_window", None)
    if window is not None:
        layer_types = getattr(config, "layer_types", None) or ()
        if not family.per_layer_window or "sliding_attention" in layer_types:
            limits.append((int(window), "sliding_window"))
    if family.query_scale:
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("llama_4_scaling_beta"):
            original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
            limits.append((int(original), "rope_parameters.original_max_position_embeddings"))
    return min(limits) if limits else None


def check_max_length(config, max_length: int) -> None:
    """Refuse an encoder whose texts (max_length tokens) are longer than the attention_span of its config."""
    span = attention_span(config)
    if span is not None and max_length > span[0]:
        tokens, key = span
        what = "sliding window" if key == "sliding_window" else "Ministral3 query scaling past that length"
        raise BidirError(
            f"max_length={max_length} is longer than {key}={tokens}: bidir attends over whole texts (no {what}), "
            f"so longer texts would not be embedded as the model computes them; use max_length <= {tokens}"
        )


def is_causal_config(config) -> bool:
    """The attention mode a model config asks for: causal only when it says is_causal true (bidir's loaders always
    set it); a config without the key is bidirectional."""
    return getattr(config, "is_causal", False) is True


def check_attention(attention) -> str:
    if attention not in ATTENTION_MODES:
        raise BidirError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    return attention


# rope_types a Llama config can carry. longrope/proportional belong to other architectures.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def check_config(config) -> None:
    """Reject a config the model (model.py) cannot represent, with a one-line reason (before any weights are read)."""
    family_of(config)  # a model_type bidir runs
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "num_key_value_heads",  # optional (None: as many as the attention heads), as is head_dim
        "head_dim",
    ):
        value = getattr(config, name, None)
        if value is None and name in ("num_key_value_heads", "head_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BidirError(f"{name} must be a positive integer, got {value!r}")
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if n_heads % n_kv:
        raise BidirError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    if not getattr(config, "head_dim", None) and config.hidden_size % n_heads:
        raise BidirError(
            f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={n_heads}"
        )
    if config.hidden_act != "silu":
        raise BidirError(f"unsupported hidden_act {config.hidden_act!r}: Llama uses 'silu' (SwiGLU)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise BidirError(
            f"unsupported rope_type {rope_type!r}: a Llama config uses one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
