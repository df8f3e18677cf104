"""The server's counters: Prometheus metrics for GET /metrics (prometheus_client, one registry per app, so two
servers in one process keep theirs apart) and the figures of the periodic info summary."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

POWERS_OF_TWO = tuple(float(2**k) for k in range(11))  # 1 .. 1024 rows
TOKEN_BUCKETS = tuple(float(2**k) for k in range(6, 18))  # 64 .. 131072 padded tokens
MAX_LATENCIES = 100_000
"""Latencies kept for the summary's percentiles (a cap, so a long interval under load stays bounded)."""


class Metrics:
    """Updated by the event loop (requests) and the model thread (batches); prometheus_client is thread-safe and
    the summary's own figures are kept under a lock."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "bidir_server_requests",
            "Requests answered (embeddings or rerank), by HTTP status",
            ["code"],
            registry=r,
        )
        self.errors = Counter(
            "bidir_server_errors",
            "Requests refused or failed, by HTTP status and error type",
            ["code", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "bidir_server_request_seconds", "Request latency, arrival to response", registry=r
        )
        self.inputs = Counter(
            "bidir_server_inputs", "Inputs run through the model (texts, or a reranker's pairs)", registry=r
        )
        self.tokens = Counter(
            "bidir_server_tokens", "Real (unpadded) tokens run through the model", registry=r
        )
        self.tokens_per_second = Gauge(
            "bidir_server_tokens_per_second",
            "Tokens embedded per second over the last summary interval",
            registry=r,
        )
        self.batch_rows = Histogram(
            "bidir_server_batch_rows", "Rows per model batch", buckets=POWERS_OF_TWO, registry=r
        )
        self.batch_tokens = Histogram(
            "bidir_server_batch_padded_tokens",
            "Padded tokens per model batch",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "bidir_server_dropped_inputs",
            "Inputs of cancelled or disconnected requests dropped before the model ran them",
            registry=r,
        )
        self.queue_depth = Gauge("bidir_server_queue_depth", "Requests waiting for the model", registry=r)
        self.in_flight = Gauge(
            "bidir_server_requests_in_flight",
            "Requests admitted (their body read): tokenizing, queued or running",
            registry=r,
        )
        self.ready = Gauge("bidir_server_ready", "1 once the model is loaded and warmed up", registry=r)
        self._lock = threading.Lock()
        self._since = time.monotonic()
        self._window = _Window()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, code: int, seconds: float, error_type: str | None = None) -> None:
        self.requests.labels(code=str(code)).inc()
        self.latency.observe(seconds)
        if error_type is not None:
            self.errors.labels(code=str(code), type=error_type).inc()
        with self._lock:
            w = self._window
            w.requests += 1
            w.errors += error_type is not None
            if len(w.latencies) < MAX_LATENCIES:
                w.latencies.append(seconds)

    def batch(self, rows: int, padded_tokens: int, tokens: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(padded_tokens)
        self.inputs.inc(rows)
        self.tokens.inc(tokens)
        with self._lock:
            self._window.batches += 1
            self._window.rows += rows
            self._window.tokens += tokens

    def summary(self) -> str | None:
        """One line on the interval since the last call (None when it had no requests); sets tokens/s."""
        now = time.monotonic()
        with self._lock:
            w, self._window = self._window, _Window()
            seconds, self._since = max(now - self._since, 1e-9), now
        self.tokens_per_second.set(w.tokens / seconds)
        if not w.requests:
            return None
        lat = sorted(w.latencies)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        mean_rows = w.rows / max(w.batches, 1)
        return (
            f"{w.requests} requests ({w.errors} errors), {w.rows} inputs, {w.tokens} tokens in {seconds:.0f} s: "
            f"{w.requests / seconds:.1f} requests/s, {w.tokens / seconds:.0f} tokens/s, {w.batches} batches of "
            f"{mean_rows:.1f} rows on average, latency p50 {p50 * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms"
        )


class _Window:
    """What the summary reports on, since the last summary."""

    def __init__(self):
        self.requests = self.errors = self.batches = self.rows = self.tokens = 0
        self.latencies: list[float] = []
