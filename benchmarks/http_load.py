"""The HTTP side of bench_server.py: a server under test as a subprocess (ready once GET /health answers 200,
stopped with SIGTERM) and the load, `concurrency` workers of one httpx.AsyncClient posting requests back to back
(OpenAI-style /embeddings, or NIM-style /v1/ranking for a reranker), each request timed.

Only loopback: every server here listens on 127.0.0.1, and every loop is bounded by its request count.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"


# --- a server under test -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A command started as a subprocess (or an already running URL), ready once GET /health answers 200."""

    name: str
    command: str | None
    fields: dict
    url: str | None = None
    log: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __enter__(self) -> Server:
        if self.command is None:
            wait_ready(self.name, self.url, None, None, 30)
            return self
        port = free_port()
        argv = shlex.split(self.command.format(host=HOST, port=port, **self.fields))
        self.url = f"http://{HOST}:{port}"
        print(f"{self.name}: starting {shlex.join(argv)}", flush=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.perf_counter()
        wait_ready(self.name, self.url, self.proc, self.log, 600)
        print(f"{self.name}: ready at {self.url} after {time.perf_counter() - start:.1f} s", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # a graceful stop first; then the process group, if it hangs
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.is_file():
        return ""
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def wait_ready(name: str, url: str, proc, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{name} exited with code {proc.returncode} before it was ready:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    if proc is not None:
        os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(f"{name} not ready at {url}/health after {timeout:.0f} s:\n{log_tail(log)}")


# --- the load ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str
    path: str
    model: str
    prefix: str
    """Prepended by the client (for a server that does not apply the model's passage prefix itself)."""
    encoding_format: str


def vectors(body: dict) -> np.ndarray:
    """The (rows, dim) float32 embeddings of an OpenAI response, in index order, float or base64."""
    rows = sorted(body["data"], key=lambda d: d["index"])
    return np.stack(
        [
            np.frombuffer(base64.b64decode(r["embedding"]), "<f4")
            if isinstance(r["embedding"], str)
            else np.asarray(r["embedding"], np.float32)
            for r in rows
        ]
    )


def embed_payload(ep: Endpoint, texts: list[str]) -> dict:
    return {"input": [ep.prefix + t for t in texts], "model": ep.model, "encoding_format": ep.encoding_format}


def embed_requests(ep: Endpoint, pool: list[str], size: int) -> Callable[[int], dict]:
    """Request k's body: the pool's texts k*size .. k*size+size-1 (cycling)."""
    return lambda k: embed_payload(ep, [pool[(k * size + j) % len(pool)] for j in range(size)])


def rank_payload(ep: Endpoint, query: str, documents: list[str]) -> dict:
    """A NIM /v1/ranking body (the route whose answer is the raw logit), over-long pairs cut as offline scoring does."""
    passages = [{"text": d} for d in documents]
    return {"model": ep.model, "query": {"text": query}, "passages": passages, "truncate": "END"}


def rank_requests(ep: Endpoint, requests: list[tuple[str, list[str]]]) -> Callable[[int], dict]:
    """Request k's body: the k-th (query, documents) of `requests` (cycling)."""
    return lambda k: rank_payload(ep, *requests[k % len(requests)])


async def drive(
    ep: Endpoint, payload: Callable[[int], dict], size: int, concurrency: int, requests: int
) -> dict:
    """`concurrency` workers send `requests` POSTs, request k with the body payload(k) holding `size` rows (texts, or
    pairs), back to back. Returns wall seconds, latencies and rows of the 200s, other statuses."""
    latencies, statuses, rows = [], {}, 0
    next_request = iter(range(requests))

    async def worker(client):
        nonlocal rows
        for k in next_request:  # one shared iterator: each request goes to whichever worker is free
            body = payload(k)
            start = time.perf_counter()
            try:
                response = await client.post(ep.url + ep.path, json=body)
                code = response.status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            if code == 200:
                latencies.append(time.perf_counter() - start)
                rows += size
            else:
                statuses[str(code)] = statuses.get(str(code), 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "latencies": latencies, "rows": rows, "errors": statuses}


async def _post_once(ep: Endpoint, body: dict) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        response = await client.post(ep.url + ep.path, json=body)
    if response.status_code != 200:
        sys.exit(f"{ep.url}{ep.path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


async def rank_once(ep: Endpoint, query: str, documents: list[str]) -> np.ndarray:
    """The (len(documents),) logits of one /v1/ranking request, in the documents' order."""
    logits = np.empty(len(documents), np.float32)
    for r in (await _post_once(ep, rank_payload(ep, query, documents)))["rankings"]:
        logits[r["index"]] = r["logit"]
    return logits


async def embed_once(ep: Endpoint, texts: list[str]) -> np.ndarray:
    return vectors(await _post_once(ep, embed_payload(ep, texts)))
