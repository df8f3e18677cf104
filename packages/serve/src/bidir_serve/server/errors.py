"""ApiError: a request the server refuses, carried to the client as OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with its HTTP status."""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A refused request: status, one-line message, OpenAI error type, the offending field (param) and a code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(message: str) -> ApiError:
    """429: the queue is full; the client should retry later (OpenAI's clients do, with backoff)."""
    return ApiError(429, message, type="rate_limit_error", code="queue_full")


def unavailable(message: str, code: str) -> ApiError:
    """503: the model is still loading, or the server is shutting down."""
    return ApiError(503, message, type="service_unavailable", code=code)


def error_response(e: ApiError, body: dict | None = None, status: int | None = None) -> JSONResponse:
    """The HTTP answer carrying e (as OpenAI's error JSON, or `body`: another API's shape of it, with `status` when
    that API uses another one): 429 and 503 say when to retry, 401 which scheme to use, and a 408 closes the
    connection (its client was too slow to send the request; the rest of it is not waited for)."""
    headers = {
        429: {"Retry-After": "1"},
        503: {"Retry-After": "1"},
        401: {"WWW-Authenticate": "Bearer"},
        408: {"Connection": "close"},
    }.get(e.status)
    return JSONResponse(e.body() if body is None else body, status_code=status or e.status, headers=headers)
