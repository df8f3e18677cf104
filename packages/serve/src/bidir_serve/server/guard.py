"""Who may talk to the server: the Host header (against DNS rebinding) and the API key, checked before any route runs
(Guard, a plain ASGI middleware); a refusal is OpenAI's error JSON, like every other.

Host. A web page can make its visitor's browser send requests to http://127.0.0.1:8080 but cannot read the answers:
they belong to another origin. DNS rebinding gets round that: the page's own name is made to resolve to 127.0.0.1,
so to the browser the server *is* the page's origin, and the requests carry `Host: evil.example`. Refusing a Host
the server does not know closes that (a 400, code invalid_host). Always accepted: an IP address (a rebinding needs a
name; an address is its own origin), `localhost`, the --host when it is given as a name, and this machine's host name
when --host is a wildcard (0.0.0.0, ::). Any other name (the DNS name clients use, the one a proxy sends upstream)
must be in --allowed-hosts, which takes names, `*.example.com` patterns and `*` (any Host). The port is not checked:
a proxy or a port mapping may change it. (The JSON route refuses any Content-Type but JSON, app.py: the other half,
since a page may send a text/plain POST without asking the server first, a CORS preflight, but not a JSON one.)

Key. With --api-key (or BIDIR_API_KEY), every request but GET /health must carry `Authorization: Bearer KEY`,
compared in constant time (hmac.compare_digest); otherwise a 401 like OpenAI's (code invalid_api_key), so OpenAI's
clients raise their AuthenticationError. /health stays open for load balancers' and orchestrators' probes: it tells
only whether the model is loaded.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from bidir_serve.server.config import ServerConfig
from bidir_serve.server.errors import ApiError, error_response

OPEN_PATHS = frozenset({"/health"})
"""Answered without the API key."""

HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@\s]+)(:[0-9]{1,5})?")
"""A Host header: a name or an IPv4 address, or an IPv6 one in brackets; then a port, or not."""


class Guard:
    """ASGI middleware refusing an unknown Host (400) and, with a key, a request without it (401)."""

    def __init__(self, app: ASGIApp, cfg: ServerConfig):
        self.app = app
        self.key = cfg.api_key.encode() if cfg.api_key else None
        self.any_host = "*" in cfg.allowed_hosts
        self.names = accepted_names(cfg)
        self.suffixes = tuple(_name(p[1:]) for p in cfg.allowed_hosts if p.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await error_response(refusal)(scope, receive, send)

    def refusal(self, scope: Scope) -> ApiError | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.host_ok(host):
            return ApiError(
                400,
                f"the Host header {host!r} names no host this server answers to; its operator can add the name to "
                "--allowed-hosts",
                param="Host",
                code="invalid_host",
            )
        if self.key is None or scope["path"] in OPEN_PATHS:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return ApiError(
                401,
                "this server requires an API key: send it as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), self.key):
            return ApiError(401, "the API key is not valid", code="invalid_api_key")
        return None

    def host_ok(self, header: str | None) -> bool:
        if self.any_host:
            return True
        match = HOST_HEADER.fullmatch(header or "")
        if match is None:
            return False
        name = _name(match[1])
        if name in self.names or name.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def accepted_names(cfg: ServerConfig) -> frozenset[str]:
    """The host names accepted besides IP addresses: localhost, a --host given as a name (this machine's name for a
    wildcard --host), and --allowed-hosts."""
    names = {"localhost", *(_name(p) for p in cfg.allowed_hosts if not p.startswith("*"))}
    try:
        if ipaddress.ip_address(cfg.host).is_unspecified:
            names.add(_name(socket.gethostname()))
    except ValueError:
        names.add(_name(cfg.host))
    return frozenset(names)


def _name(host: str) -> str:
    """A host name as compared: lower case, no brackets around an IPv6 address, no trailing dot."""
    return host.strip("[]").rstrip(".").lower()
