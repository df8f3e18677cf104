"""Loading tokenizers and turning texts into token id lists, with truncation that is counted, never silent."""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from bidir_core.errors import BidirError, one_line
from bidir_core.gguf_import import gguf_tokenizer


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


def load_tokenizer(source: Path, llama_bidirec: bool | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder or a .gguf file. llama_bidirec: whether the folder is an NVIDIA
    llama_bidirec one (None: its config.json says; an opened ModelSource knows already)."""
    if source.suffix == ".gguf":
        return prepare_tokenizer(gguf_tokenizer(source))
    if not any(
        (source / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise BidirError(
            f"{source}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)"
        )
    # transformers does not know model_type llama_bidirec and would warn that it builds "a model of type ``" from
    # it; a Llama config is what such a folder's config is, and names the same tokenizer family.
    if llama_bidirec is None:
        llama_bidirec = _json_field(source / "config.json", "model_type") == "llama_bidirec"
    kwargs = {"config": LlamaConfig()} if llama_bidirec else {}
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


_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters of text one token stands for: the longest token string in the vocabulary.

    A byte-level BPE token's string has one character per byte it covers, and a byte is at most one character of
    text; a SentencePiece piece's string is the characters it covers ("▁" for a space); a byte-fallback piece
    ("<0xE2>") covers one byte but is six characters long. So no token covers more characters than its string has.
    Computed once per tokenizer (the vocabulary is read once, a few ms even at 128k entries)."""
    bound = _MAX_TOKEN_CHARS.get(tokenizer)
    if bound is None:
        bound = max(map(len, tokenizer.get_vocab()), default=1) or 1
        _MAX_TOKEN_CHARS[tokenizer] = bound
    return bound


CUT_FACTOR = 4
"""Characters kept per (max_length x max_token_chars): 1 is what a text that fits can need at most; the rest is margin
for a normalizer that composes characters (NFC/NFKC: a base and its marks, a Hangul L+V+T, become one character,
so the text before normalization can be up to ~3x longer than the characters its tokens cover) and for the word
the cut falls in (see cut_long_texts)."""


def max_chars(tokenizer: PreTrainedTokenizerBase, tokens: int) -> int:
    """CUT_FACTOR * tokens * max_token_chars(tokenizer): the most characters of text that `tokens` tokens can stand
    for, with CUT_FACTOR's margin. The one rule behind cut_long_texts (tokens = max_length: a text longer than this is
    over-long) and bidir-server's refusal of a request before tokenizing it (tokens = its limit per request: texts
    holding more characters than this hold more tokens than that)."""
    return CUT_FACTOR * tokens * max_token_chars(tokenizer)


def cut_long_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[str]:
    """Each text cut to max_chars(tokenizer, max_length) = CUT_FACTOR * max_length * max_token_chars(tokenizer)
    characters, so tokenizing costs time and memory bounded by max_length whatever the text's size (a 23 MB row took
    72 s and 5.8 GB to give 512 tokens).

    Why the cut changes nothing that matters: a text that fits in max_length tokens covers at most max_length *
    max_token_chars characters of normalized text (at most ~3x that before normalization), so it is never cut. An
    over-long text keeps at least 4x the characters its first max_length tokens can cover; tokenizers pre-split text
    into words (at spaces and punctuation) and tokenize each word alone, so the kept tokens are the same as without
    the cut unless one word with no split runs from inside the first max_length tokens' characters to the cut (a
    run of thousands of characters with no space or punctuation), where only that word's tokens may differ."""
    limit = max_chars(tokenizer, max_length)
    return [text if len(text) <= limit else text[:limit] for text in texts]


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids per text (special tokens included, no padding) and how many texts were cut to max_length.

    Texts are first cut to a length in characters bounded by max_length (cut_long_texts: a text that could fit is
    never cut), then tokenized in full so truncation can be counted; the few over-long ones are tokenized again
    with the tokenizer's own truncation, which keeps its special tokens in place.
    """
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BidirError(f"text {i} is a {type(text).__name__}, not a str")
    texts = cut_long_texts(tokenizer, texts, max_length)
    ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    over = [i for i, row in enumerate(ids) if len(row) > max_length]
    if over:
        cut = tokenizer(
            [texts[i] for i in over], add_special_tokens=True, truncation=True, max_length=max_length
        )
        for i, row in zip(over, cut["input_ids"], strict=True):
            ids[i] = row
    return ids, len(over)
