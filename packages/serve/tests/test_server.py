"""bidir-server, live on loopback, driven by the real openai client (and raw HTTP for what a client would not send).

Parity: the server's vectors equal BiEncoder.encode_documents / encode_queries of the same checkpoint within 1e-5
(fp32 CPU: the only difference is how rows are batched and padded, which the padding mask makes irrelevant up to
float rounding)."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time

import numpy as np
import openai
import pytest
import torch
from server_testing import call, metric, serving, wait_ready

from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import tiny_encoder
from bidir_serve.backends import load_backend
from bidir_serve.server.cli import main

TOL = 1e-5


@pytest.fixture(scope="module")
def encoder():
    """max_length 48 (long texts are over it) and Matryoshka dims, so `dimensions` is allowed."""
    return tiny_encoder(EncoderConfig(max_length=48, matryoshka_dims=(16, 32))).eval()


@pytest.fixture(scope="module")
def checkpoint(encoder, tmp_path_factory):
    return encoder.save_pretrained(tmp_path_factory.mktemp("server") / "tiny-mrl")


@pytest.fixture(scope="module")
def server(checkpoint):
    with serving(checkpoint, max_wait_ms=20, max_inputs=64) as runner:
        yield runner


@pytest.fixture(scope="module")
def small(checkpoint):
    """Tight limits, two requests at once, and a long batch wait (so requests sit in the queue for a while)."""
    with serving(
        checkpoint,
        max_inputs=4,
        max_request_bytes=4096,
        max_request_tokens=100,
        max_concurrency=2,
        max_wait_ms=800,
        log_interval=0.2,
    ) as runner:
        yield runner


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def rows(response) -> np.ndarray:
    """The embeddings of a response, float lists or (when the caller asked for base64 itself, which the client then
    leaves undecoded) base64 little-endian float32."""
    assert [d.index for d in response.data] == list(range(len(response.data)))
    vectors = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
        if isinstance(d.embedding, str)
        else d.embedding
        for d in response.data
    ]
    return np.array(vectors, dtype=np.float32)


def short_texts(make_texts, n, seed=1):
    return make_texts(n, seed=seed, max_words=8)  # under max_length with the prefix


def test_texts_match_encode_documents(server, client, encoder, make_texts):
    texts = short_texts(make_texts, 20)
    response = client.embeddings.create(model=server.cfg.model_id, input=texts)  # the client asks for base64
    np.testing.assert_allclose(rows(response), encoder.encode_documents(texts), atol=TOL)
    prefix = encoder.config.passage_prefix
    tokens = sum(len(encoder.tokenizer(prefix + t)["input_ids"]) for t in texts)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    one = client.embeddings.create(model=server.cfg.model_id, input=texts[3], encoding_format="float")
    np.testing.assert_allclose(rows(one)[0], encoder.encode_documents([texts[3]])[0], atol=TOL)


def test_queries_get_the_query_prefix(server, client, encoder, make_texts):
    texts = short_texts(make_texts, 5, seed=2)
    response = client.embeddings.create(
        model=server.cfg.model_id, input=texts, encoding_format="float", extra_body={"input_type": "query"}
    )
    np.testing.assert_allclose(rows(response), encoder.encode_queries(texts), atol=TOL)
    assert np.abs(rows(response) - encoder.encode_documents(texts)).max() > 1e-3  # the prefix matters


def test_token_arrays_are_embedded_as_given(server, client, encoder, make_texts):
    texts = short_texts(make_texts, 5, seed=3)
    ids = [encoder.tokenizer(encoder.config.passage_prefix + t)["input_ids"] for t in texts]
    expected = encoder.encode_documents(texts)
    response = client.embeddings.create(model=server.cfg.model_id, input=ids)
    np.testing.assert_allclose(rows(response), expected, atol=TOL)
    assert response.usage.prompt_tokens == sum(map(len, ids))
    single = client.embeddings.create(model=server.cfg.model_id, input=ids[2], encoding_format="float")
    np.testing.assert_allclose(rows(single)[0], expected[2], atol=TOL)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize("dim", [16, 24])
def test_dimensions_truncate_and_renormalize(server, client, encoder, make_texts, dim, encoding_format):
    texts = short_texts(make_texts, 4, seed=4)
    response = client.embeddings.create(
        model=server.cfg.model_id, input=texts, dimensions=dim, encoding_format=encoding_format
    )
    got = rows(response)
    assert got.shape == (4, dim)
    np.testing.assert_allclose(got, encoder.encode_documents(texts, dim=dim), atol=TOL)


def test_truncate_end_is_batch_embeds_truncation_and_none_refuses(server, client, encoder, make_texts):
    texts = make_texts(8, seed=5, max_words=60)
    response = client.embeddings.create(
        model=server.cfg.model_id, input=texts, extra_body={"truncate": "END"}
    )
    np.testing.assert_allclose(rows(response), encoder.encode_documents(texts), atol=TOL)
    lengths = [len(encoder.tokenizer(encoder.config.passage_prefix + t)["input_ids"]) for t in texts]
    first_long = next(i for i, n in enumerate(lengths) if n > 48)
    status, body = call(server.url, "POST", "/v1/embeddings", {"input": texts})  # truncate NONE, the default
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert f"input[{first_long}] has {lengths[first_long]} tokens" in body["error"]["message"]


def test_truncate_start_keeps_the_prefix_and_the_texts_end(server, client, encoder):
    tok, prefix = encoder.tokenizer, encoder.config.passage_prefix
    candidates = ("the", "a", "fox", "dog", "over", "at", "quick", "brown", "lazy", "night", "while", "jumps")
    # words of one token each, so every suffix of the text has its own token count
    words = [w for w in candidates if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 2
    text = " ".join(words[i % len(words)] for i in range(200))
    # The suffix of the text (by words) that fills max_length exactly with the prefix: what START must keep.
    suffix = next(
        " ".join(text.split()[k:])
        for k in range(200)
        if len(tok(prefix + " ".join(text.split()[k:]))["input_ids"]) == 48
    )
    response = client.embeddings.create(
        model=server.cfg.model_id, input=[text], extra_body={"truncate": "START"}
    )
    assert response.usage.prompt_tokens == 48
    np.testing.assert_allclose(rows(response)[0], encoder.encode_documents([suffix])[0], atol=TOL)
    ids = tok(prefix + text)["input_ids"]
    arrays = client.embeddings.create(
        model=server.cfg.model_id, input=[ids], extra_body={"truncate": "START"}
    )
    np.testing.assert_allclose(rows(arrays)[0], _embed_ids(encoder, ids[-48:]), atol=TOL)


def _embed_ids(encoder, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        t = torch.tensor([ids])
        return encoder(t, torch.ones_like(t)).float().numpy()[0]


def test_concurrent_clients_each_get_their_own_rows_in_order(server, encoder, make_texts):
    n_clients = 12
    inputs = [short_texts(make_texts, 1 + k % 5, seed=100 + k) for k in range(n_clients)]
    expected = [encoder.encode_documents(texts) for texts in inputs]
    batches_before = metric(server.url, "bidir_server_batch_rows_count")
    start, results = threading.Barrier(n_clients), [None] * n_clients

    def client_thread(k: int) -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        start.wait()
        results[k] = rows(client.embeddings.create(model=server.cfg.model_id, input=inputs[k]))

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(n_clients):
        np.testing.assert_allclose(results[k], expected[k], atol=TOL, err_msg=f"client {k}")
    batches = metric(server.url, "bidir_server_batch_rows_count") - batches_before
    assert batches < n_clients  # requests were merged into shared batches


BAD = [
    ({"input": ""}, 400, "input is an empty string"),
    ({"input": ["a", ""]}, 400, "input[1] is an empty string"),
    ({"input": []}, 400, "input is an empty list"),
    ({"input": [[]]}, 400, "input[0] is an empty token list"),
    ({"input": 3}, 400, "input must be a string, a list of strings"),
    ({"input": {"text": "a"}}, 400, "got an object"),
    ({"input": ["a", 1]}, 400, "input[1] is an integer"),
    ({"input": [1.5]}, 400, "a list of numbers"),
    ({"input": [[1, "a"]]}, 400, "input[0][1] is a string, not a token id"),
    ({"input": [True]}, 400, "a list of booleans"),
    ({"input": [100000]}, 400, "input[0] holds 100000, not a token id"),
    ({"input": ["a"] * 65}, 400, "input has 65 items, more than the limit of 64"),
    ({"input": "a", "input_type": "document"}, 400, "input_type: Input should be 'query' or 'passage'"),
    ({"input": "a", "truncate": "MIDDLE"}, 400, "truncate: Input should be 'NONE', 'START' or 'END'"),
    ({"input": "a", "dimensions": 65}, 400, "dimensions=65 is larger than the model's embedding width 64"),
    ({"input": "a", "dimensions": 0}, 400, "dimensions: Input should be greater than 0"),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format: Input should be 'float' or 'base64'"),
    ({"input": "a", "model": "other"}, 404, "the model 'other' is not served here"),
    ({"input": "a", "inputs": "b"}, 400, "unknown field 'inputs'"),
    ({"text": "a"}, 400, "the field 'input' is required"),
    (b'{"input": "a",', 400, "the body is not valid JSON"),
    (b"not json", 400, "the body is not valid JSON"),
    (b'["a"]', 400, "the body must be a JSON object"),
]


@pytest.mark.parametrize(("body", "status", "phrase"), BAD, ids=[str(b[2])[:40] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, body, status, phrase):
    got, answer = call(server.url, "POST", "/v1/embeddings", body)
    assert got == status
    error = answer["error"]
    assert phrase in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "\n" not in error["message"]
    assert call(server.url, "POST", "/v1/embeddings", {"input": "still serving"})[0] == 200


def test_the_openai_client_sees_the_message(server, client):
    with pytest.raises(openai.BadRequestError, match="larger than the model's embedding width"):
        client.embeddings.create(model=server.cfg.model_id, input="a", dimensions=1000)


def test_dimensions_refused_for_a_model_without_matryoshka(tmp_path):
    plain = tiny_encoder(EncoderConfig(max_length=48)).eval().save_pretrained(tmp_path / "plain")
    with serving(plain) as runner:
        status, body = call(runner.url, "POST", "/v1/embeddings", {"input": "a", "dimensions": 16})
        assert status == 400 and "not trained for Matryoshka truncation" in body["error"]["message"]
        assert call(runner.url, "POST", "/v1/embeddings", {"input": "a", "dimensions": 64})[0] == 200


def test_models_and_metrics(server):
    status, models = call(server.url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [server.cfg.model_id]
    call(server.url, "POST", "/v1/embeddings", {"input": ""})
    call(server.url, "POST", "/v1/embeddings", {"input": ["x", "y"]})
    assert metric(server.url, 'bidir_server_requests_total{code="200"}') >= 1
    assert metric(server.url, 'bidir_server_errors_total{code="400",type="invalid_request_error"}') >= 1
    assert metric(server.url, "bidir_server_request_seconds_count") >= 2
    assert metric(server.url, "bidir_server_batch_rows_count") >= 1
    assert metric(server.url, "bidir_server_tokens_total") > 0
    assert metric(server.url, "bidir_server_ready") == 1
    assert call(server.url, "GET", "/nowhere")[1]["error"]["message"] == "Not Found"


def test_request_limits(small, encoder, make_texts):
    status, body = call(small.url, "POST", "/v1/embeddings", {"input": ["a"] * 5})
    assert status == 400 and body["error"]["code"] == "too_many_inputs"
    status, body = call(small.url, "POST", "/v1/embeddings", {"input": "x" * 5000})
    assert status == 413 and "larger than the limit of 4096 bytes" in body["error"]["message"]
    long = make_texts(4, seed=6, max_words=60)
    status, body = call(small.url, "POST", "/v1/embeddings", {"input": long, "truncate": "END"})
    assert status == 400 and "more than the limit of 100 per request" in body["error"]["message"]


def test_overload_is_refused_at_once_and_the_server_recovers(small):
    results = {}

    def slow(k: int) -> None:  # each waits ~0.8 s in the batcher (max_wait_ms) holding one of the two slots
        results[k] = call(small.url, "POST", "/v1/embeddings", {"input": f"slow {k}"})[0]

    holders = [threading.Thread(target=slow, args=(k,)) for k in range(2)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 5
    while metric(small.url, "bidir_server_requests_in_flight") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    burst = [call(small.url, "POST", "/v1/embeddings", {"input": "burst"}) for _ in range(10)]
    assert time.monotonic() - start < 0.6  # all ten answered before the two slow ones are done
    assert {status for status, _ in burst} == {429}
    assert "--max-concurrency" in burst[0][1]["error"]["message"]
    for t in holders:
        t.join()
    assert results == {0: 200, 1: 200}
    assert call(small.url, "POST", "/v1/embeddings", {"input": "after the burst"})[0] == 200


def test_a_disconnected_clients_work_is_dropped(small):
    batches = metric(small.url, "bidir_server_batch_rows_count")
    dropped = metric(small.url, "bidir_server_dropped_inputs_total")
    host, port = small.url.removeprefix("http://").rsplit(":", 1)
    body = b'{"input": ["one", "two", "three"]}'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 5
        while metric(small.url, "bidir_server_queue_depth") < 1:  # queued, waiting to fill a batch
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 5
    while metric(small.url, "bidir_server_dropped_inputs_total") < dropped + 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(1.0)  # past the batch wait: the model ran nothing for it
    assert metric(small.url, "bidir_server_batch_rows_count") == batches
    assert metric(small.url, "bidir_server_queue_depth") == 0


def test_health_is_503_until_the_model_is_loaded_and_warm(checkpoint):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return load_backend(checkpoint, "torch", device="cpu")

    with serving(checkpoint, load=slow_load) as runner:
        wait_until_listening(runner.url)
        assert call(runner.url, "GET", "/health") == (503, {"status": "loading"})
        status, body = call(runner.url, "POST", "/v1/embeddings", {"input": "early"})
        assert status == 503 and body["error"]["code"] == "loading"
        release.set()
        wait_ready(runner)
        assert call(runner.url, "POST", "/v1/embeddings", {"input": "now"})[0] == 200


def wait_until_listening(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            call(url, "GET", "/v1/models")
            return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_one_debug_line_per_request_and_an_info_summary(small, caplog):
    with caplog.at_level(logging.DEBUG, logger="bidir_serve.server"):
        assert call(small.url, "POST", "/v1/embeddings", {"input": ["a", "b"]})[0] == 200
        deadline = time.monotonic() + 3
        while not any("requests/s" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len([m for m in debug if m.startswith("POST /v1/embeddings 200")]) == 1
    assert any("2 inputs" in m for m in debug)
    summary = next(r for r in caplog.records if "requests/s" in r.getMessage())
    assert summary.levelno == logging.INFO and "tokens/s" in summary.getMessage()


def test_the_cli_reports_a_bad_model_or_port_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bidir-server: error: ") and "missing" in err[-1]
    assert not any("Traceback" in line for line in err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main([str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
