"""RerankerConfig: how a CrossEncoder turns a (query, passage) pair into one score; stored in a reranker
checkpoint's bidir.json (with "kind": "reranker")."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

from bidir_core.errors import BidirError
from bidir_core.families import check_attention
from bidir_core.pooling import check_pooling
from bidir_core.tokenization import max_chars, tokenize

RERANKER = "reranker"
"""bidir.json's `kind` of a reranker checkpoint (an embedder's has no kind key, or "embedder")."""

# NeMo AutoModel's cross-encoder prompt: the default `prompt_template` of CrossEncoderCollator in
# nemo_automodel/components/datasets/llm/retrieval_collator.py (also in its examples/retrieval/cross_encoder
# configs): the text NeMo's cross-encoder recipe trains a llama_bidirec reranker on.
NEMO_TEMPLATE = "question:{query} \n \n passage:{passage}"


@dataclass(frozen=True)
class RerankerConfig:
    """How a CrossEncoder scores a pair: the text it reads (template), how its token states become one vector
    (pooling), the head's logit divided by temperature."""

    template: str = NEMO_TEMPLATE
    """The one text a pair becomes: "{query}" and "{passage}" each exactly once, no other format field
    ("{{" / "}}" for a literal brace, as str.format)."""
    pooling: str = "avg"
    """One of avg, cls, last, weighted_avg (bidir_core.pooling); NeMo's rerankers pool avg."""
    temperature: float = 1.0
    """The head's logit is divided by it (> 0, finite); NeMo's LlamaBidirectionalForSequenceClassification does
    the same with config.json's `temperature`."""
    max_length: int = 512
    """A formatted pair longer than this many tokens loses the end of its passage; template text after the passage
    is kept (tokenize_pairs)."""
    attention: str = "bidirectional"
    """bidirectional or causal: as EncoderConfig.attention (its form on disk; config.is_causal is the record)."""

    def __post_init__(self):
        if not isinstance(self.template, str):
            raise BidirError(f"template must be a string, got {self.template!r}")
        template_parts(self.template)
        check_pooling(self.pooling)
        check_attention(self.attention)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise BidirError(f"temperature must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise BidirError(f"max_length must be a positive integer, got {self.max_length!r}")

    @property
    def passage_is_last(self) -> bool:
        """Whether nothing follows {passage} in the template, so that cutting the joined text cuts the passage."""
        parts = template_parts(self.template)
        after = next(i for i, (_, field) in enumerate(parts) if field == "passage") + 1
        return all(not literal and field is None for literal, field in parts[after:])

    def format(self, query: str, passage: str) -> str:
        """The template with query and passage put in as they are: user text is never parsed as a format string
        (it may hold braces), unlike template.format(query=..., passage=...)."""
        values = {"query": query, "passage": passage}
        return "".join(literal + values.get(field, "") for literal, field in template_parts(self.template))


def template_parts(template: str) -> list[tuple[str, str | None]]:
    # Checks the template too: RerankerConfig's check and the parsed form (format, the chat template a reranker
    # checkpoint carries) are one function.
    """The template as (literal text, then field "query" / "passage" or None) in order, literal braces unescaped;
    a BidirError when a field is missing, repeated, unknown or malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise BidirError(f"template {template!r} is not a valid format string ({e})") from None
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in ("query", "passage") or spec or conversion:
            written = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise BidirError(
                f"template {template!r} has the field {{{written}}}; only {{query}} and {{passage}} are allowed "
                "(write {{ and }} for a literal brace)"
            )
        fields.append(field)
    for name in ("query", "passage"):
        if fields.count(name) != 1:
            raise BidirError(
                f"template {template!r} must contain {{{name}}} exactly once (found {fields.count(name)})"
            )
    return [(literal, field) for literal, field, _, _ in parsed]


def tokenize_pairs(
    tokenizer, config: RerankerConfig, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], int]:
    """Token ids of each formatted pair (special tokens included) and how many were cut to config.max_length tokens:
    the one place a pair becomes tokens (CrossEncoder, training, every serving backend and route call it). Each pair
    is formatted whole and the texts are tokenized in one batched call, as NeMo and sentence-transformers do (a
    query tokenized apart from its passage could split differently at the template's boundary).

    What is cut is the passage's end: the joined text's end when the passage comes last (as NeMo truncates its
    joined text), else the longest start of the passage with which the whole pair fits, so the template's text
    after the passage (a chat prompt's end, whose last token a "last"-pooled reranker reads) is kept. A pair that is
    not two strings, or whose query or passage is empty (after strip), is an error naming its index."""
    texts = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise BidirError(f"pair {i}: expected (query, passage), got {type(pair).__name__}")
        for name, text in zip(("query", "passage"), pair, strict=True):
            if not isinstance(text, str):
                raise BidirError(f"pair {i}: the {name} is a {type(text).__name__}, not a str")
            if not text.strip():
                raise BidirError(f"pair {i}: the {name} is empty")
        texts.append(config.format(*pair))
    ids, n_cut = tokenize(tokenizer, texts, config.max_length)
    if n_cut and not config.passage_is_last:
        for i, row in enumerate(ids):
            if len(row) == config.max_length:  # cut, or exactly as long (then it stays as it is)
                ids[i] = _fit_passage(tokenizer, config, *pairs[i]) or row
    return ids, n_cut


def _fit_passage(tokenizer, config: RerankerConfig, query: str, passage: str) -> list[int] | None:
    """The token ids of the pair with the longest start of passage that fits max_length tokens (a binary search
    over its length in characters, each try a bounded text: tokenization.max_chars); None when not even an empty
    passage fits (then the joined text's end is cut, as for a passage that comes last)."""
    limit = config.max_length
    bound = max_chars(tokenizer, limit)
    query, passage = query[:bound], passage[:bound]
    lo, hi, best = 0, len(passage), None
    while lo <= hi:
        mid = (lo + hi) // 2
        row = tokenizer(config.format(query, passage[:mid]), add_special_tokens=True)["input_ids"]
        if len(row) <= limit:
            best, lo = row, mid + 1
        else:
            hi = mid - 1
    return best
