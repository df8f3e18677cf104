"""What a run starts from, read from the source before the run folder is checked: the model's own pooling (for a
recipe that leaves model.pooling unset) and the identity of the model's files and of the training data.

The identity goes to output_dir/inputs.json on a fresh start; a resume whose model.path or data.train holds other
contents under the same name is refused (recipe.json pins the names only). That matters most with LoRA: a
checkpoint holds the adapters, and the frozen base is read from model.path again, so a replaced base would get
adapters trained on another one merged into it. A run folder written before inputs.json existed resumes unchecked
and gets one.

The cost decides what is read. Training data: every byte (sha256), since its reader reads every byte next anyway,
and an edited row of the same length must count. Model weights can be tens of GB: hashing them all would cost
about 1 s per GB at every start and resume, and the cheaper identities miss a replaced base: the safetensors header
(names, dtypes, shapes) is the same for two fine-tunes of one architecture, and a modification time changes when an
unchanged file is copied (refusing that would throw the run away for nothing). So a weight file's identity is its
size and a sha256 of three 1 MiB windows, at its start (the header), middle and end: another model's weights differ
everywhere, so any of them tells. The small files (config.json, bidir.json, tokenizer) are read whole. The dev set
(eval.dev) is not recorded: it changes the dev scores, not what is trained, and a fixed dev file should not cost a
run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from bidir_core.checkpoint import EncoderConfig, read_encoder_config
from bidir_core.datasets.sources import BUILTIN
from bidir_core.errors import BidirError, one_line
from bidir_core.jsonfile import read_json_object
from bidir_core.sources import resolve_source
from bidir_train.checkpoints import START_OVER
from bidir_train.config import TrainConfig

INPUTS = "inputs.json"
FORMAT_VERSION = 1
WINDOW = 1 << 20
"""Bytes of each of the three windows read of a weight file."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
MODEL_FILES = ("config.json", "bidir.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")
"""Besides the weights, the files of a model folder that change what is trained (read whole)."""


def with_source_pooling(cfg: TrainConfig) -> TrainConfig:
    """cfg with model.pooling filled in when the recipe leaves it unset: the source's own, so that training a causal
    embedder pooled by its last token does not switch it to avg. Reads the source (the embedded default is imported
    on first use)."""
    if cfg.model.pooling is not None or cfg.objective == "reranker":
        return cfg  # a reranker's unset pooling is its source's reranker settings' (bidir_train.weights.load_reranker)
    source = resolve_source(cfg.model.path)
    stored = read_encoder_config(source) if source.is_dir() else None  # a .gguf file or a plain folder: none
    pooling = (stored or EncoderConfig()).pooling
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pooling=pooling))


def input_identity(cfg: TrainConfig) -> dict:
    """{"model.path": ..., "data.train": ...}: each a built-in's name or the identity of its files (see the module
    docstring), as inputs.json records them."""
    source = resolve_source(cfg.model.path)
    if source.is_dir():
        names = sorted(
            p.name
            for p in source.iterdir()
            if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES)
        )
        model = {"files": {name: _file_identity(source / name) for name in names}}
    else:
        model = {"files": {source.name: _file_identity(source)}}
    if cfg.data.train in BUILTIN:
        data = {"builtin": cfg.data.train}
    else:
        path = Path(cfg.data.train)
        if not path.is_file():
            raise BidirError(f"{path}: no such file")
        data = {"files": {path.name: _file_identity(path, whole=True)}}
    return {"format_version": FORMAT_VERSION, "model.path": model, "data.train": data}


def _file_identity(path: Path, whole: bool = False) -> dict:
    """{"size", "sha256"}: of every byte when whole or when the file is small, else of WINDOW bytes at its start,
    middle and end (a weight file) under "sampled_sha256"."""
    if not whole and path.suffix not in WEIGHT_SUFFIXES:
        whole = True
    try:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            if whole or size <= 3 * WINDOW:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                return {"size": size, "sha256": digest.hexdigest()}
            for offset in (0, (size - WINDOW) // 2, size - WINDOW):
                f.seek(offset)
                digest.update(f.read(WINDOW))
    except OSError as e:
        raise BidirError(f"{path}: cannot read ({one_line(e)})") from None
    return {"size": size, "sampled_sha256": digest.hexdigest()}


def check_same_inputs(path: Path, cfg: TrainConfig, current: dict) -> None:
    """A resume starts from what inputs.json (at path) recorded; else one line naming the recipe key, its value and
    the file that differs. No record (a run folder from before it existed): nothing to check."""
    if not path.is_file():
        return
    try:
        recorded = read_json_object(path)
    except BidirError as e:
        raise BidirError(f"{e}; {START_OVER}") from None
    if recorded.get("format_version") != FORMAT_VERSION:
        raise BidirError(f"{path}: not an inputs record of format version {FORMAT_VERSION}; {START_OVER}")
    values = {"model.path": cfg.model.path, "data.train": cfg.data.train}
    for key, value in values.items():
        what = _difference(recorded.get(key), current[key])
        if what is not None:
            raise BidirError(
                f"{path}: {key} ({value}) is not what this run started from ({what}); restore it, use another "
                f"logging.output_dir, or {START_OVER}"
            )


def _difference(old, new: dict) -> str | None:
    """What differs between two identities of one input, in words; None when they are the same."""
    if old == new:
        return None
    if not isinstance(old, dict) or "files" not in old or "files" not in new:
        return f"was {_describe(old)}, now {_describe(new)}"
    before, after = old["files"], new["files"]
    for name in sorted(set(before) | set(after)):
        if name not in after:
            return f"{name}: gone"
        if name not in before:
            return f"{name}: new"
        if before[name] != after[name]:
            was, now = before[name].get("size"), after[name]["size"]
            return f"{name}: {now} bytes, was {was}" if was != now else f"{name}: other contents"
    return "other files"


def _describe(identity) -> str:
    if isinstance(identity, dict) and "builtin" in identity:
        return f"the built-in {identity['builtin']}"
    if isinstance(identity, dict) and "files" in identity:
        return ", ".join(identity["files"]) or "no files"
    return "unrecorded"
