"""Reading a Hugging Face decoder folder: its config.json and its weights, under `LlamaModel` key names.

Covers the ForCausalLM and base-model folders of every family in families.py (Llama, Mistral, Ministral,
Ministral3, Qwen2, Qwen3; one or sharded safetensors, or pytorch_model.bin), NVIDIA `llama_bidirec` folders and
bidir checkpoints, which are such folders too. sources.py picks this reader or gguf_import.py's for a source, and
reads each file once: these functions take what it read rather than reading it again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import LlamaConfig

from bidir_core.checkpoint import BIDIR_JSON, EncoderConfig
from bidir_core.errors import BidirError, one_line
from bidir_core.families import FAMILIES, check_attention, check_config, config_class
from bidir_core.jsonfile import read_json_object

# config.json keys that describe an architecture or a training recipe, not the decoder stack itself.
_NON_LLAMA_CONFIG_KEYS = (
    "model_type",
    "auto_map",
    "architectures",
    "pooling",
    "temperature",
    "_name_or_path",
)


def read_config_dict(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise BidirError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = read_json_object(path)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise BidirError(
            f"{path}: model_type {model_type!r} is not a supported decoder (bidir loads model_type "
            f"{', '.join(repr(t) for t in sorted(FAMILIES))})"
        )
    return config


def stored_attention(folder: Path, raw: dict, stored: EncoderConfig | None) -> str:
    """The attention mode a folder asks for, from its config.json (raw) and bidir.json (stored): a bidir
    checkpoint's bidir.json `attention`, whose config.json must say the same (is_causal); any other folder is
    bidirectional (bidir's default, whatever its config.json says)."""
    if stored is None:
        return "bidirectional"
    is_causal = raw.get("is_causal")
    if is_causal is not None and is_causal != (stored.attention == "causal"):
        raise BidirError(
            f"{folder / 'config.json'}: is_causal={str(is_causal).lower()} contradicts {BIDIR_JSON}'s "
            f"attention={stored.attention!r}"
        )
    return stored.attention


def build_config(folder: Path, raw: dict, attention: str) -> LlamaConfig:
    """A folder's config.json (raw, as read_config_dict read it) as its family's transformers config
    (LlamaConfig, Qwen2Config, ...), checked, with is_causal set for the attention mode."""
    fields = {k: v for k, v in raw.items() if k not in _NON_LLAMA_CONFIG_KEYS}
    fields["is_causal"] = check_attention(attention) == "causal"
    try:
        # also upgrades legacy rope_theta / rope_scaling into rope_parameters
        config = config_class(raw["model_type"])(**fields)
        check_config(config)
    except BidirError as e:
        raise BidirError(f"{folder / 'config.json'}: {e}") from None
    except Exception as e:  # transformers' validation raises several types, some multi-line
        raise BidirError(
            f"{folder / 'config.json'}: not a valid {raw['model_type']} config ({one_line(e)})"
        ) from None
    return config


def _hf_key(key: str) -> str | None:
    """Checkpoint key -> LlamaModel key (a reranker's head `score.weight` stays as it is), or None for tensors
    no bidir model uses."""
    if key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq"):
        return None
    return key.removeprefix("model.")


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise BidirError(f"{index}: not a valid shard index (no weight_map of tensor name -> file)")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for name, f in zip(sorted(set(weight_map.values())), files, strict=True):
                # An index is data, not a pointer anywhere: "../../other/x.safetensors" or an absolute path would
                # read a file the checkpoint does not hold. Judged by the name, not by resolving the file: the
                # Hugging Face cache keeps every shard as a link into its blobs/ folder.
                if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == os.pardir:
                    raise BidirError(f"{index}: shard {name!r} is outside {folder}; refusing to read it")
                if not f.is_file():
                    raise BidirError(f"{index}: names shard {f.name}, which is missing")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise BidirError(f"{folder}: no weights (model.safetensors, its .index.json, or pytorch_model.bin)")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle/zip
            raise BidirError(f"{path}: unreadable PyTorch weights file ({one_line(e)})") from None
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise BidirError(
            f"{path}: not a valid safetensors file, corrupt or truncated ({one_line(e)})"
        ) from None


def read_state_dict(
    folder: Path, dtype: torch.dtype, keep_dtype: frozenset[str] = frozenset()
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All LlamaModel tensors of a folder (and a reranker's score.weight), cast to dtype as they are read except
    the keys in keep_dtype; also which file held each key."""
    state_dict: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in _weight_files(folder):
        for key, tensor in _read_file(path).items():
            hf_key = _hf_key(key)
            if hf_key is None:
                continue
            cast = tensor.is_floating_point() and hf_key not in keep_dtype
            state_dict[hf_key] = tensor.to(dtype) if cast else tensor
            origin[hf_key] = path
    return state_dict, origin


def read_lm_head(folder: Path, dtype: torch.dtype) -> torch.Tensor | None:
    """lm_head.weight of a folder in dtype, or None when it has none (tied embeddings, or an embedder)."""
    for file in _weight_files(folder):
        if file.suffix == ".bin":
            tensors = _read_file(file)
            if "lm_head.weight" in tensors:
                return tensors["lm_head.weight"].to(dtype)
            continue
        with safe_open(file, framework="pt") as f:
            if "lm_head.weight" in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                return f.get_tensor("lm_head.weight").to(dtype)
    return None
