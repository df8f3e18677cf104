"""Loading tokenizers and turning texts into token id lists, with truncation that is counted, never silent."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from bidir_core.errors import BidirError, one_line


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (Llama tokenizers often have none) and right padding, which is what
    sentence-transformers' position-dependent poolings assume when the checkpoint is loaded there."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise BidirError("the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(source: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder or a .gguf file."""
    if source.suffix == ".gguf":
        from bidir_core.gguf_import import gguf_tokenizer

        return prepare_tokenizer(gguf_tokenizer(source))
    if not any(
        (source / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise BidirError(
            f"{source}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)"
        )
    # transformers does not know model_type llama_bidirec and would warn that it builds "a model of type ``" from
    # it; a Llama config is what such a folder's config is, and names the same tokenizer family.
    kwargs = (
        {"config": LlamaConfig()}
        if _json_field(source / "config.json", "model_type") == "llama_bidirec"
        else {}
    )
    try:
        # Never run a folder's code: NVIDIA ships llama_bidirec folders with an `auto_map` naming a .py file, and
        # without trust_remote_code=False transformers asks "Do you wish to run the custom code? [y/N]" on stdin
        # (waiting 15 s when nobody answers) and runs that file on a "y". Their tokenizer is a standard class.
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    # corrupt JSON, missing vocab files, an unknown tokenizer class: many exception types, some multi-line
    except Exception as e:
        for path in (source / "tokenizer_config.json", source / "config.json"):
            auto_map = _json_field(path, "auto_map")
            if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
                raise BidirError(
                    f"{path}: auto_map names custom tokenizer code, and bidir never runs code from a model "
                    "folder (give the folder a standard tokenizer_class in tokenizer_config.json)"
                ) from None
        raise BidirError(f"{source}: cannot load the tokenizer ({one_line(e)})") from None
    return prepare_tokenizer(tokenizer)


def _json_field(path: Path, key: str):
    """path's JSON object's key, or None (also when the file is missing or not a JSON object: the loader that
    needs the file reports that)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value.get(key) if isinstance(value, dict) else None


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids per text (special tokens included, no padding) and how many texts were cut to max_length.

    Texts are tokenized in full first so truncation can be counted; the few over-long ones are tokenized again
    with the tokenizer's own truncation, which keeps its special tokens in place.
    """
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BidirError(f"text {i} is a {type(text).__name__}, not a str")
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    over = [i for i, row in enumerate(ids) if len(row) > max_length]
    if over:
        cut = tokenizer(
            [texts[i] for i in over], add_special_tokens=True, truncation=True, max_length=max_length
        )
        for i, row in zip(over, cut["input_ids"], strict=True):
            ids[i] = row
    return ids, len(over)
