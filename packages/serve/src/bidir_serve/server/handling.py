"""What every POST route of the server does around its own work: the wrapper that answers (and counts) a request
whatever happens to it, and the steps before and after the route's own: the model is ready, the body is JSON, read
within the limits, admitted (429), and the token rows' results come back from the model thread unless the client
left first."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from bidir_core.checkpoint import EMBEDDER
from bidir_core.reranker_config import RERANKER
from bidir_serve.backends import backend_kind
from bidir_serve.server.batcher import Batcher
from bidir_serve.server.config import ServerConfig
from bidir_serve.server.errors import ApiError, error_response, unavailable
from bidir_serve.server.metrics import Metrics

log = logging.getLogger("bidir_serve.server")

CLIENT_GONE = 499
"""Recorded (nginx's convention) for a request whose client disconnected before its answer; nothing is sent."""


@dataclass
class ServerState:
    cfg: ServerConfig
    batcher: Batcher
    metrics: Metrics
    tokenizer_thread: ThreadPoolExecutor
    started: int


async def handle(
    request: Request,
    state: ServerState,
    work: Callable[[Request, ServerState], Awaitable[tuple[Response, str]]],
    render: Callable[[ApiError], Response] = error_response,
) -> Response:
    """`work`'s answer to the request, or its refusal as `render` writes the route's API's error JSON; the request
    is counted in the metrics and logged (debug) either way."""
    route = f"{request.method} {request.url.path}"
    start = time.perf_counter()
    error_type = None
    try:
        response, what = await work(request, state)
    except ApiError as e:
        response, what, error_type = render(e), e.message, e.type
    except ClientDisconnect:  # gone before its body was in: nothing to answer, nothing wrong here
        response, what = Response(status_code=CLIENT_GONE), "the client left mid-body"
    except asyncio.CancelledError:
        # Only the shutdown cancels a request: the one still running --timeout-graceful-shutdown after SIGTERM
        # (uvicorn's). It is answered as a request arriving during the shutdown would be, not logged as a crash.
        e = unavailable("the server is shutting down", "shutting_down")
        response, what, error_type = render(e), "cancelled by the shutdown", e.type
    except Exception as e:  # a bug, not the request's fault: logged with its traceback, answered 500
        log.exception("%s failed", route)
        response = render(ApiError(500, f"internal error ({type(e).__name__})", type="server_error"))
        what, error_type = "internal error", "server_error"
    if response.status_code == CLIENT_GONE:
        error_type = "client_disconnected"
    seconds = time.perf_counter() - start
    state.metrics.request(response.status_code, seconds, error_type)
    log.debug("%s %d %.1f ms: %s", route, response.status_code, seconds * 1e3, what)
    return response


def check_model(name: str | None, cfg: ServerConfig) -> None:
    """A request naming a model must name the one served (its id, or MODEL as given: the id earlier versions
    listed, never shown to clients any more), else a 404."""
    if name is not None and name not in (cfg.model_id, cfg.model):
        raise ApiError(
            404,
            f"the model {name!r} is not served here; this server serves {cfg.model_id!r}",
            param="model",
            code="model_not_found",
        )


KIND_ROUTES = {
    EMBEDDER: "POST /v1/embeddings",
    RERANKER: "POST /v1/rerank, /v2/rerank, /rerank or /v1/ranking",
}
"""The routes that serve each kind of model."""


def check_kind(state: ServerState, kind: str, path: str) -> None:
    """The loaded model must be of the kind the route serves: an embedder for /v1/embeddings, a reranker for the
    rerank routes; else a 400 (code wrong_model_kind) saying which routes this server's model answers on."""
    served = backend_kind(state.batcher.backend)
    if served != kind:
        raise ApiError(
            400,
            f"{path} needs {'an' if kind == EMBEDDER else 'a'} {kind} model; this server serves the {served} "
            f"{state.cfg.model_id!r}: use {KIND_ROUTES[served]}",
            param="model",
            code="wrong_model_kind",
        )


async def read_request(request: Request, state: ServerState) -> bytes:
    """The body of a request to a JSON route once the model is ready, read within --max-request-bytes and
    --timeout-read (the caller then takes a slot: batcher.slot())."""
    check_ready(state.batcher)
    check_json(request)
    return await read_body(request, state.cfg.max_request_bytes, state.cfg.timeout_read)


def check_ready(batcher: Batcher) -> None:
    if batcher.state != "ready":
        message = "the model is still loading (GET /health answers 200 once it is ready)"
        raise unavailable(
            message if batcher.state == "loading" else "the server is shutting down", batcher.state
        )


def check_json(request: Request) -> None:
    """A JSON body says so: a web page can POST text/plain (or a form) to any server without a CORS preflight,
    never application/json (guard.py)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            f"the body must be JSON sent as Content-Type: application/json, got {media_type or 'no Content-Type'}",
            param="Content-Type",
            code="unsupported_media_type",
        )


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    too_big = f"the request body is larger than the limit of {limit} bytes"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{too_big} ({declared} bytes)", code="request_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for (
            chunk
        ) in request.stream():  # a body without (or lying about) its length is counted as it comes
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_big, code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s (--timeout-read)",
            code="request_timeout",
        ) from None


async def run_rows(request: Request, batcher: Batcher, ids: list[list[int]]) -> np.ndarray | None:
    """The model's outputs for the token rows ids (embeddings (N, dim), or a reranker's scores (N,)) from the model
    thread, or None when the client disconnected first (its job is then dropped, so no work is left queued for
    nobody)."""
    job = batcher.submit(ids)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():
            batcher.cancel(job)
            job.future.cancel()
    return job.future.result() if job.future in done else None


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read, so receive() now waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
