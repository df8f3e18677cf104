"""The rerank routes: Cohere / Jina POST /v1/rerank and /v2/rerank, TEI POST /rerank, NIM POST /v1/ranking, served
by a reranker model (a Scorer) through the same path as /v1/embeddings (handling.py: the body limits, admission,
the batcher, disconnects, metrics; each route answers its refusals in its API's error JSON, rerank_schema.py).

A request goes: parsed into one Rerank (rerank_schema.py) -> at most --max-rerank-documents documents (else a 4xx
before any tokenizing) -> its (query, document) pairs formatted and tokenized by the core
bidir_core.reranker_config.tokenize_pairs in ONE call on the server's tokenizer thread (each pair as one string, as
NeMo and sentence-transformers tokenize it: tokenizing the query once per request and joining token lists would
change the tokens where the template meets the query and the passage) -> its pairs queued as token rows, sharing
model batches with other requests' -> the fp32 logits -> the API's response, best first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bidir_core.errors import BidirError
from bidir_core.reranker_config import RERANKER, RerankerConfig, tokenize_pairs
from bidir_core.tokenization import cut_long_texts, max_chars
from bidir_serve.server.errors import ApiError, bad_request, error_response
from bidir_serve.server.handling import (
    CLIENT_GONE,
    ServerState,
    check_kind,
    check_model,
    check_ready,
    handle,
    read_request,
    run_rows,
)
from bidir_serve.server.rerank_schema import (
    Rerank,
    cohere_error,
    cohere_response,
    nim_response,
    parse_cohere,
    parse_nim,
    parse_tei,
    tei_error,
    tei_response,
)


def add_rerank_routes(app: FastAPI, state: ServerState) -> None:
    def cohere(r: Rerank, logits, tokens: int):
        return cohere_response(r, logits, tokens, state.cfg.model_id)

    routes = (
        (("/v1/rerank", "/v2/rerank"), parse_cohere, cohere, cohere_error),
        (("/rerank",), parse_tei, lambda r, logits, tokens: tei_response(r, logits), tei_error),
        (("/v1/ranking",), parse_nim, lambda r, logits, tokens: nim_response(logits, tokens), error_response),
    )
    for paths, parse, respond, render in routes:
        work = _work(parse, respond)

        async def route(request: Request, work=work, render=render) -> Response:
            return await handle(request, state, work, render)

        for path in paths:
            app.add_api_route(path, route, methods=["POST"])


def _work(parse: Callable[[bytes], Rerank], respond: Callable):
    async def work(request: Request, state: ServerState) -> tuple[Response, str]:
        cfg, batcher = state.cfg, state.batcher
        body = await read_request(request, state)
        with batcher.slot():
            check_ready(batcher)
            check_kind(state, RERANKER, request.url.path)
            r = parse(body)
            check_model(r.model, cfg)
            if len(r.documents) > cfg.max_rerank_documents:
                raise bad_request(
                    f"{r.field} has {len(r.documents)} items, more than the limit of {cfg.max_rerank_documents} "
                    "per request (--max-rerank-documents)",
                    r.field,
                    code="too_many_documents",
                )
            ids = await _tokenize(state, r)
            tokens = sum(map(len, ids))
            logits = await run_rows(request, batcher, ids)  # (N,) fp32
            if logits is None:
                return Response(status_code=CLIENT_GONE), f"{len(ids)} pairs dropped: the client disconnected"
            return JSONResponse(respond(r, logits, tokens)), f"{len(ids)} pairs, {tokens} tokens"

    return work


async def _tokenize(state: ServerState, r: Rerank) -> list[list[int]]:
    """The pairs' token rows, at most --max-request-tokens of them in all (else a 400; refused before tokenizing when
    the characters alone cannot fit, as tokens.check_size does for texts)."""
    backend, limit = state.batcher.backend, state.cfg.max_request_tokens
    tokenizer, config = backend.tokenizer, backend.config
    frame = len(config.format("", ""))
    cut = max_chars(tokenizer, config.max_length)
    chars = sum(min(frame + len(r.query) + len(doc), cut) for doc in r.documents)
    if chars > max_chars(tokenizer, limit):
        raise _too_many_tokens(
            f"the pairs hold {chars} characters (each counted up to its first max_length tokens' worth), more "
            f"than the limit of {limit} tokens per request can cover"
        )
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(state.tokenizer_thread, pair_ids, tokenizer, config, r)
    tokens = sum(map(len, ids))
    if tokens > limit:
        raise _too_many_tokens(f"the pairs have {tokens} tokens, more than the limit of {limit} per request")
    return ids


def pair_ids(tokenizer, config: RerankerConfig, r: Rerank) -> list[list[int]]:
    """Token rows of r's (query, document) pairs by tokenize_pairs, or a 400 naming the first over-long pair when r
    does not truncate. The query and each document are first cut to max_chars(max_length) characters: a text that
    long cannot fit in max_length tokens, so the cut changes no token that is kept (the joined text is cut there
    anyway, tokenization.cut_long_texts) and bounds the memory a long query repeated over 1,000 pairs takes."""
    bound = max_chars(tokenizer, config.max_length)
    query = r.query[:bound]
    pairs = [(query, doc[:bound]) for doc in r.documents]
    try:
        ids, n_cut = tokenize_pairs(tokenizer, config, pairs)
    except BidirError as e:  # the schema refuses what tokenize_pairs would; kept as a 400 all the same
        raise bad_request(str(e), r.field) from None
    if n_cut and not r.truncate:
        # only on this refusal: which pair was over-long, by its whole tokenization (tokenize_pairs counts them)
        texts = cut_long_texts(tokenizer, [config.format(q, d) for q, d in pairs], config.max_length)
        whole = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        i = next(i for i, row in enumerate(whole) if len(row) > config.max_length)
        was_cut = (
            len(query) < len(r.query)
            or len(pairs[i][1]) < len(r.documents[i])
            or len(texts[i]) < len(config.format(*pairs[i]))
        )
        count = f"more than {len(whole[i])}" if was_cut else str(len(whole[i]))
        raise ApiError(
            400,
            f"{r.field}[{i}] with the query has {count} tokens, more than the model's max_length of "
            f"{config.max_length} (shorten it, or {r.truncate_hint})",
            param=r.field,
            code="context_length_exceeded",
        )
    return ids


def _too_many_tokens(message: str) -> ApiError:
    return bad_request(message, code="too_many_tokens")
