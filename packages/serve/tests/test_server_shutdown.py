"""bidir-server as a process: SIGTERM under load finishes every admitted request, then exits 0; a client too slow to
finish its request does not hold the shutdown past --timeout-graceful-shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from server_testing import call, metric, partial_post, read_until_closed, wait_ready


def start_server(model, *args: str) -> tuple[subprocess.Popen, str, list[str], threading.Thread]:
    """`python -m bidir_serve.server MODEL --port 0 ARGS` once ready: the process, its URL, the lines of its stderr
    (filled as they come by the returned thread)."""
    cmd = [sys.executable, "-m", "bidir_serve.server", str(model), "--port", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    url = None
    for line in proc.stderr:
        log.append(line)
        if found := re.search(r" on (http://\S+)", line):
            url = found.group(1)
            break
    if url is None:
        proc.kill()
        proc.wait()
        raise AssertionError("".join(log))
    drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    drain.start()
    wait_ready(url)
    return proc, url, log, drain


def test_sigterm_during_load_loses_no_accepted_request(tiny_checkpoint, encoder, make_texts):
    # A 10 s batch wait keeps the requests queued until the signal; the shutdown must run them at once.
    proc, url, log, drain = start_server(tiny_checkpoint, "--max-wait-ms", "10000")
    try:
        n = 6
        inputs = [make_texts(2, seed=200 + k, max_words=6) for k in range(n)]
        results: list = [None] * n

        def request(k: int) -> None:
            results[k] = call(url, "POST", "/v1/embeddings", {"input": inputs[k]})

        threads = [threading.Thread(target=request, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while metric(url, "bidir_server_queue_depth") < n:
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.02)

        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        assert time.monotonic() - signalled < 5  # run at the signal, not after the 10 s wait
        assert proc.wait(timeout=30) == 0, "".join(log)
        drain.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for k, (status, body) in enumerate(results):
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, encoder.encode_documents(inputs[k]), atol=1e-5)
    text = "".join(log)
    assert "Traceback" not in text
    assert "Application shutdown complete" in text


def test_sigterm_with_a_slow_client_connected_ends_after_the_graceful_timeout(tiny_checkpoint):
    # --timeout-read is long, so only the graceful-shutdown timeout can end the wait for the stalled body
    proc, url, log, drain = start_server(
        tiny_checkpoint, "--timeout-graceful-shutdown", "1", "--timeout-read", "120"
    )
    try:
        stalled = partial_post(url)
        time.sleep(0.3)  # its headers are in: uvicorn waits for the request
        assert call(url, "POST", "/v1/embeddings", {"input": "others are served"})[0] == 200
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.wait(timeout=30) == 0, "".join(log)
        assert time.monotonic() - signalled < 10
        answer = read_until_closed(stalled, within=5)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        stalled.close()
        drain.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(log)
    assert "Traceback" not in text, text
    assert "Application shutdown complete" in text
