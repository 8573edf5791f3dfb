"""Every client mistake gets a 4xx with the OpenAI error body, never a 500, and the server
keeps serving afterwards. Raw HTTP (httpx) so that status codes and bodies are exact."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME

MAX_LEN = 512


def assert_error(r: httpx.Response, status: int, param: str | None = "__any__", code: str | None = "__any__") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "__any__":
        assert err["param"] == param, err
    if code != "__any__":
        assert err["code"] == code, err
    return err


def long_prompt(n: int) -> list[int]:
    return [(7 * i) % 400 + 10 for i in range(n)]


BAD_COMPLETION_FIELDS = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"n": "abc"}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo (scoring)
    ({"max_tokens": "many"}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"seed": 1 << 70}, "seed"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": [[1, 2], [-3]]}, "prompt[1]"),
    ({"prompt": None}, "prompt"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields,param", BAD_COMPLETION_FIELDS, ids=[str(f) for f, _ in BAD_COMPLETION_FIELDS])
def test_invalid_completion_fields(http, fields, param, stream):
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}
    if stream and "stream" not in fields:
        body["stream"] = True
    err = assert_error(http.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


BAD_CHAT_FIELDS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "structural_tag", "structures": [], "triggers": ["<"]}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"continue_final_message": True}, "continue_final_message"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields,param", BAD_CHAT_FIELDS, ids=[str(f) for f, _ in BAD_CHAT_FIELDS])
def test_invalid_chat_fields(http, fields, param, stream):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream, **fields}
    err = assert_error(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param, err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("content", [b"{bad json", b"[1, 2]", b"", b'{"prompt": NaN}', b"\xff\xfe"])
def test_malformed_body(http, path, content):
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_context_window(http, stream):
    body = {"prompt": long_prompt(MAX_LEN + 10), "max_tokens": 4, "stream": stream}
    assert_error(http.post("/v1/completions", json=body), 400, code="context_length_exceeded")
    body = {"prompt": long_prompt(MAX_LEN), "max_tokens": None, "stream": stream}
    assert_error(http.post("/v1/completions", json=body), 400, code="context_length_exceeded")
    big = "hello " * 2000
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}], "stream": stream})
    assert_error(r, 400, code="context_length_exceeded")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_over_context_window(http, stream):
    body = {"prompt": long_prompt(100), "max_tokens": MAX_LEN - 99, "stream": stream}
    assert_error(http.post("/v1/completions", json=body), 400, param="max_tokens", code="context_length_exceeded")
    # Exactly filling the window is fine; so is no max_tokens at all (up to the window).
    ok = http.post("/v1/completions", json={"prompt": long_prompt(MAX_LEN - 3), "max_tokens": 3})
    assert ok.status_code == 200, ok.text
    ok = http.post("/v1/completions", json={"prompt": long_prompt(MAX_LEN - 3), "max_tokens": None,
                                            "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/tokenize", {"prompt": "hi"}),
    ("/detokenize", {"tokens": [1]}),
])
def test_unknown_model(http, path, body):
    assert_error(http.post(path, json={**body, "model": "gpt-4"}), 404, param="model", code="model_not_found")


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nope"),
])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Bearer", "Basic " + API_KEY, API_KEY, "Bearer " + API_KEY + "x"])
def test_api_key_required(server, method, path, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "hi"}, timeout=10)
    err = assert_error(r, 401)
    assert API_KEY not in r.text and err["code"] == "invalid_api_key"


def test_api_key_not_logged(server, http):
    assert http.get("/v1/models").status_code == 200
    httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong-key-xyz"})
    log = server.log()
    assert API_KEY not in log and "wrong-key-xyz" not in log


def test_open_routes_without_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_body_too_large(http):
    huge = {"prompt": "x" * (2 << 20)}
    assert_error(http.post("/v1/completions", json=huge), 413)

    def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b"x" * 65536

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v2/whatever"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_detokenize_and_tokenize_errors(http):
    assert_error(http.post("/detokenize", json={"tokens": [10**12]}), 400, param="tokens")
    assert_error(http.post("/detokenize", json={"tokens": "abc"}), 400, param="tokens")
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400)
    assert_error(http.post("/tokenize", json={"messages": [{"role": "nobody", "content": "b"}]}), 400,
                 param="messages")


def test_cors_off_by_default(http):
    r = http.options("/v1/completions", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_server_keeps_serving(http):
    for _ in range(3):
        http.post("/v1/completions", content=b"{oops")
        http.post("/v1/completions", json={"prompt": long_prompt(MAX_LEN + 1)})
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
