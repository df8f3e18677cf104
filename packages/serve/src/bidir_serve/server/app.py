"""The FastAPI app: POST /v1/embeddings, GET /health, GET /v1/models, GET /metrics, and OpenAI-style error JSON for
every refusal (`{"error": {"message", "type", "param", "code"}}`); the rerank routes come from rerank.py, each with
its API's error JSON. A model serves the routes of its kind; the others refuse it (handling.check_kind).

Every request first passes guard.py (the Host header, the API key). A request to /v1/embeddings goes (handling.py): JSON
Content-Type (else 415) -> body read up to --max-request-bytes (413) within --timeout-read (408) -> admitted (or 429
at once: batcher.slot; only now, so a client slow to send its body never holds a slot) -> an embedder is served
(else 400) -> validated (schema.py,
400/404) -> tokenized on the one tokenizer thread, in parts that take turns with other requests' (tokens.py) ->
queued for the model thread (batcher.py), while a watcher notices a client that disconnects and takes its job off
the queue -> Matryoshka cut (bidir_core.matryoshka, from the full-width output) -> JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from bidir_core.checkpoint import EMBEDDER
from bidir_core.errors import BidirError
from bidir_core.matryoshka import offered_dim, truncate_array
from bidir_serve.backends import Backend, Scorer, load_backend
from bidir_serve.server.batcher import Batcher
from bidir_serve.server.config import ServerConfig
from bidir_serve.server.errors import ApiError, bad_request, error_response
from bidir_serve.server.guard import Guard
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
from bidir_serve.server.metrics import Metrics
from bidir_serve.server.rerank import add_rerank_routes
from bidir_serve.server.schema import EmbeddingRequest, embedding_response, parse_request
from bidir_serve.server.tokens import check_size, input_ids, parts

log = logging.getLogger("bidir_serve.server")


def create_app(
    cfg: ServerConfig,
    load: Callable[[], Backend | Scorer] | None = None,
    on_fatal: Callable[[BaseException], None] = lambda e: None,
) -> FastAPI:
    """The app serving cfg.model; `load` builds the backend (default: load_backend with cfg's settings), on the
    model thread once the app starts, and `on_fatal` is called there when that fails."""
    if load is None:

        def load() -> Backend | Scorer:
            return load_backend(cfg.backend_spec)

    metrics = Metrics()
    state = ServerState(
        cfg,
        Batcher(cfg, load, metrics, on_fatal),
        metrics,
        ThreadPoolExecutor(1, thread_name_prefix="bidir-tokenize"),
        int(time.time()),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        summaries = asyncio.create_task(_summaries(state))
        try:
            yield
        finally:
            summaries.cancel()
            # nothing is left queued: uvicorn waited for in-flight requests (up to --timeout-graceful-shutdown; the
            # ones it then cancelled took their jobs off the queue)
            await asyncio.to_thread(state.batcher.stop)
            state.tokenizer_thread.shutdown()
            if line := metrics.summary():
                log.info(line)

    app = FastAPI(title="bidir-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(Guard, cfg=cfg)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})", type="server_error"))

    @app.get("/health")
    async def health():
        status = {"ready": 200, "loading": 503, "failed": 503, "stopped": 503}[state.batcher.state]
        return JSONResponse({"status": state.batcher.state}, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": cfg.model_id, "object": "model", "created": state.started, "owned_by": "bidir"}],
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await handle(request, state, _embed)

    add_rerank_routes(app, state)
    return app


async def _embed(request: Request, state: ServerState) -> tuple[Response, str]:
    batcher = state.batcher
    body = await read_request(request, state)
    with batcher.slot():
        check_ready(batcher)
        check_kind(state, EMBEDDER, request.url.path)
        return await _answer(request, state, parse_request(body))


async def _answer(request: Request, state: ServerState, req: EmbeddingRequest) -> tuple[Response, str]:
    cfg, batcher = state.cfg, state.batcher
    backend = batcher.backend
    check_model(req.model, cfg)
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if isinstance(inputs[0], int):  # one token id list
        inputs = [inputs]
    if len(inputs) > cfg.max_inputs:
        raise bad_request(
            f"input has {len(inputs)} items, more than the limit of {cfg.max_inputs} per request",
            "input",
            code="too_many_inputs",
        )
    dim = _dimensions(req, backend)
    ids = await _tokenize(state, backend, inputs, req)
    tokens = sum(map(len, ids))
    emb = await run_rows(request, batcher, ids)
    if emb is None:
        return Response(status_code=CLIENT_GONE), f"{len(ids)} inputs dropped: the client disconnected"
    emb = truncate_array(emb, dim, backend.config.normalize)  # (N, dim)
    body = embedding_response(emb, req.encoding_format, cfg.model_id, tokens)
    return JSONResponse(body), f"{len(ids)} inputs, {tokens} tokens, {req.input_type}, dim {dim}"


def _dimensions(req: EmbeddingRequest, backend: Backend) -> int:
    """The requested Matryoshka width, by the rule batch-embed's --dim follows too (bidir_core.matryoshka)."""
    try:
        return offered_dim(req.dimensions, backend.dim, backend.config.matryoshka_dims, "dimensions")
    except BidirError as e:
        raise bad_request(str(e), "dimensions") from None


async def _tokenize(
    state: ServerState, backend: Backend, inputs: list[str] | list[list[int]], req: EmbeddingRequest
) -> list[list[int]]:
    """The inputs' token ids, at most --max-request-tokens of them (else a 400, raised as soon as a part passes the
    limit: the rest is never tokenized). Each part (tokens.parts) is its own task on the one tokenizer thread, whose
    queue is first come, first served: a request submits its next part only when its last is done, so parts of
    concurrent requests alternate, and a small request waits for one part of a big one, not all of it."""
    limit = state.cfg.max_request_tokens
    if isinstance(inputs[0], str):
        check_size(inputs, req.input_type, backend.tokenizer, backend.config, limit)
    loop = asyncio.get_running_loop()
    ids: list[list[int]] = []
    tokens = 0
    for part in parts(inputs, backend.tokenizer, backend.config.max_length):
        got = await loop.run_in_executor(
            state.tokenizer_thread,
            input_ids,
            inputs[part.start : part.stop],
            req.input_type,
            req.truncate,
            backend.tokenizer,
            backend.config,
            part.start,
        )
        ids += got
        tokens += sum(map(len, got))
        if tokens > limit:
            counted = (
                "the inputs have" if part.stop == len(inputs) else f"input[0..{part.stop - 1}] already have"
            )
            raise bad_request(
                f"{counted} {tokens} tokens, more than the limit of {limit} per request",
                "input",
                code="too_many_tokens",
            )
    return ids


async def _summaries(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.cfg.log_interval)
        if line := state.metrics.summary():
            log.info(line)
