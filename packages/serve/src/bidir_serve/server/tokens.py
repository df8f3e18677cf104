"""A request's inputs -> token id lists, as batch-embed and BiEncoder.encode make them.

Texts get the input_type's prefix (bidir_serve.prompts, the mapping batch-embed's --prompt uses) and are tokenized
by bidir_core.tokenization, so the server and batch-embed embed a text into the same vector. `truncate` decides
what an input longer than the model's max_length becomes:

- END: its first max_length tokens: bidir_core.tokenization.tokenize itself, what batch-embed and encode do;
- NONE: a 400 naming the input's index and its token count (NIM's default, and OpenAI's behaviour);
- START: its last tokens, keeping the special tokens and the prefix's tokens in front (dropping the prefix would
  embed a passage as if it were some other kind of text).

Token id lists are embedded as given (no prefix, no special tokens added); START / END cut them from the front /
back, NONE refuses them when too long. Runs on the server's one tokenizer thread (a fast tokenizer must not be used
by two threads at once).
"""

from __future__ import annotations

from bidir_core.checkpoint import EncoderConfig
from bidir_core.tokenization import CUT_FACTOR, cut_long_texts, max_token_chars, tokenize
from bidir_serve.prompts import prompt_prefix
from bidir_serve.server.errors import bad_request


def input_ids(
    inputs: list[str] | list[list[int]], input_type: str, truncate: str, tokenizer, config: EncoderConfig
) -> list[list[int]]:
    """Token ids of each input (texts or token id lists, see the module docstring)."""
    if isinstance(inputs[0], list):
        return _token_lists(inputs, truncate, config.max_length, len(tokenizer))
    prefix = prompt_prefix(config, input_type)
    texts = [prefix + text for text in inputs]
    if truncate == "END":
        return tokenize(tokenizer, texts, config.max_length)[0]
    if truncate == "NONE":
        return _refuse_long(texts, tokenizer, config.max_length, prefix, input_type)
    return _keep_end(inputs, prefix, tokenizer, config.max_length)


def _token_lists(inputs: list[list[int]], truncate: str, max_length: int, vocab: int) -> list[list[int]]:
    for i, ids in enumerate(inputs):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(
                f"input[{i}] holds {bad}, not a token id of this model (0..{vocab - 1})", "input"
            )
        if len(ids) > max_length and truncate == "NONE":
            raise _too_long(i, f"{len(ids)} tokens", max_length)
    if truncate == "START":
        return [ids[-max_length:] for ids in inputs]
    return [ids[:max_length] for ids in inputs]


def _refuse_long(
    texts: list[str], tokenizer, max_length: int, prefix: str, input_type: str
) -> list[list[int]]:
    # cut_long_texts never cuts a text that can fit, so a text it cut is over-long anyway; it bounds the work a huge
    # text costs before it is refused.
    cut = cut_long_texts(tokenizer, texts, max_length)
    ids = tokenizer(cut, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) > max_length:
            count = f"{len(row)} tokens" if cut[i] is texts[i] else f"more than {len(row)} tokens"
            with_prefix = f" with the {input_type} prefix {prefix!r}" if prefix else ""
            raise _too_long(i, count + with_prefix, max_length)
    return ids


def _too_long(i: int, count: str, max_length: int):
    return bad_request(
        f"input[{i}] has {count}, more than the model's max_length of {max_length} "
        "(shorten it, or send truncate END or START)",
        "input",
        code="context_length_exceeded",
    )


def _keep_end(texts: list[str], prefix: str, tokenizer, max_length: int) -> list[list[int]]:
    if not tokenizer.is_fast:
        raise bad_request(
            "truncate START needs a fast tokenizer (token offsets); this model has a slow one", "truncate"
        )
    # The character cut from the end's side: keep the last characters (see cut_long_texts for why this many).
    limit = CUT_FACTOR * max_length * max_token_chars(tokenizer)
    full = [prefix + (text if len(text) <= limit else text[-limit:]) for text in texts]
    enc = tokenizer(
        full,
        add_special_tokens=True,
        truncation=False,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        verbose=False,
    )
    out = []
    for ids, offsets, special in zip(
        enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True
    ):
        drop = len(ids) - max_length
        if drop <= 0:
            out.append(ids)
            continue
        # The text's tokens, first ones first: the ones to drop. A token that ends inside the prefix is the prefix's;
        # one that starts in it and ends in the text (a byte-level BPE " word" after "passage: ") is the text's.
        text_tokens = [j for j in range(len(ids)) if not special[j] and offsets[j][1] > len(prefix)]
        gone = set(text_tokens[:drop])
        # [:max_length]: only for a prefix longer than max_length by itself, which then loses its end
        out.append([t for j, t in enumerate(ids) if j not in gone][:max_length])
    return out
