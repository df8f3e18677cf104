"""bidir-server as a process: SIGTERM under load finishes every admitted request, then exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from server_testing import call, metric, wait_ready


def test_sigterm_during_load_loses_no_accepted_request(tiny_checkpoint, encoder, make_texts):
    # A 10 s batch wait keeps the requests queued until the signal; the shutdown must run them at once.
    cmd = [
        sys.executable,
        "-m",
        "bidir_serve.server",
        str(tiny_checkpoint),
        "--port",
        "0",
        "--max-wait-ms",
        "10000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    try:
        url = None
        for line in proc.stderr:
            log.append(line)
            if found := re.search(r" on (http://\S+)", line):
                url = found.group(1)
                break
        assert url, "".join(log)
        drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        drain.start()
        wait_ready(url)

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
