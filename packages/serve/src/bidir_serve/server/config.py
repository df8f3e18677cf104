"""ServerConfig: the settings of one bidir-server, each checked where it is declared."""

from __future__ import annotations

from dataclasses import dataclass, field

from bidir_core.errors import BidirError
from bidir_serve.backends import BackendSpec


@dataclass(frozen=True)
class ServerConfig:
    """One bidir-server process."""

    model: str
    """A checkpoint folder, a .gguf file, the embedded default 'smollm2-135m', an ONNX export or an engine folder."""
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str | None = None
    """The id /v1/models lists and requests may name (None: `model` as given)."""
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
    max_request_bytes: int = 8 * 1024 * 1024
    """Size of a request body; more is a 413, refused before the body is read in full."""
    max_request_tokens: int = 300_000
    """Tokens per request after truncation (OpenAI's limit); more is a 400."""
    log_interval: float = 60.0
    """Seconds between two info summaries (requests, tokens/s, latency); none for an interval without requests."""
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
            "max_request_bytes",
            "max_request_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")
        for name, least in (("max_wait_ms", 0), ("log_interval", 1e-3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
                raise BidirError(f"{name} must be a number >= {least}, got {value!r}")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model
