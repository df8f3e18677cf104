"""bidir-server with a reranker: Cohere / Jina /v1/rerank and /v2/rerank (raw HTTP and the cohere SDK), TEI /rerank,
NIM /v1/ranking; the scores against CrossEncoder.predict on the same pairs, bad requests in each API's error shape,
the kind refusals, and concurrent requests sharing batches.

Tolerance 1e-5 on logits, as test_scorer.py: the same fp32 model on CPU, the server's batches (other pairs beside a
request's, packed) against predict's; the sigmoid is compared after it (its slope is at most 1/4).
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from server_testing import call, metric, serving, wait_ready

from bidir_core import BidirError
from bidir_core.reranker_config import tokenize_pairs
from bidir_core.tokenization import max_chars
from bidir_serve.backends import load_backend
from bidir_serve.server import Runner, ServerConfig, rerank_schema

ATOL = 1e-5
QUERY = "sort a list"
DOCS = ["return a new sorted list", "the quick brown fox", "open a file", "sort the list in place"]
LONG = "the quick brown fox jumps over the lazy dog " * 20  # past max_length 48 with any query


def sigmoid(x):
    """The textbook formula, the oracle of the server's overflow-safe one."""
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


@pytest.fixture(scope="module")
def server(reranker_checkpoint):
    with serving(reranker_checkpoint, max_rerank_documents=40, max_wait_ms=50) as runner:
        yield runner


@pytest.fixture(scope="module")
def logits(reranker):
    """predict()'s logits of (query, document) pairs, the oracle."""

    def of(query, docs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the count of cut pairs
            return reranker.predict([(query, d) for d in docs])

    return of


def _order(scores):
    return list(np.argsort(-np.asarray(scores), kind="stable"))


def test_cohere_rerank_raw(server, reranker, logits):
    want = logits(QUERY, DOCS)
    docs = [DOCS[0], {"text": DOCS[1], "title": "fox"}, *DOCS[2:]]
    for path in ("/v1/rerank", "/v2/rerank"):
        status, body = call(
            server.url,
            "POST",
            path,
            {
                "model": "tiny-reranker",
                "query": QUERY,
                "documents": docs,
                "top_n": 3,
                "return_documents": True,
            },  # fmt: skip
        )
        assert status == 200, body
        assert body["model"] == "tiny-reranker" and body["id"]
        got = body["results"]
        assert [r["index"] for r in got] == _order(want)[:3]
        np.testing.assert_allclose(
            [r["relevance_score"] for r in got], sigmoid(want[_order(want)[:3]]), atol=ATOL
        )
        assert all(0 < r["relevance_score"] < 1 for r in got)
        assert [r["document"] for r in got] == [
            {"text": DOCS[i], **({"title": "fox"} if i == 1 else {})} for i in _order(want)[:3]
        ]
        ids, _ = tokenize_pairs(reranker.tokenizer, reranker.config, [(QUERY, d) for d in DOCS])
        assert body["usage"]["total_tokens"] == body["meta"]["tokens"]["input_tokens"] == sum(map(len, ids))
    # top_n past the list: the whole list (as Cohere); no return_documents: no documents
    status, body = call(server.url, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 99})
    assert status == 200 and len(body["results"]) == len(DOCS)
    assert all("document" not in r for r in body["results"])


def test_cohere_sdk(server, logits):
    cohere = pytest.importorskip("cohere")
    want = logits(QUERY, DOCS)
    v2 = cohere.ClientV2(api_key="unused", base_url=server.url)
    got = v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in got.results] == _order(want)[:2]
    np.testing.assert_allclose(
        [r.relevance_score for r in got.results], sigmoid(want[_order(want)[:2]]), atol=ATOL
    )
    v1 = cohere.Client(api_key="unused", base_url=server.url)
    got = v1.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, return_documents=True)
    assert [r.document.text for r in got.results] == [DOCS[i] for i in _order(want)]
    with pytest.raises(cohere.errors.BadRequestError) as e:
        v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, top_n=0)
    assert e.value.body["message"] == "top_n must be at least 1, got 0"


def test_tei_rerank(server, logits):
    want = logits(QUERY, DOCS)
    status, body = call(server.url, "POST", "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert status == 200 and isinstance(body, list)
    assert [r["index"] for r in body] == _order(want)
    np.testing.assert_allclose([r["score"] for r in body], sigmoid(want[_order(want)]), atol=ATOL)
    assert [r["text"] for r in body] == [DOCS[i] for i in _order(want)]
    status, body = call(server.url, "POST", "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
    assert status == 200 and all("text" not in r for r in body)
    np.testing.assert_allclose([r["score"] for r in body], want[_order(want)], atol=ATOL)
    # truncate false (the default) refuses an over-long pair as TEI does: 422, error_type validation
    status, body = call(server.url, "POST", "/rerank", {"query": QUERY, "texts": [DOCS[0], LONG]})
    assert status == 422 and body["error_type"] == "validation", body
    assert body["error"].startswith("texts[1] with the query has ")
    assert "max_length of 48" in body["error"] and "truncate true" in body["error"]
    status, body = call(server.url, "POST", "/rerank", {"query": QUERY, "texts": [DOCS[0], LONG], "truncate": True,
                                                        "raw_scores": True})  # fmt: skip
    assert status == 200
    np.testing.assert_allclose(
        sorted(r["score"] for r in body), sorted(logits(QUERY, [DOCS[0], LONG])), atol=ATOL
    )
    status, body = call(server.url, "POST", "/rerank", {"query": QUERY, "texts": []})
    assert (status, body["error_type"]) == (400, "empty")
    status, body = call(
        server.url, "POST", "/rerank", {"query": QUERY, "texts": DOCS, "truncation_direction": "left"}
    )
    assert (status, body["error_type"]) == (422, "validation") and "truncation_direction" in body["error"]


def test_nim_ranking(server, logits):
    want = logits(QUERY, DOCS)
    request = {"model": "tiny-reranker", "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS]}
    status, body = call(server.url, "POST", "/v1/ranking", request)
    assert status == 200
    assert [r["index"] for r in body["rankings"]] == _order(want)
    np.testing.assert_allclose([r["logit"] for r in body["rankings"]], want[_order(want)], atol=ATOL)
    assert body["usage"]["total_tokens"] > 0
    request["passages"].append({"text": LONG})
    status, body = call(server.url, "POST", "/v1/ranking", request)  # truncate NONE, the default
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["message"].startswith("passages[4] with the query has")
    assert 'send truncate "END"' in body["error"]["message"]
    status, body = call(server.url, "POST", "/v1/ranking", {**request, "truncate": "END"})
    assert status == 200
    want = logits(QUERY, [*DOCS, LONG])
    np.testing.assert_allclose([r["logit"] for r in body["rankings"]], want[_order(want)], atol=ATOL)


@pytest.mark.parametrize(
    "path, request_, status, needle",
    [
        ("/v1/rerank", {"query": "", "documents": DOCS}, 400, "query is an empty string"),
        ("/v1/rerank", {"query": "  ", "documents": DOCS}, 400, "query holds only whitespace"),
        ("/v1/rerank", {"query": QUERY, "documents": []}, 400, "documents is an empty list"),
        ("/v2/rerank", {"query": QUERY, "documents": ["a", ""]}, 400, "documents[1] is an empty string"),
        (
            "/v2/rerank",
            {"query": QUERY, "documents": ["a", {"title": "x"}]},
            400,
            "documents[1] must be a string",
        ),
        ("/v2/rerank", {"query": QUERY, "documents": ["a", 3]}, 400, "got an integer"),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": DOCS, "top_n": -1},
            400,
            "top_n must be at least 1, got -1",
        ),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": ["d"] * 41},
            400,
            "documents has 41 items, more than the limit of 40",
        ),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": DOCS, "rank_fields": ["x"]},
            400,
            "unknown field 'rank_fields'",
        ),
        (
            "/v1/rerank",
            {"model": "other", "query": QUERY, "documents": DOCS},
            404,
            "'other' is not served here",
        ),
        ("/v1/rerank", {"documents": DOCS}, 400, "the field 'query' is required"),
        ("/rerank", {"query": QUERY, "texts": ["a", "  "]}, 422, "texts[1] holds only whitespace"),
        ("/rerank", {"query": QUERY, "texts": ["d"] * 41}, 422, "texts has 41 items"),
        (
            "/v1/ranking",
            {"query": {"text": ""}, "passages": [{"text": "a"}]},
            400,
            "query.text is an empty string",
        ),
        (
            "/v1/ranking",
            {"query": {"text": "q"}, "passages": [{"txt": "a"}]},
            400,
            "the field 'passages[0].text' is required",
        ),
        (
            "/v1/ranking",
            {"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"},
            400,
            "truncate",
        ),
    ],
)
def test_bad_requests_in_each_apis_shape(server, path, request_, status, needle):
    got, body = call(server.url, "POST", path, request_)
    assert got == status, body
    message = {"/rerank": lambda b: b["error"], "/v1/ranking": lambda b: b["error"]["message"]}.get(
        path, lambda b: b["message"]
    )(body)
    assert needle in message and "\n" not in message, message
    assert call(server.url, "POST", path, _good(path))[0] == 200  # and the server goes on serving


def _good(path):
    if path == "/rerank":
        return {"query": QUERY, "texts": DOCS}
    if path == "/v1/ranking":
        return {"query": {"text": QUERY}, "passages": [{"text": d} for d in DOCS]}
    return {"query": QUERY, "documents": DOCS}


def test_ten_thousand_documents_are_refused_at_once(reranker_checkpoint):
    with serving(reranker_checkpoint) as runner:  # the default limit
        status, body = call(
            runner.url, "POST", "/v2/rerank", {"query": QUERY, "documents": ["a doc"] * 10_000}
        )
        assert status == 400 and "more than the limit of 1000 per request" in body["message"]
        assert metric(runner.url, "bidir_server_inputs_total") == 0  # nothing ran


def test_one_server_one_kind(server, tiny_checkpoint):
    status, body = call(server.url, "POST", "/v1/embeddings", {"input": "hello"})
    assert status == 400 and body["error"]["code"] == "wrong_model_kind"
    assert (
        "needs an embedder model; this server serves the reranker 'tiny-reranker'" in body["error"]["message"]
    )
    with serving(tiny_checkpoint) as embedder:
        status, body = call(embedder.url, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS})
        assert status == 400 and "/v1/rerank needs a reranker model" in body["message"]
        assert "use POST /v1/embeddings" in body["message"]
        status, body = call(embedder.url, "POST", "/rerank", {"query": QUERY, "texts": DOCS})
        assert (status, body["error_type"]) == (424, "backend")
        status, body = call(
            embedder.url, "POST", "/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}]}
        )
        assert status == 400 and body["error"]["code"] == "wrong_model_kind"


def test_concurrent_requests_share_batches_and_keep_their_scores(server, logits, texts):
    """Eight requests at once, each its own query and documents: the model thread merges them into fewer batches
    than requests (--max-wait-ms 50 lets them gather), and each gets predict()'s scores of its own pairs."""
    requests = [(texts[i][:30], [t[:200] for t in texts[8 + 5 * i : 13 + 5 * i]]) for i in range(8)]
    before = metric(server.url, "bidir_server_batch_rows_count")
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(k):
        query, docs = requests[k]
        barrier.wait()
        results[k] = call(server.url, "POST", "/v1/ranking", {"query": {"text": query},
                                                              "passages": [{"text": d} for d in docs],
                                                              "truncate": "END"})  # fmt: skip

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches = metric(server.url, "bidir_server_batch_rows_count") - before
    assert 1 <= batches < len(requests)
    for (query, docs), (status, body) in zip(requests, results, strict=True):
        assert status == 200, body
        want = logits(query, docs)
        got = np.empty(len(docs))
        for r in body["rankings"]:
            got[r["index"]] = r["logit"]
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_scores_in_float64_and_ties_keep_the_documents_order():
    logits = np.array([-1000, 0, 1000, 40, 40], np.float32)
    with np.errstate(
        over="raise", invalid="raise"
    ):  # no overflow either side (exp(-1000) underflows to 0: fine)
        scores = rerank_schema.sigmoid(logits)
    assert scores.dtype == np.float64 and scores.tolist()[:3] == [0.0, 0.5, 1.0]
    assert scores[3] == scores[2] == 1.0  # the sigmoid saturates: the ranking goes by the logit
    assert rerank_schema.ranking(logits) == [2, 3, 4, 1, 0] and rerank_schema.ranking(logits, 2) == [2, 3]


def test_admission_key_and_tei_429(reranker_checkpoint):
    """A rerank request passes the API key check (the cohere SDK sends it as a Bearer token) and the admission
    limit: past --max-concurrency, TEI's route answers 429 error_type overloaded at once."""
    cohere = pytest.importorskip("cohere")
    with serving(reranker_checkpoint, api_key="sesame", max_concurrency=1, max_wait_ms=800) as runner:
        assert (
            cohere.ClientV2(api_key="sesame", base_url=runner.url)
            .rerank(model="tiny-reranker", query=QUERY, documents=DOCS)
            .results
        )
        with pytest.raises(cohere.errors.UnauthorizedError):
            cohere.ClientV2(api_key="wrong", base_url=runner.url).rerank(
                model="tiny-reranker", query=QUERY, documents=DOCS
            )
        key = {"Authorization": "Bearer sesame"}
        held = {}
        holder = threading.Thread(  # waits ~0.8 s in the batcher (max_wait_ms), holding the one slot
            target=lambda: held.setdefault(
                "status", call(runner.url, "POST", "/rerank", _good("/rerank"), headers=key)[0]
            )  # fmt: skip
        )
        holder.start()
        deadline = time.monotonic() + 10
        while metric_with_key(runner.url, key) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = call(runner.url, "POST", "/rerank", _good("/rerank"), headers=key)
        assert (status, body["error_type"]) == (429, "overloaded") and "--max-concurrency" in body["error"]
        holder.join()
        assert held == {"status": 200}


def metric_with_key(url, headers):
    for line in call(url, "GET", "/metrics", headers=headers)[1].splitlines():
        if line.startswith("bidir_server_requests_in_flight "):
            return float(line.split()[-1])
    return 0.0


def test_huge_query_and_documents_score_as_predict(server, reranker, logits):
    """A query and documents far past what max_length tokens can cover (the server cuts each to that many
    characters before formatting: the kept tokens do not change) score as predict() scores the whole texts."""
    huge = "the quick brown fox jumps over the lazy dog " * 1000  # 44k characters
    assert len(huge) > max_chars(reranker.tokenizer, reranker.config.max_length)
    for query, docs in ((QUERY, [huge, DOCS[0]]), (huge, DOCS)):
        body = {"query": {"text": query}, "passages": [{"text": d} for d in docs], "truncate": "END"}
        status, got = call(server.url, "POST", "/v1/ranking", body)
        assert status == 200
        want = logits(query, docs)
        np.testing.assert_allclose([r["logit"] for r in got["rankings"]], want[_order(want)], atol=ATOL)


class NanScorer:
    """The torch scorer, but NaN for every pair of a batch of more than `rows` pairs."""

    def __init__(self, inner, rows: int):
        self._inner, self._rows = inner, rows

    def score(self, inputs):
        out = self._inner.score(inputs)
        return out if len(out) <= self._rows else np.full_like(out, np.nan)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_non_finite_scores_are_500s_and_a_nan_model_never_serves(reranker_checkpoint):
    def load(rows):
        return lambda: NanScorer(load_backend(reranker_checkpoint, "torch", device="cpu"), rows)

    with serving(reranker_checkpoint, load=load(1)) as runner:
        wait_ready(runner)
        status, body = call(runner.url, "POST", "/v2/rerank", {"query": QUERY, "documents": DOCS[:2]})
        assert status == 500 and body["message"] == "the model produced non-finite (nan/inf) scores"
        status, body = call(runner.url, "POST", "/v2/rerank", {"query": QUERY, "documents": DOCS[:1]})
        assert status == 200 and 0 < body["results"][0]["relevance_score"] < 1  # and it goes on serving
    runner = Runner(ServerConfig(str(reranker_checkpoint), port=0), load=load(0))
    with pytest.raises(BidirError, match="non-finite .* scores for its warm-up pair"):
        runner.run()  # ends by itself: the model thread's failure stops the server
