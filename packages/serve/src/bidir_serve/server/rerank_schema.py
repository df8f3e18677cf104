"""The three rerank APIs' requests, responses and error JSON, each parsed into one form (Rerank) that the route
(rerank.py) serves the same way.

- Cohere / Jina, POST /v1/rerank and /v2/rerank: {model, query, documents: [str | {"text": str, ...}], top_n,
  return_documents} -> {id, model, results: [{index, relevance_score, document?: {text}}], meta, usage}, best
  first. relevance_score is the sigmoid of the logit (0..1, as Cohere's scores and vLLM's for a one-logit model);
  top_n past the list returns the whole list (as Cohere and vLLM), below 1 is a 400; return_documents defaults to
  false (Cohere's default). Documents are always cut to fit (Cohere truncates, it has no refusal). Errors:
  {"id", "message"}, Cohere's shape.
- Hugging Face TEI, POST /rerank: {query, texts, truncate=false, truncation_direction="Right", raw_scores=false,
  return_text=false} -> [{index, score, text?}], best first; score is the sigmoid unless raw_scores. truncate false
  refuses an over-long pair. Errors: {"error", "error_type"} with TEI's statuses (422 validation, 400 empty, 424
  backend for a model that is not a reranker, 429 overloaded, 503 unhealthy).
- NVIDIA NIM, POST /v1/ranking: {model, query: {text}, passages: [{text}], truncate: "NONE" | "END"} ->
  {rankings: [{index, logit}], usage}, best first; the raw logit; truncate NONE (the default) refuses an over-long
  pair with a 400. Errors: the server's OpenAI-style JSON, as its /v1/embeddings (NIM's other route) answers.

Every score is computed from the fp32 logit (the scorer's output) in float64: a sigmoid taken in bf16 saturates to
1.0 for any logit past ~5.5. Results are sorted by the logit (ties keep the documents' order), not by the sigmoid,
which rounds large logits to the same 1.0.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.responses import JSONResponse

from bidir_serve.server.errors import ApiError, bad_request, error_response
from bidir_serve.server.schema import check_text, json_kind


@dataclass(frozen=True)
class Rerank:
    """A rerank request of any of the APIs: score (query, document) for each document."""

    query: str
    documents: list[str]
    field: str
    """What the API calls the documents (documents, texts, passages), for the messages."""
    truncate: bool
    """Cut an over-long pair's passage (else a 4xx naming it)."""
    truncate_hint: str = ""
    """How this API's client asks for truncation, for the refusal's message."""
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    given: list | None = None
    """The documents as sent (Cohere's may be objects), returned by return_documents."""


# --- requests ------------------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CohereRequest(_Request):
    model: StrictStr | None = None
    query: StrictStr
    documents: list[Any]
    """Strings, or objects whose "text" is ranked (Cohere's v1 documents; their other fields are returned with
    them); checked in parse_cohere, for one clear message per item."""
    top_n: StrictInt | None = None
    return_documents: StrictBool = False


class TeiRequest(_Request):
    query: StrictStr
    texts: list[StrictStr]
    truncate: StrictBool | None = None
    truncation_direction: Literal["Right", "right", "Left", "left"] = "Right"
    raw_scores: StrictBool = False
    return_text: StrictBool = False


class Text(_Request):
    text: StrictStr


class NimRequest(_Request):
    model: StrictStr | None = None
    query: Text
    passages: list[Text]
    truncate: Literal["NONE", "END"] = "NONE"


def parse_cohere(body: bytes) -> Rerank:
    req = _parse(CohereRequest, body)
    texts = []
    for i, doc in enumerate(req.documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            got = "an object without a string 'text'" if isinstance(doc, dict) else json_kind(doc)
            raise bad_request(f"documents[{i}] must be a string or an object with a 'text' string, got {got}",
                              "documents")  # fmt: skip
        texts.append(text)
    _check(req.query, texts, "documents")
    if req.top_n is not None and req.top_n < 1:
        raise bad_request(f"top_n must be at least 1, got {req.top_n}", "top_n")
    return Rerank(req.query, texts, "documents", True, "", req.model, req.top_n, req.return_documents,
                  given=req.documents)  # fmt: skip


def parse_tei(body: bytes) -> Rerank:
    req = _parse(TeiRequest, body)
    _check(req.query, req.texts, "texts")
    if req.truncation_direction.lower() == "left":
        # a pair's cut is its passage's end, whatever the side (reranker_config.tokenize_pairs)
        raise bad_request(
            "truncation_direction Left is not supported: a pair keeps its query and loses its text's end",
            "truncation_direction",
        )
    return Rerank(req.query, req.texts, "texts", bool(req.truncate), "send truncate true",
                  return_documents=req.return_text, raw_scores=req.raw_scores)  # fmt: skip


def parse_nim(body: bytes) -> Rerank:
    req = _parse(NimRequest, body)
    texts = [p.text for p in req.passages]
    _check(req.query.text, texts, "passages", query_field="query.text")
    return Rerank(req.query.text, texts, "passages", req.truncate == "END", 'send truncate "END"', req.model)


def _check(query: str, texts: list[str], field: str, query_field: str = "query") -> None:
    """A query and documents a reranker can score: none empty (nor blank: the template alone has nothing to
    score), no lone surrogates; an empty list is code "empty"."""
    _check_one(query, query_field)
    if not texts:
        raise bad_request(f"{field} is an empty list", field, code="empty")
    for i, text in enumerate(texts):
        _check_one(text, f"{field}[{i}]", field)


def _check_one(text: str, where: str, param: str | None = None) -> None:
    try:
        check_text(text, where)
    except ValueError as e:
        raise bad_request(str(e), param or where) from None
    if not text.strip():
        raise bad_request(f"{where} holds only whitespace", param or where)


def _parse(model: type[_Request], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _refusal(model, e.errors(include_url=False)[0]) from None


def _refusal(model: type[_Request], err: dict) -> ApiError:
    """One line naming the field (as documents[3].text) and what is wrong with it."""
    kind, loc = err["type"], err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
    field = str(loc[0]) if loc else None
    if kind == "json_invalid":
        return bad_request(f"the body is not valid JSON ({err['ctx']['error']})", code="invalid_json")
    if kind == "model_type" and not loc:
        return bad_request("the body must be a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        known = ", ".join(model.model_fields) if len(loc) == 1 else "text"
        return bad_request(f"unknown field '{where}' (the fields are {known})", field, "unknown_field")
    if kind == "missing":
        return bad_request(f"the field '{where}' is required", field, "missing_field")
    return bad_request(f"{where}: {err['msg']}, got {err.get('input')!r}", field)


# --- responses -----------------------------------------------------------------------------------------------------


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 sigmoid of fp32 logits, without overflow for either sign."""
    x = logits.astype(np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def ranking(logits: np.ndarray, top_n: int | None = None) -> list[int]:
    """Document indices best first (ties keep the documents' order), the first top_n of them (all when None)."""
    return np.argsort(-logits, kind="stable")[:top_n].tolist()


def cohere_response(r: Rerank, logits: np.ndarray, tokens: int, model: str) -> dict:
    scores = sigmoid(logits)
    results = []
    for i in ranking(logits, r.top_n):
        row = {"index": i, "relevance_score": float(scores[i])}
        if r.return_documents:
            given = r.given[i]
            row["document"] = dict(given) if isinstance(given, dict) else {"text": given}
        results.append(row)
    return {
        "id": str(uuid.uuid4()),
        "model": model,
        "results": results,
        "meta": {
            "tokens": {"input_tokens": tokens}
        },  # Cohere's place for the count; usage is Jina's and vLLM's
        "usage": {"total_tokens": tokens},
    }


def tei_response(r: Rerank, logits: np.ndarray) -> list[dict]:
    scores = logits.astype(np.float64) if r.raw_scores else sigmoid(logits)
    out = []
    for i in ranking(logits):
        row = {"index": i, "score": float(scores[i])}
        if r.return_documents:
            row["text"] = r.documents[i]
        out.append(row)
    return out


def nim_response(logits: np.ndarray, tokens: int) -> dict:
    return {
        "rankings": [{"index": i, "logit": float(logits[i])} for i in ranking(logits)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# --- errors --------------------------------------------------------------------------------------------------------


def cohere_error(e: ApiError) -> JSONResponse:
    return error_response(e, {"id": str(uuid.uuid4()), "message": e.message})


def tei_error(e: ApiError) -> JSONResponse:
    """TEI's statuses and error types for the server's refusals."""
    if e.code == "wrong_model_kind":  # TEI's answer to /rerank on a model that is not a reranker
        status, kind = 424, "backend"
    elif e.status == 429:
        status, kind = 429, "overloaded"
    elif e.status == 503:
        status, kind = 503, "unhealthy"
    elif e.status >= 500:
        status, kind = e.status, "backend"
    elif e.code == "empty":
        status, kind = 400, "empty"
    else:  # TEI's validation errors (a too long input, too many of them) are 422s
        status, kind = (422 if e.status == 400 else e.status), "validation"
    return error_response(e, {"error": e.message, "error_type": kind}, status)
