"""Fault injection (KVSERVE_FAULT_INJECT) against a real server: a failed step is a 500 with the
OpenAI error body (or an error event then [DONE] on a stream), /health stays truthful, the
engine recovers after a failed step, and three failed steps in a row stop it with a clear log
line (then /health is 503 and requests get 503), never a hang."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def faulty(tiny_model_dir, tmp_path_factory):
    # Steps 1-2 fail, 3 works, 4-6 fail (three in a row: the engine stops).
    log = tmp_path_factory.mktemp("faults") / "server.log"
    proc = ServerProcess(tiny_model_dir, log, "--api-key", API_KEY, env={"KVSERVE_FAULT_INJECT": "step_error=1-2/4-6"})
    yield proc
    proc.stop()


def _server_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_step_failures_recovery_then_stop(faulty):
    with httpx.Client(base_url=faulty.url, headers=AUTH, timeout=30) as c:
        one = {"prompt": "Hello", "max_tokens": 1}  # one step each (prefill + first token)
        # step 1 fails: a non-streamed request gets a 500 with the OpenAI error body
        err = _server_error(c.post("/v1/completions", json=one), 500)
        assert err["type"] == "server_error" and "InjectedFault" in err["message"]
        assert c.get("/health").status_code == 200  # recovered: the truth
        # step 2 fails: a streamed request gets an error event, then [DONE]
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "InjectedFault" in error["message"]
        assert c.get("/health").status_code == 200
        # step 3 works
        r = c.post("/v1/completions", json=one)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
        # steps 4-6 fail: the third failure in a row stops the engine
        for _ in range(3):
            _server_error(c.post("/v1/completions", json=one), 500)
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _server_error(c.get("/health"), 503)
        err = _server_error(c.post("/v1/completions", json=one), 503)
        assert "3 failed steps in a row" in err["message"]
    assert "engine stopped: 3 steps failed in a row" in faulty.log()


def test_bad_fault_spec_fails_start_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="KVSERVE_FAULT_INJECT: unknown setting 'nope'"):
        ServerProcess(tiny_model_dir, tmp_path / "server.log", env={"KVSERVE_FAULT_INJECT": "nope=1"})
