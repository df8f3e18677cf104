"""ServerConfig: the settings of one bidir-server, each checked where it is declared."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from bidir_core.errors import BidirError
from bidir_serve.backends import BackendSpec

NUMBERS = (
    # name, least, most: a number outside (or inf, nan) is refused at start, not met as a server that hangs
    ("max_wait_ms", 0, 60_000),
    ("log_interval", 1e-3, 86_400),
    ("timeout_keep_alive", 1e-3, 86_400),
    ("timeout_read", 1e-3, 86_400),
    ("timeout_graceful_shutdown", 0, 86_400),
)

HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[?[0-9a-f:.]+\]?", re.IGNORECASE)
"""A host name or an IP address (an IPv6 one with or without brackets)."""


@dataclass(frozen=True)
class ServerConfig:
    """One bidir-server process."""

    model: str
    """A checkpoint folder, a .gguf file, the embedded default 'smollm2-135m', an ONNX export or an engine folder."""
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str | None = None
    """The id /v1/models lists and requests may name (None: the model folder's or file's name, so that neither
    /v1/models nor an error shows where the model lies on the server's disk)."""
    backend: str = "auto"
    """auto, torch, onnxruntime or tensorrt (auto: see bidir_serve.backends)."""
    device: str | None = None
    """cpu or cuda (None: cuda when available)."""
    precision: str | None = None
    """torch backend compute dtype: fp32, bf16 or fp16 (None: bf16 on CUDA, fp32 on CPU)."""
    compile: bool = False
    """torch backend: torch.compile the model (dynamic shapes)."""
    max_batch_tokens: int = 16384
    """Upper bound on rows x longest row (padded tokens) of a model batch, and on the real tokens the model thread
    takes from the queue at once (as batch-embed's --max-batch-tokens)."""
    max_batch_size: int = 128
    """Upper bound on rows per model batch."""
    max_wait_ms: float = 2.0
    """How long the model thread waits, from the oldest queued request's arrival, for more requests to fill a batch
    of max_batch_tokens before it runs what it has."""
    max_concurrency: int = 256
    """Requests admitted at once (queued or running); the next one gets 429 at once instead of a growing queue."""
    max_inputs: int = 2048
    """Inputs per request (OpenAI's limit); more is a 400."""
    max_rerank_documents: int = 1000
    """Documents per rerank request (on every rerank route); more is a 4xx before any tokenizing. Cohere asks for at
    most 1,000 per request; each document is a (query, document) pair through the model, so 10,000 of them is
    seconds of GPU time for one request that would hold up every other."""
    max_request_bytes: int = 8 * 1024 * 1024
    """Size of a request body; more is a 413, refused before the body is read in full."""
    max_request_tokens: int = 300_000
    """Tokens per request after truncation (OpenAI's limit); more is a 400."""
    log_interval: float = 60.0
    """Seconds between two info summaries (requests, tokens/s, latency); none for an interval without requests."""
    api_key: str | None = field(default=None, repr=False)
    """Required of every request but GET /health, as `Authorization: Bearer KEY` (None: no key). Not in repr, so
    never in a log line."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names clients may send in the Host header besides those always accepted (IP addresses, localhost, a
    --host given as a name, and this machine's name when --host is a wildcard): names or `*.example.com` patterns,
    no port; `*` accepts any (see guard.py)."""
    timeout_keep_alive: float = 30.0
    """Seconds an idle connection is kept open: a new one before its first byte, a kept-alive one after an answer."""
    timeout_read: float = 30.0
    """Seconds a client has to send a request's headers (from their first byte; then the connection is closed) and,
    once they are in, its body (then a 408). A request is admitted (takes one of --max-concurrency) only with its
    body in, so a slow client holds a connection for at most this long and never a slot."""
    timeout_graceful_shutdown: float = 20.0
    """Seconds a shutdown (SIGTERM) waits for in-flight requests before it answers them 503 and stops; below the
    usual 30 s an orchestrator waits before SIGKILL."""
    backend_spec: BackendSpec = field(init=False, repr=False, compare=False)
    """model, backend, device, precision and compile as one BackendSpec (which checks them), for load_backend."""

    def __post_init__(self):
        spec = BackendSpec(self.model, self.backend, self.device, self.precision, self.compile)
        object.__setattr__(self, "backend_spec", spec)  # frozen: set once, here
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise BidirError(f"port must be an integer in 0..65535, got {self.port!r}")
        for name in (
            "max_batch_tokens",
            "max_batch_size",
            "max_concurrency",
            "max_inputs",
            "max_rerank_documents",
            "max_request_bytes",
            "max_request_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")
        for name, least, most in NUMBERS:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not least <= value <= most
            ):
                raise BidirError(f"{name} must be a number in {least:g}..{most:g}, got {value!r}")
        if self.api_key is not None and not re.fullmatch(r"[!-~]+", self.api_key):
            raise BidirError(
                "api_key must be a non-empty string of printable ASCII characters without spaces"
            )
        if isinstance(self.allowed_hosts, str):
            raise BidirError(
                f"allowed_hosts must be a sequence of host names, got the string {self.allowed_hosts!r}"
            )
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        for pattern in self.allowed_hosts:
            name = pattern.removeprefix("*.")
            if pattern != "*" and (not name or not HOST_NAME.fullmatch(name)):
                raise BidirError(
                    f"allowed_hosts: {pattern!r} is not a host name, an IP address, '*.domain' or '*' (no port)"
                )

    @property
    def model_id(self) -> str:
        """--served-model-name, else the model's folder (or file) name: 'tiny' for /srv/models/tiny/."""
        return (
            self.served_model_name or Path(self.model).name or Path(self.model).resolve().name or self.model
        )
