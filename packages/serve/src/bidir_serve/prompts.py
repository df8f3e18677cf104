"""Which of a model's prefixes a text gets: the one mapping from a prompt name to the prefix, shared by batch-embed
(--prompt) and the server (input_type), so both embed the same text into the same vector."""

from __future__ import annotations

from bidir_core.checkpoint import EncoderConfig

PROMPTS = ("passage", "query", "none")


def prompt_prefix(config: EncoderConfig, prompt: str) -> str:
    """The prefix prepended to a text embedded as `prompt` (passage, query or none)."""
    return {"passage": config.passage_prefix, "query": config.query_prefix, "none": ""}[prompt]
