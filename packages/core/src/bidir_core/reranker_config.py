"""RerankerConfig: how a CrossEncoder turns a (query, passage) pair into one score; stored in a reranker
checkpoint's bidir.json (with "kind": "reranker")."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

from bidir_core.errors import BidirError
from bidir_core.families import check_attention
from bidir_core.pooling import check_pooling

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
    is kept (CrossEncoder.tokenize_pairs)."""
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
