"""Helpers of the bidir-server tests: a live server on a free loopback port (in a thread), and raw HTTP calls.

(Not in conftest.py: a test importing conftest gets another folder's when several packages' tests run in one pytest.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

from bidir_serve.server import Runner, ServerConfig


@contextlib.contextmanager
def serving(model, load=None, **settings) -> Iterator[Runner]:
    """A bidir-server on 127.0.0.1 and a port the system picks, ready (GET /health is 200) unless `load` is given
    (then it may still be loading); shut down gracefully on exit."""
    runner = Runner(ServerConfig(str(model), port=0, **settings), load=load)
    thread = threading.Thread(target=runner.run, name="test-server", daemon=True)
    thread.start()
    try:
        if load is None:
            wait_ready(runner)
        yield runner
    finally:
        runner.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not shut down"


def wait_ready(runner_or_url, timeout: float = 60.0) -> None:
    url = runner_or_url if isinstance(runner_or_url, str) else runner_or_url.url
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if call(url, "GET", "/health")[0] == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready in {timeout} s")


def call(
    url: str,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
):
    """(status, parsed JSON body or text) of one request on a fresh connection; `headers` are sent besides (or
    instead of) Content-Type: application/json for a body and the Host http.client writes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text
    finally:
        conn.close()


def metric(url: str, name: str) -> float:
    """The value of one sample (`name` with its labels, as /metrics writes it), 0 when absent."""
    for line in call(url, "GET", "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def connect(url: str) -> socket.socket:
    """A raw TCP connection to the server, for what no HTTP client would send."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)


def partial_post(url: str, sent: bytes = b'{"input": "a', length: int = 100) -> socket.socket:
    """A connection that sent the headers of POST /v1/embeddings announcing `length` bytes of body, then only `sent`."""
    sock = connect(url)
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
        + sent
    )
    return sock


def read_until_closed(sock: socket.socket, within: float) -> bytes:
    """All the server sends on sock until it closes the connection, which must happen within `within` seconds."""
    deadline = time.monotonic() + within
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the server did not close the connection within {within} s (got {data[:80]!r})"
        if select.select([sock], [], [], left)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
