"""bidir-server when the model misbehaves: non-finite embeddings or a failing batch are a 500 for the requests in
that batch (never numbers), and the server goes on serving; a model that fails its warm-up never serves."""

from __future__ import annotations

import numpy as np
import pytest
from server_testing import call, serving, wait_ready

from bidir_core.errors import BidirError
from bidir_serve.backends import load_backend
from bidir_serve.server import Runner, ServerConfig

NAN_TOKEN, FAIL_TOKEN = 7, 8


class Faulty:
    """The torch backend, except that rows holding NAN_TOKEN come out NaN and a batch holding FAIL_TOKEN raises."""

    def __init__(self, inner, always_nan: bool = False):
        self._inner, self._always_nan = inner, always_nan

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def prepare(self, rows: list[list[int]]) -> tuple[list[list[int]], object]:
        return rows, self._inner.prepare(rows)  # the rows kept, to find the tokens in embed

    def embed(self, inputs: tuple[list[list[int]], object]) -> np.ndarray:
        rows, prepared = inputs
        if any(FAIL_TOKEN in row for row in rows):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = self._inner.embed(prepared)
        out[np.array([NAN_TOKEN in row for row in rows]) | self._always_nan] = np.nan
        return out


def test_non_finite_or_failed_batches_are_500s_and_the_server_goes_on(tiny_checkpoint):
    with serving(
        tiny_checkpoint, load=lambda: Faulty(load_backend(tiny_checkpoint, "torch", device="cpu"))
    ) as r:
        wait_ready(r)
        status, body = call(r.url, "POST", "/v1/embeddings", {"input": [[1, 5, NAN_TOKEN]]})
        assert status == 500 and body["error"]["code"] == "non_finite"
        assert "non-finite" in body["error"]["message"]
        status, body = call(r.url, "POST", "/v1/embeddings", {"input": [[1, FAIL_TOKEN]]})
        assert status == 500 and "the model failed on a batch (RuntimeError)" in body["error"]["message"]
        status, body = call(r.url, "POST", "/v1/embeddings", {"input": [[1, 5, 6]]})
        assert status == 200 and np.isfinite(body["data"][0]["embedding"]).all()


def test_a_model_that_gives_nan_at_warm_up_never_serves(tiny_checkpoint):
    runner = Runner(
        ServerConfig(str(tiny_checkpoint), port=0),
        load=lambda: Faulty(load_backend(tiny_checkpoint, "torch", device="cpu"), always_nan=True),
    )
    with pytest.raises(BidirError, match="non-finite .* for its warm-up text"):
        runner.run()  # ends by itself: the model thread's failure stops the server
