"""bidir-server: the command line over Runner (runner.py): parse, configure logging, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bidir_core.cli import run_cli
from bidir_serve.backend_args import add_backend_arguments
from bidir_serve.server.config import ServerConfig
from bidir_serve.server.runner import Runner

EXAMPLES = """examples:
  bidir-server smollm2-135m
  BIDIR_API_KEY=... bidir-server ./ckpt --host 0.0.0.0 --port 9000 --served-model-name my-embedder
  bidir-server ./ckpt --host 0.0.0.0 --allowed-hosts embed.example.com,*.internal --api-key "$(cat key.txt)"
  bidir-server ./onnx-export --backend onnxruntime --max-batch-tokens 32768 --max-wait-ms 5
  curl -s localhost:8080/v1/embeddings -H 'Content-Type: application/json' -d '{"input": ["hello"]}'
  bidir-server ./reranker-ckpt --port 8081
  curl -s localhost:8081/v2/rerank -H 'Content-Type: application/json' -d '{"query": "q", "documents": ["a", "b"]}'"""

LOG_LEVELS = ("debug", "info", "warning", "error")
API_KEY_ENV = "BIDIR_API_KEY"


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str]:
    d = ServerConfig("")
    p = argparse.ArgumentParser(
        prog="bidir-server",
        description="Serve a bidir model over an OpenAI-compatible HTTP API: POST /v1/embeddings (with NVIDIA NIM's "
        "input_type and truncate), GET /health, GET /v1/models, GET /metrics; a reranker model over POST /v1/rerank and "
        "/v2/rerank (Cohere, Jina), /rerank (TEI) and /v1/ranking (NIM). Concurrent requests are merged into "
        "token-budget batches.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint folder, .gguf, 'smollm2-135m', ONNX export or engine folder")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument(
        "--served-model-name",
        help="the model id clients send and /v1/models lists (default: MODEL's folder or file name)",
    )
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' of every request but GET /health (default: ${API_KEY_ENV}, which "
        "keeps the key out of the process list; neither: no key)",
    )
    p.add_argument(
        "--allowed-hosts",
        type=_host_list,
        default=d.allowed_hosts,
        help="comma-separated host names clients may send as Host besides IP addresses, localhost and --host "
        "(and this machine's name for a wildcard --host): the DNS names the server is reached by, e.g. behind a "
        "proxy; '*.example.com' patterns; '*' accepts any",
    )
    add_backend_arguments(p, d.backend)
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=d.max_batch_tokens,
        help=f"padded tokens per model batch (default {d.max_batch_tokens})",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=d.max_batch_size,
        help=f"rows per batch (default {d.max_batch_size})",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help=f"longest wait for more requests to fill a batch (default {d.max_wait_ms})",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=d.max_concurrency,
        help=f"requests in progress at once; more get 429 (default {d.max_concurrency})",
    )
    p.add_argument(
        "--max-inputs", type=int, default=d.max_inputs, help=f"inputs per request (default {d.max_inputs})"
    )
    p.add_argument(
        "--max-rerank-documents",
        type=int,
        default=d.max_rerank_documents,
        help=f"documents per rerank request (default {d.max_rerank_documents})",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        help=f"request body size (default {d.max_request_bytes})",
    )
    p.add_argument(
        "--max-request-tokens",
        type=int,
        default=d.max_request_tokens,
        help=f"tokens per request (default {d.max_request_tokens})",
    )
    p.add_argument(
        "--log-interval",
        type=float,
        default=d.log_interval,
        help=f"seconds between info summaries (default {d.log_interval:g})",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=d.timeout_keep_alive,
        help=f"seconds an idle connection stays open (default {d.timeout_keep_alive:g})",
    )
    p.add_argument(
        "--timeout-read",
        type=float,
        default=d.timeout_read,
        help=f"seconds a client has to send a request's headers, and then its body (default {d.timeout_read:g}); "
        "past it the connection is closed (a 408 for a body)",
    )
    p.add_argument(
        "--timeout-graceful-shutdown",
        type=float,
        default=d.timeout_graceful_shutdown,
        help="seconds SIGTERM waits for requests in progress before it answers them 503 and stops (default "
        f"{d.timeout_graceful_shutdown:g}; keep it below the orchestrator's wait before SIGKILL)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="debug logs one line per request")
    a = vars(p.parse_args(argv))
    log_level = a.pop("log_level")
    if a["api_key"] is None:
        a["api_key"] = os.environ.get(API_KEY_ENV) or None
    return ServerConfig(**a), log_level


def _host_list(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def serve(cfg: ServerConfig, log_level: str = "info") -> None:
    level = getattr(logging, log_level.upper())
    # debug is for the server's own lines (one per request), not every library's
    logging.basicConfig(
        level=max(level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("bidir_serve").setLevel(level)
    Runner(cfg, log_level=log_level).run()


def main(argv: list[str] | None = None) -> int:
    def work() -> None:
        serve(*parse_args(argv))

    return run_cli("bidir-server", work)


if __name__ == "__main__":
    sys.exit(main())
