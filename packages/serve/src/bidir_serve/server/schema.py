"""The request and response of POST /v1/embeddings: OpenAI's schema plus NVIDIA NIM's `input_type` and `truncate`.

Validation gives one line naming the field (and the input's index) and what is wrong; the limits that depend on
the server's settings (inputs per request, tokens, dimensions against the model) are checked by the app, which
knows them."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from bidir_serve.server.errors import ApiError, bad_request

INPUT_FORMS = "a string, a list of strings, a list of token ids or a list of token id lists"


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    """Texts (each gets the input_type's prefix) or token ids (embedded as given: no prefix, no special tokens)."""
    model: StrictStr | None = None
    """The served model's id (GET /v1/models); another name is a 404."""
    dimensions: StrictInt | None = Field(default=None, gt=0)
    """Matryoshka: keep the first `dimensions` entries (re-normalized when the model normalizes)."""
    encoding_format: Literal["float", "base64"] = "float"
    """base64: each embedding's little-endian float32 bytes, as OpenAI's clients decode them."""
    user: StrictStr | None = None
    """Accepted and ignored (OpenAI's end-user id)."""
    input_type: Literal["query", "passage"] = "passage"
    """NIM: which of the model's prefixes texts get."""
    truncate: Literal["NONE", "START", "END"] = "NONE"
    """NIM: what to do with an input longer than the model's max_length: refuse it (400), or drop tokens from its
    start (the prefix is kept) or its end."""

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value):
        """Clear messages for the input's shape (the union's own errors would list every alternative)."""
        if isinstance(value, str):
            check_text(value, "input")
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {INPUT_FORMS}, got {json_kind(value)}")
        if not value:
            raise ValueError("is an empty list")
        first = json_kind(value[0])
        for i, item in enumerate(value):
            if json_kind(item) != first:
                raise ValueError(f"mixes types: input[0] is {first}, input[{i}] is {json_kind(item)}")
        if first == "a string":
            for i, text in enumerate(value):
                check_text(text, f"input[{i}]")
        elif first == "a list":
            for i, ids in enumerate(value):
                if not ids:
                    raise ValueError(f"input[{i}] is an empty token list")
                for j, token in enumerate(ids):
                    if json_kind(token) != "an integer":
                        raise ValueError(f"input[{i}][{j}] is {json_kind(token)}, not a token id")
        elif first != "an integer":
            raise ValueError(f"must be {INPUT_FORMS}, got a list of {first[first.index(' ') + 1 :]}s")
        return value


def check_text(text: str, where: str) -> None:
    if not text:
        # as batch-embed: an empty text has nothing to embed; embedding only the prefix would give every empty text
        # one shared vector
        raise ValueError(f"{where} is an empty string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape of a lone surrogate ("\ud83d") is not text
        raise ValueError(
            f"{where} holds a lone surrogate at character {e.start}, which is not valid Unicode"
        ) from None


def json_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    return {str: "a string", float: "a number", list: "a list", dict: "an object", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def parse_request(body: bytes) -> EmbeddingRequest:
    """The request in `body` (JSON), or a 400 naming the first problem."""
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as e:
        raise _one_error(e) from None


def _one_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    kind, loc = err["type"], [str(part) for part in err["loc"]]
    if kind == "json_invalid":
        return bad_request(f"the body is not valid JSON ({err['ctx']['error']})", code="invalid_json")
    if kind == "model_type":  # the top level is not an object
        return bad_request(
            "the body must be a JSON object with at least the field 'input'", code="invalid_json"
        )
    field = loc[0] if loc else "body"
    if kind == "extra_forbidden":
        known = ", ".join(EmbeddingRequest.model_fields)
        return bad_request(
            f"unknown field '{field}' (the fields are {known})", param=field, code="unknown_field"
        )
    if kind == "missing":
        return bad_request(f"the field '{field}' is required", param=field, code="missing_field")
    message = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # our own input checks: the message says it all
        return bad_request(f"{field} {message}" if not message.startswith("input") else message, param=field)
    return bad_request(f"{field}: {message}, got {err.get('input')!r}", param=field)


def embedding_response(embeddings: np.ndarray, encoding_format: str, model: str, tokens: int) -> dict:
    """OpenAI's response body for (N, D) float32 embeddings in input order."""
    if encoding_format == "base64":
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
    else:
        rows = embeddings.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
