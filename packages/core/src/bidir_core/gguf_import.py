"""Importing a llama.cpp GGUF file: config from its metadata, weights dequantized to float, HF key names.

llama.cpp's converter permutes the rows of the Q and K projections (it pairs rotary dimensions as (0,1),(2,3)...,
where Hugging Face rotates halves (0,D/2),(1,D/2+1)...); we undo that permutation on import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig

from bidir_core.errors import BidirError, one_line
from bidir_core.families import check_config

# GGUF tensor name inside block i -> LlamaModel key inside layers.i
_BLOCK_KEYS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_KEYS = {"token_embd": "embed_tokens", "output_norm": "norm"}


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise BidirError(f"{path}: reading GGUF files needs the gguf package: pip install gguf") from None

    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError for a bad magic, others for truncation
        raise BidirError(f"{path}: not a readable GGUF file ({one_line(e)})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(path: Path, reader=None) -> LlamaConfig:
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise BidirError(f"{path}: GGUF architecture {arch!r} is not 'llama'")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise BidirError(
            f"{path}: llama3-style rope_freqs in GGUF are not supported; convert from the HF checkpoint"
        )

    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise BidirError(f"{path}: GGUF metadata key llama.{key} is missing")
        return value

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
    rope = {"rope_type": "default", "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0))}
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(need("rope.scaling.factor")))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(need("rope.scaling.original_context_length"))
    elif scaling not in (None, "none"):
        raise BidirError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    if vocab is None:
        raise BidirError(f"{path}: GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    fields = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // n_heads)),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        is_causal=False,
    )
    try:
        config = LlamaConfig(**fields)
        check_config(config)
    except BidirError as e:
        raise BidirError(f"{path}: {e}") from None
    except Exception as e:  # transformers validates the config; several types, some multi-line
        raise BidirError(f"{path}: GGUF metadata is not a valid Llama config ({one_line(e)})") from None
    return config


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation: rows are (head, D/2, pair) there, (head, pair, D/2) in HF."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_key(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")  # suffix: weight / bias
    if base in _TOP_KEYS:
        return f"{_TOP_KEYS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_KEYS:
        return f"layers.{parts[1]}.{_BLOCK_KEYS[parts[2]]}.{suffix}"
    return None  # output.weight (the LM head) and anything an embedder does not use


def read_gguf(path: Path, dtype: torch.dtype) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, LlamaModel state dict in dtype) from a GGUF file, dequantizing every tensor."""
    reader = _reader(path)  # first: it says so when the gguf package is missing
    from gguf.quants import dequantize

    config = gguf_config(path, reader)
    state_dict = {}
    for tensor in reader.tensors:
        key = _hf_key(tensor.name)
        if key is None:
            continue
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)  # float32, torch layout (out, in)
        except NotImplementedError:
            raise BidirError(
                f"{path}: {tensor.name} uses {tensor.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
            weights = _unpermute(weights, config.num_attention_heads)
        elif key.endswith("k_proj.weight") or key.endswith("k_proj.bias"):
            weights = _unpermute(weights, config.num_key_value_heads)
        # np.array copies: F32 tensors come back as a read-only view of the memory-mapped file.
        state_dict[key] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C")).to(dtype)
    return config, state_dict


def read_gguf_tensor(path: Path, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """One tensor of a GGUF file by its GGUF name (e.g. output.weight), dequantized; None when absent."""
    reader = _reader(path)
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        if tensor.name == name:
            weights = dequantize(tensor.data, tensor.tensor_type)
            return torch.from_numpy(np.array(weights, dtype=np.float32, order="C")).to(dtype)
    return None


def gguf_tokenizer(path: Path):
    """The tokenizer stored in the GGUF metadata, rebuilt by transformers."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            path.parent,
            gguf_file=path.name,
            trust_remote_code=False,  # never run code found beside the file
        )
    except Exception as e:  # transformers' GGUF tokenizer conversion raises many types
        raise BidirError(f"{path}: cannot rebuild the tokenizer from GGUF metadata ({one_line(e)})") from None
