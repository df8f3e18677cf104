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
by two threads at once), a request's inputs in parts (`parts`) of at most PART_CHARS characters each, so that
requests take turns on that thread and the token count can stop a request at the part that passes its limit;
`check_size` refuses, before any tokenizing, texts with more characters than the limit's tokens can stand for.
"""

from __future__ import annotations

from collections.abc import Iterator

from bidir_core.checkpoint import EncoderConfig
from bidir_core.tokenization import cut_long_texts, max_chars, tokenize
from bidir_serve.prompts import prompt_prefix
from bidir_serve.server.errors import bad_request

PART_CHARS = 1 << 16
"""Characters (or token ids) tokenized in one go: tens of milliseconds, the longest a request waits for another's
part on the tokenizer thread."""


def input_ids(
    inputs: list[str] | list[list[int]],
    input_type: str,
    truncate: str,
    tokenizer,
    config: EncoderConfig,
    first: int = 0,
) -> list[list[int]]:
    """Token ids of each input (texts or token id lists, see the module docstring); `first` is the request's index
    of inputs[0], for the messages."""
    if isinstance(inputs[0], list):
        return _token_lists(inputs, truncate, config.max_length, len(tokenizer), first)
    prefix = prompt_prefix(config, input_type)
    texts = [prefix + text for text in inputs]
    if truncate == "END":
        return tokenize(tokenizer, texts, config.max_length)[0]
    if truncate == "NONE":
        return _refuse_long(texts, tokenizer, config.max_length, prefix, input_type, first)
    return _keep_end(inputs, prefix, tokenizer, config.max_length)


def parts(inputs: list[str] | list[list[int]], tokenizer, max_length: int) -> Iterator[range]:
    """Consecutive ranges of the inputs, each of at most PART_CHARS characters as the tokenizer will see them (a text
    cut as cut_long_texts cuts it; a token id list counts its length, all of which is checked), or of one input."""
    limit = max_chars(tokenizer, max_length)
    start = size = 0
    for i, item in enumerate(inputs):
        n = len(item) if isinstance(item, list) else min(len(item), limit)
        if size and size + n > PART_CHARS:
            yield range(start, i)
            start, size = i, 0
        size += n
    yield range(start, len(inputs))


def check_size(texts: list[str], input_type: str, tokenizer, config: EncoderConfig, max_tokens: int) -> None:
    """Refuse texts that hold more characters than max_tokens tokens can stand for (bidir_core.tokenization.max_chars,
    the rule that cuts over-long texts), each counted with its prefix and as cut to max_length: they cannot fit in
    max_tokens, so no tokenizing is spent on them. Costs a sum of lengths (the bound is computed once per tokenizer,
    by the warm-up)."""
    prefix = len(prompt_prefix(config, input_type))
    cut = max_chars(tokenizer, config.max_length)
    chars = sum(min(prefix + len(text), cut) for text in texts)
    if chars > max_chars(tokenizer, max_tokens):
        raise bad_request(
            f"the inputs hold {chars} characters (each counted up to its first max_length tokens' worth), more than "
            f"the limit of {max_tokens} tokens per request can cover",
            "input",
            code="too_many_tokens",
        )


def _token_lists(
    inputs: list[list[int]], truncate: str, max_length: int, vocab: int, first: int
) -> list[list[int]]:
    for i, ids in enumerate(inputs, first):
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
    texts: list[str], tokenizer, max_length: int, prefix: str, input_type: str, first: int
) -> list[list[int]]:
    # cut_long_texts never cuts a text that can fit, so a text it cut is over-long anyway; it bounds the work a huge
    # text costs before it is refused.
    cut = cut_long_texts(tokenizer, texts, max_length)
    ids = tokenizer(cut, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) > max_length:
            count = f"{len(row)} tokens" if cut[i] is texts[i] else f"more than {len(row)} tokens"
            with_prefix = f" with the {input_type} prefix {prefix!r}" if prefix else ""
            raise _too_long(first + i, count + with_prefix, max_length)
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
    limit = max_chars(tokenizer, max_length)
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
