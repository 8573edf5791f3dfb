"""Operator options of build_app, in-process (Starlette's TestClient runs the lifespan, so the
engine thread starts and stops): request chat templates, CORS, several served names, no key."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.engine.llm_engine import LLMEngine
from kvserve.entrypoints.server import build_app

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def app_client(tiny_model_dir):
    engine = LLMEngine(EngineArgs(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    app = build_app(AsyncLLMEngine(engine), served_model_name=["alpha", "beta"], allow_request_chat_template=True,
                    cors_origins=["https://ok.example"], max_body_bytes=4096)
    with TestClient(app) as client:
        yield client


def test_request_chat_template_allowed(app_client):
    msgs = [{"role": "user", "content": "hello there"}]
    tok = app_client.post("/tokenize", json={"messages": msgs, "chat_template": TEMPLATE}).json()
    text = app_client.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert text == "[user] hello there\n"
    r = app_client.post("/v1/chat/completions", json={"messages": msgs, "chat_template": TEMPLATE, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == tok["count"]
    bad = app_client.post("/v1/chat/completions", json={"messages": msgs, "chat_template": "{% for %}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template"
    hostile = "{{ ''.__class__.__mro__ }}"
    r = app_client.post("/v1/chat/completions", json={"messages": msgs, "chat_template": hostile})
    assert r.status_code == 400


def test_cors_allowed_origin_only(app_client):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = app_client.options("/v1/completions", headers={"Origin": "https://ok.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
    other = app_client.options("/v1/completions", headers={"Origin": "https://evil.example", **pre})
    assert other.headers.get("access-control-allow-origin") is None


def test_several_served_names_and_no_key(app_client):
    models = app_client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        r = app_client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name
    r = app_client.post("/v1/completions", json={"model": "gamma", "prompt": "Hi"})
    assert r.status_code == 404


def test_small_body_limit(app_client):
    r = app_client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
