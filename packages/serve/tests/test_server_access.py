"""Who may use bidir-server: the API key (the real openai client and raw HTTP), the Host header against DNS
rebinding, JSON-only bodies, the warning for a server open beyond loopback, and a served name that does not show
where the model lies on disk."""

from __future__ import annotations

import logging
import socket

import openai
import pytest
from server_testing import call, serving

from bidir_core.checkpoint import EncoderConfig
from bidir_core.errors import BidirError
from bidir_core.testing import tiny_encoder
from bidir_serve.server import ServerConfig
from bidir_serve.server.cli import parse_args

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return (
        tiny_encoder(EncoderConfig(max_length=48))
        .eval()
        .save_pretrained(tmp_path_factory.mktemp("acc") / "tiny")
    )


@pytest.fixture(scope="module")
def keyed(checkpoint):
    with serving(checkpoint, api_key=KEY) as runner:
        yield runner


@pytest.fixture(scope="module")
def plain(checkpoint):
    with serving(checkpoint) as runner:
        yield runner


@pytest.fixture(scope="module")
def listed(checkpoint):
    with serving(checkpoint, allowed_hosts=("embed.example.com", "*.internal")) as runner:
        yield runner


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- item 3: the API key ------------------------------------------------------------------------------------------


def test_the_openai_client_needs_the_key(keyed):
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    response = good.embeddings.create(model=keyed.cfg.model_id, input=["a passage"])
    assert len(response.data) == 1
    assert [m.id for m in good.models.list()] == [keyed.cfg.model_id]
    wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError, match="the API key is not valid"):
        wrong.embeddings.create(model=keyed.cfg.model_id, input=["a passage"])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("sk-wrong"),
        bearer(KEY[:-1]),
        bearer(KEY + "0"),
        {"Authorization": KEY},
        {"Authorization": "Basic x"},
    ],
    ids=["none", "wrong", "prefix", "longer", "no scheme", "basic"],
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/metrics")]
)
def test_raw_requests_without_the_key_are_401s_like_openais(keyed, headers, method, path):
    body = {"input": "x"} if method == "POST" else None
    status, answer = call(keyed.url, method, path, body, headers=headers)
    assert status == 401
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == "invalid_api_key" and answer["error"]["type"] == "invalid_request_error"
    assert KEY not in str(answer)


def test_with_the_key_everything_answers_and_health_needs_none(keyed):
    assert call(keyed.url, "GET", "/health") == (200, {"status": "ready"})
    assert call(keyed.url, "GET", "/v1/models", headers=bearer(KEY))[0] == 200
    assert call(keyed.url, "GET", "/metrics", headers=bearer(KEY))[0] == 200
    assert (
        call(keyed.url, "POST", "/v1/embeddings", {"input": "x"}, headers={"authorization": f"bearer {KEY}"})[
            0
        ]
        == 200
    )


def test_the_key_comes_from_the_flag_or_the_environment_and_never_shows(monkeypatch):
    monkeypatch.setenv("BIDIR_API_KEY", "from-env")
    assert parse_args(["m"])[0].api_key == "from-env"
    assert parse_args(["m", "--api-key", "from-flag"])[0].api_key == "from-flag"
    monkeypatch.setenv("BIDIR_API_KEY", "")
    assert parse_args(["m"])[0].api_key is None
    assert "from-flag" not in repr(ServerConfig("m", api_key="from-flag"))
    with pytest.raises(BidirError, match="api_key must be a non-empty string"):
        ServerConfig("m", api_key="has space")


@pytest.mark.parametrize(
    ("host", "key", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", KEY, False), ("127.0.0.1", None, False)]
)
def test_a_server_open_beyond_loopback_without_a_key_warns(checkpoint, caplog, host, key, warned):
    with (
        caplog.at_level(logging.WARNING, logger="bidir_serve.server"),
        serving(checkpoint, host=host, api_key=key),
    ):
        pass
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "API key" in r.getMessage()
    ]
    assert bool(warnings) == warned, warnings
    if warned:
        assert "BIDIR_API_KEY" in warnings[0]


# --- item 4: Host and Content-Type --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
        "internal",
        "127.0.0.1.evil.example",
        "a@localhost",
    ],
)
def test_an_unknown_host_is_refused(plain, host):
    for method, path, body in (("GET", "/health", None), ("POST", "/v1/embeddings", {"input": "x"})):
        status, answer = call(plain.url, method, path, body, headers={"Host": host})
        assert status == 400, (host, path)
        assert answer["error"]["code"] == "invalid_host" and "--allowed-hosts" in answer["error"]["message"]


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:1234",
        "LOCALHOST.",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:8080",
        "10.1.2.3",
    ],
)
def test_loopback_names_and_addresses_are_served(plain, host):
    assert call(plain.url, "POST", "/v1/embeddings", {"input": "x"}, headers={"Host": host})[0] == 200


def test_listed_hosts_are_served(plain, listed):
    for host in ("embed.example.com", "Embed.Example.com:443", "gpu-3.internal"):
        assert call(listed.url, "POST", "/v1/embeddings", {"input": "x"}, headers={"Host": host})[0] == 200
        assert call(plain.url, "POST", "/v1/embeddings", {"input": "x"}, headers={"Host": host})[0] == 400
    for host in ("evil.example", "internal", "example.com"):
        assert call(listed.url, "POST", "/v1/embeddings", {"input": "x"}, headers={"Host": host})[0] == 400


def test_a_wildcard_bind_accepts_this_machines_name_and_star_accepts_any(checkpoint):
    with serving(checkpoint, host="0.0.0.0") as runner:
        assert call(runner.url, "GET", "/health", headers={"Host": f"{socket.gethostname()}:8080"})[0] == 200
        assert call(runner.url, "GET", "/health", headers={"Host": "evil.example"})[0] == 400
    with serving(checkpoint, allowed_hosts=("*",)) as runner:
        assert call(runner.url, "GET", "/health", headers={"Host": "evil.example"})[0] == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_a_body_not_sent_as_json_is_a_415(plain, content_type):
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    status, answer = call(plain.url, "POST", "/v1/embeddings", b'{"input": "x"}', headers=headers)
    assert status == 415
    assert answer["error"]["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_served(plain):
    headers = {"Content-Type": "Application/JSON; charset=utf-8"}
    assert call(plain.url, "POST", "/v1/embeddings", b'{"input": "x"}', headers=headers)[0] == 200


# --- item 7: the served name is the folder's name, not its path ---------------------------------------------------


def test_models_and_errors_show_the_folders_name_not_its_path(plain, checkpoint):
    path = str(checkpoint)
    status, models = call(plain.url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    status, answer = call(plain.url, "POST", "/v1/embeddings", {"input": "x", "model": "other"})
    assert status == 404 and "'tiny'" in answer["error"]["message"]
    assert path not in str(models) and path not in str(answer)
    assert call(plain.url, "POST", "/v1/embeddings", {"input": "x", "model": "tiny"})[0] == 200
    assert ServerConfig(path, served_model_name="mine").model_id == "mine"
    assert ServerConfig(path + "/").model_id == "tiny"
    assert ServerConfig("smollm2-135m").model_id == "smollm2-135m"
