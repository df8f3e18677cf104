"""What a model argument can name, and reading it: the one dispatch over bidir's input formats.

Sources: a Hugging Face folder of a supported family (families.py: Llama, Mistral, Ministral, Ministral3, Qwen2,
Qwen3; ForCausalLM or the base model; one or sharded safetensors, or pytorch_model.bin), an NVIDIA
`llama_bidirec` folder, a bidir checkpoint (a Hugging Face folder too), a .gguf file, or the name of the embedded
default model. Each format has its reader (hf_folder.py, gguf_import.py, embedded.py);
a new input format gets its own reader module and a branch here. What is read becomes a model in
bidir_core.model (LlamaBidirectionalModel.from_pretrained), which imports this module, never the other way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig

from bidir_core.embedded import EMBEDDED_DEFAULT, embedded_checkpoint
from bidir_core.errors import BidirError
from bidir_core.families import check_attention
from bidir_core.folders import interrupted_publish_hint
from bidir_core.gguf_import import read_gguf, read_gguf_tensor
from bidir_core.hf_folder import load_config, read_lm_head, read_state_dict


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


def read_model_weights(
    path_or_name: str | Path, dtype: torch.dtype, attention: str | None = None
) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Path] | Path]:
    """(config, state dict in dtype under {Family}Model keys, where) from any supported source; `where` is the file
    each key came from (a folder) or the source itself, for errors. The config is checked, the tensors not yet:
    bidir_core.model.load_model_weights checks them against the model the config builds. The config's is_causal is
    the attention mode: the one given, else the source's own (a bidir checkpoint's bidir.json; any other source is
    bidirectional)."""
    path = resolve_source(path_or_name)
    if path.suffix == ".gguf":
        config, state_dict = read_gguf(path, dtype)
        config.is_causal = attention is not None and check_attention(attention) == "causal"
        return config, state_dict, path
    config = load_config(path, attention)
    state_dict, origin = read_state_dict(path, dtype)
    return config, state_dict, origin if origin else path


def load_lm_head(path_or_name: str | Path, dtype: torch.dtype) -> torch.Tensor | None:
    """The LM head (vocab, hidden) of a source whose head is not its input embeddings (lm_head.weight of a Hugging
    Face folder, output.weight of a GGUF file), in dtype; None when the source has none (tied, or an embedder).
    An embedder never needs it; MNTP adaptation predicts tokens through it."""
    path = resolve_source(path_or_name)
    if path.suffix == ".gguf":
        return read_gguf_tensor(path, "output.weight", dtype)
    return read_lm_head(path, dtype)
