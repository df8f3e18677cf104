"""bidir-server's limits against slow and heavy clients, on real sockets against a live server with short
timeouts: a client slow to send its request holds a connection for at most --timeout-read and never a slot; idle and
half-sent connections are closed; one big request neither holds the tokenizer from others nor is tokenized in full
before its refusal; a client gone mid-body is no error; a setting that would hang the server is refused at start."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
from server_testing import call, connect, metric, partial_post, read_until_closed, serving, wait_ready

from bidir_core.checkpoint import EncoderConfig
from bidir_core.errors import BidirError
from bidir_core.testing import tiny_encoder
from bidir_serve.backends import load_backend
from bidir_serve.server import ServerConfig, tokens
from bidir_serve.server.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return (
        tiny_encoder(EncoderConfig(max_length=48))
        .eval()
        .save_pretrained(tmp_path_factory.mktemp("lim") / "tiny")
    )


# --- item 1: a slow client holds no slot, and every half-sent or idle connection is closed ---------------------------


def test_clients_stalled_mid_body_hold_no_slot_and_get_a_408(checkpoint):
    with serving(checkpoint, max_concurrency=2, timeout_read=3.0) as runner:
        stalled = [partial_post(runner.url) for _ in range(4)]  # more than the two slots
        try:
            time.sleep(0.3)  # their headers are in and the app is reading their bodies
            status, body = call(runner.url, "POST", "/v1/embeddings", {"input": "not locked out"})
            assert status == 200, body
            assert metric(runner.url, "bidir_server_requests_in_flight") == 0
            for sock in stalled:
                answer = read_until_closed(sock, within=10)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b"connection: close" in answer.lower() and b"--timeout-read" in answer
        finally:
            for sock in stalled:
                sock.close()
        assert metric(runner.url, 'bidir_server_errors_total{code="408",type="invalid_request_error"}') == 4


def test_idle_and_half_sent_connections_are_closed(checkpoint):
    with serving(checkpoint, timeout_read=1.0, timeout_keep_alive=1.0) as runner:
        socks = []
        for k in range(50):
            kind = k % 5
            if kind == 0:  # connected, nothing sent
                sock = connect(runner.url)
            elif kind == 1:  # half the headers, then nothing
                sock = connect(runner.url)
                sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: local")
            elif kind == 2:  # the headers, a few bytes of the body
                sock = partial_post(runner.url)
            elif kind == 3:  # a whole request and its answer, then part of the next one's headers
                sock = connect(runner.url)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                sock.recv(65536)
                sock.sendall(b"GET /hea")
            else:  # a request whose body the app never reads (no such route), left half-sent
                sock = connect(runner.url)
                sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\n\r\nabc")
            socks.append(sock)
        start = time.monotonic()
        try:
            for sock in socks:
                read_until_closed(sock, within=15)
        finally:
            for sock in socks:
                sock.close()
        assert time.monotonic() - start < 10
        assert call(runner.url, "GET", "/health")[0] == 200


def test_headers_trickled_a_byte_at_a_time_are_cut_off(checkpoint):
    """--timeout-read counts from a request's first byte: a byte now and then does not restart it."""
    with serving(checkpoint, timeout_read=1.0) as runner, connect(runner.url) as sock:
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"x" * 200
        start = time.monotonic()
        with pytest.raises(OSError):  # the server closed it: a send fails (broken pipe or reset)
            for byte in request:  # bounded: 200+ bytes at 0.05 s is > 10 s; the server cuts it at ~1 s
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - start < 5


# --- item 5: one big request neither stalls the others nor is tokenized in full before its refusal --------------------


class CountingTokenizer:
    """The real tokenizer, taking `per_text` seconds per text it is given (as a tokenizer of real size would), and
    keeping every text it saw."""

    def __init__(self, inner, per_text: float = 0.0):
        self._inner, self._per_text = inner, per_text
        self.seen: set[str] = set()
        self.busy = threading.Event()
        """Set once it was given more than one text at once."""

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def __call__(self, texts, *args, **kwargs):
        self.seen.update(texts)
        if len(texts) > 1:
            self.busy.set()
        time.sleep(self._per_text * len(texts))
        return self._inner(texts, *args, **kwargs)


class WithTokenizer:
    """A backend whose tokenizer is replaced."""

    def __init__(self, inner, tokenizer):
        self._inner, self.tokenizer = inner, tokenizer

    def __getattr__(self, name):
        return getattr(self._inner, name)


def big_texts(n: int, words: int = 60) -> list[str]:
    return [f"big {i} " + " ".join(["quick brown fox"] * (words // 3)) for i in range(n)]


def test_a_big_request_takes_turns_with_a_small_one_and_stops_at_the_token_limit(checkpoint, monkeypatch):
    # ~10 of the big texts per part (a real part is 64k characters); raising=False: the test still runs (and fails) on a
    # server that tokenizes a request in one go
    monkeypatch.setattr(tokens, "PART_CHARS", 3000, raising=False)
    tok = CountingTokenizer(load_backend(checkpoint, "torch", device="cpu").tokenizer, per_text=0.01)
    limit = 3000
    texts = big_texts(300)  # 48 tokens each after truncation: 14,400 in all, past the limit after 63 texts
    assert sum(map(len, texts)) < 4 * 9 * limit  # under the character bound: only tokenizing can tell
    with serving(
        checkpoint,
        load=lambda: WithTokenizer(load_backend(checkpoint, "torch", device="cpu"), tok),
        max_request_tokens=limit,
    ) as runner:
        wait_ready(runner)
        done: dict[str, float] = {}
        result = {}

        def big() -> None:
            result["big"] = call(runner.url, "POST", "/v1/embeddings", {"input": texts, "truncate": "END"})
            done["big"] = time.monotonic()

        thread = threading.Thread(target=big)
        thread.start()
        assert tok.busy.wait(30)  # the big request is being tokenized
        small = call(runner.url, "POST", "/v1/embeddings", {"input": "one word"})
        done["small"] = time.monotonic()
        thread.join(60)
    assert small[0] == 200
    status, body = result["big"]
    assert status == 400 and body["error"]["code"] == "too_many_tokens", body
    assert "more than the limit of 3000 per request" in body["error"]["message"]
    assert done["small"] < done["big"]  # answered while the big one was still being tokenized
    tokenized = {t for t in tok.seen if t.startswith(("passage: big", "big"))}
    assert len(tokenized) < len(texts) / 2  # stopped soon after the limit, not after all 300


def test_texts_too_long_for_the_token_limit_are_refused_before_tokenizing(checkpoint):
    tok = CountingTokenizer(load_backend(checkpoint, "torch", device="cpu").tokenizer)
    with serving(
        checkpoint,
        load=lambda: WithTokenizer(load_backend(checkpoint, "torch", device="cpu"), tok),
        max_request_tokens=100,
    ) as runner:
        wait_ready(runner)
        # 10 texts of 1,000+ characters: more than 100 tokens can stand for (4 x 100 x 9 characters, 9 being the
        # longest token of the tiny tokenizer)
        status, body = call(
            runner.url, "POST", "/v1/embeddings", {"input": big_texts(10, 180), "truncate": "END"}
        )
        assert status == 400 and body["error"]["code"] == "too_many_tokens", body
        assert "more than the limit of 100 tokens per request can cover" in body["error"]["message"]
        assert not [t for t in tok.seen if "big" in t]  # none of them was tokenized
        assert call(runner.url, "POST", "/v1/embeddings", {"input": "short"})[0] == 200


def test_a_token_limit_error_names_the_inputs_counted(checkpoint, monkeypatch):
    monkeypatch.setattr(tokens, "PART_CHARS", 300)
    with serving(checkpoint, max_request_tokens=200) as runner:
        status, body = call(runner.url, "POST", "/v1/embeddings", {"input": big_texts(20), "truncate": "END"})
    assert status == 400
    assert body["error"]["message"].startswith("input[0..")
    assert "already have" in body["error"]["message"]


# --- item 7: a client gone mid-body is no error; a setting that would hang the server is refused ----------------------


def test_a_client_gone_mid_body_is_a_499_not_an_error(checkpoint, caplog):
    with serving(checkpoint) as runner, caplog.at_level(logging.INFO):
        sock = partial_post(runner.url)
        time.sleep(0.3)  # the app is reading the body
        sock.close()
        deadline = time.monotonic() + 10
        while metric(runner.url, 'bidir_server_requests_total{code="499"}') < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(runner.url, 'bidir_server_requests_total{code="500"}') == 0
        assert metric(runner.url, 'bidir_server_errors_total{code="499",type="client_disconnected"}') == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_wait_ms", math.inf),
        ("max_wait_ms", math.nan),
        ("max_wait_ms", 1e9),
        ("log_interval", math.inf),
        ("timeout_read", math.inf),
        ("timeout_read", 0),
        ("timeout_keep_alive", -1),
        ("timeout_graceful_shutdown", math.inf),
    ],
)
def test_non_finite_or_absurd_numbers_are_refused(setting, value):
    with pytest.raises(BidirError, match=f"{setting} must be a number in"):
        ServerConfig("m", **{setting: value})


def test_the_cli_refuses_max_wait_inf_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--port", "0", "--max-wait-ms", "inf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_wait_ms must be a number in 0..60000, got inf" in err
