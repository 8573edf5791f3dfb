"""Hostile input against a real server: only JSON bodies are accepted (a browser page cannot
drive the server with a no-preflight POST), OpenAI's value ranges and our size caps, the prompt
count checked before any tokenization, and error bodies that never echo unbounded input."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ROUTES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", CHAT),
    ("/tokenize", {"prompt": "hi"}),
    ("/detokenize", {"tokens": [10, 11]}),
]


def _error(r: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, r.text[:500]
    assert len(r.content) <= 4096
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param != "__any__":
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path,body", ROUTES)
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_json_routes_refuse_other_content_types(server, path, body, ctype):
    headers = dict(AUTH)
    if ctype is not None:
        headers["Content-Type"] = ctype
    r = httpx.post(server.url + path, content=json.dumps(body).encode(), headers=headers, timeout=30)
    err = _error(r, 415)
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


@pytest.mark.parametrize("path,body", ROUTES)
def test_json_routes_accept_json_with_charset(server, path, body):
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    r = httpx.post(server.url + path, content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert r.status_code == 200, r.text


class Raw(str):
    """A value written into the JSON body as is (1e999 parses as infinity)."""


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5), ("temperature", -0.1), ("temperature", Raw("1e999")),
    ("top_p", 0), ("top_p", 1.5), ("top_p", Raw("1e999")),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("frequency_penalty", Raw("-1e999")),
    ("stop", [f"s{i}" for i in range(17)]), ("stop", "x" * 513), ("stop", ["ok", "y" * 600]),
    ("logit_bias", {str(i): 1 for i in range(1025)}), ("logit_bias", {"5": 101}), ("logit_bias", Raw('{"5": -1e999}')),
    ("stop_token_ids", list(range(1025))),
])
@pytest.mark.parametrize("path,base", [("/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("/v1/chat/completions", CHAT)])
def test_openai_value_limits(http, field, value, path, base):
    text = value if isinstance(value, Raw) else json.dumps(value)
    raw = json.dumps({**base, field: 0}).replace(f'"{field}": 0', f'"{field}": {text}')
    r = http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    _error(r, 400, param=field)


def test_limits_at_the_edges_are_accepted(http):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 2, "top_p": 1, "presence_penalty": -2,
            "frequency_penalty": 2, "stop": [f"s{i}" for i in range(16)], "logit_bias": {"5": -100, "6": 100}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


def test_prompt_count_checked_before_tokenizing(server, http):
    """150,000 prompts (this server takes 1 MB bodies; the default 8 MB holds 10^6) are refused at
    once, before any is tokenized, and /health answers meanwhile."""
    body = json.dumps({"prompt": ["ab"] * 150_000, "max_tokens": 1}).encode()
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            httpx.get(server.url + "/health", timeout=10)
            health.append(time.monotonic() - t0)

    t = threading.Thread(target=poll)
    t.start()
    try:
        t0 = time.monotonic()
        r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        elapsed = time.monotonic() - t0
    finally:
        done.set()
        t.join()
    err = _error(r, 400, param="n")
    assert "128" in err["message"]
    assert elapsed < 2.0, elapsed
    assert health and max(health) < 1.0, health


def test_error_bodies_never_echo_unbounded_input(http):
    name = "m" * 1_000_000  # just under this server's 1 MB body limit
    r = http.post("/v1/completions", json={"model": name, "prompt": "hi"})
    err = _error(r, 404, param="model")
    assert len(err["message"]) < 400 and "characters" in err["message"]
    r = http.post("/v1/completions", json={"prompt": "hi", "logit_bias": {"x" * 100_000: 1}})
    _error(r, 400, param="logit_bias")
    # Control characters take 6 bytes each once JSON-escaped: still under 4 KB.
    r = http.post("/v1/chat/completions", json={"model": "\x01" * 100_000, **CHAT})
    _error(r, 404)
    r = http.post("/v1/completions", json={"prompt": "hi", "stop": ["\x01" * 5000]})
    _error(r, 400, param="stop")


def test_model_name_short_enough_is_echoed_whole(http):
    r = http.post("/v1/completions", json={"model": "nope-model", "prompt": "hi"})
    assert "`nope-model`" in _error(r, 404)["message"]
    assert http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}).status_code == 200
