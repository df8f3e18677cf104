"""What a model argument can name, and loading it: the one dispatch over bidir's input formats.

Sources: a Hugging Face folder of a supported family (families.py: Llama, Mistral, Ministral, Ministral3, Qwen2,
Qwen3; ForCausalLM or the base model; one or sharded safetensors, or pytorch_model.bin), an NVIDIA
`llama_bidirec` folder, a bidir checkpoint (a Hugging Face folder too), a .gguf file, or the name of the embedded
default model. Each format has its reader (hf_folder.py, gguf_import.py, embedded.py);
a new input format gets its own reader module and a branch here.
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
from bidir_core.model import LlamaBidirectionalModel


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


def check_state_dict(
    config: LlamaConfig, state_dict: dict[str, torch.Tensor], where: dict[str, Path] | Path
) -> None:
    """Every expected key present with the shape config.json implies, and nothing else."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaBidirectionalModel(config).state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    if missing:
        folder = where if isinstance(where, Path) else next(iter(where.values()), Path("?")).parent
        raise BidirError(f"{folder}: {len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        folder = where if isinstance(where, Path) else where[unexpected[0]]
        raise BidirError(
            f"{folder}: unexpected weights for a {config.model_type} model, e.g. {', '.join(unexpected[:3])}"
        )
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != shape:
            file = where if isinstance(where, Path) else where[key]
            raise BidirError(
                f"{file}: weight {key} has shape {list(got)}, but config.json implies {list(shape)}"
            )


def load_model_weights(
    path_or_name: str | Path, dtype: torch.dtype, attention: str | None = None
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, state dict in dtype under {Family}Model keys) from any supported source, validated. The config's
    is_causal is the attention mode: the one given, else the source's own (a bidir checkpoint's bidir.json; any
    other source is bidirectional)."""
    path = resolve_source(path_or_name)
    if path.suffix == ".gguf":
        config, state_dict = read_gguf(path, dtype)
        config.is_causal = attention is not None and check_attention(attention) == "causal"
        check_state_dict(config, state_dict, path)
        return config, state_dict
    config = load_config(path, attention)
    state_dict, origin = read_state_dict(path, dtype)
    check_state_dict(config, state_dict, origin if origin else path)
    return config, state_dict


def load_model(
    path_or_name: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attention: str | None = None,
) -> LlamaBidirectionalModel:
    """The LlamaBidirectionalModel of any supported source: a Hugging Face folder of a supported family, an NVIDIA
    llama_bidirec folder, a bidir checkpoint, a .gguf file, or the name of the embedded default model
    ("smollm2-135m"); attention "bidirectional" or "causal" (None: the source's own, see load_model_weights)."""
    config, state_dict = load_model_weights(path_or_name, dtype=dtype, attention=attention)
    return LlamaBidirectionalModel.from_state_dict(config, state_dict, device=device)


def load_lm_head(path_or_name: str | Path, dtype: torch.dtype) -> torch.Tensor | None:
    """The LM head (vocab, hidden) of a source whose head is not its input embeddings (lm_head.weight of a Hugging
    Face folder, output.weight of a GGUF file), in dtype; None when the source has none (tied, or an embedder).
    An embedder never needs it; MNTP adaptation predicts tokens through it."""
    path = resolve_source(path_or_name)
    if path.suffix == ".gguf":
        return read_gguf_tensor(path, "output.weight", dtype)
    return read_lm_head(path, dtype)
