"""A client that leaves mid-request aborts it: within 2 s nothing runs and every KV block is
free. SIGTERM shuts the server down cleanly with requests in flight."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess, read_metrics, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Long enough to still be decoding when the client leaves (n=4 x ~500 tokens).
LONG = {"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 490, "ignore_eos": True, "n": 4,
        "temperature": 0.8, "seed": 1}


def _aborts(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith("kvserve:request_success_total") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _assert_idle_within_2s(url: str, t_closed: float) -> None:
    m = wait_idle(url, timeout=2.0)
    elapsed = time.monotonic() - t_closed
    assert m["kvserve:num_requests_running"] == 0, m
    assert m["kvserve:num_requests_waiting"] == 0, m
    assert m["kvserve:kv_cache_blocks_used"] == 0, m
    assert elapsed < 2.5, elapsed


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {**{k: v for k, v in LONG.items() if k != "prompt"},
                              "messages": [{"role": "user", "content": "Hello world"}]}),
])
def test_streaming_disconnect_frees_blocks(server, path, body):
    wait_idle(server.url)
    aborts = _aborts(server.url)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        with c.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            seen, running = 0, 0.0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 1:
                        running = read_metrics(server.url)["kvserve:num_requests_running"]
                    if seen == 2:
                        break  # leaving the loop closes the response, and so the connection
    t_closed = time.monotonic()
    assert running >= 1  # it was decoding when we left
    _assert_idle_within_2s(server.url, t_closed)
    assert _aborts(server.url) == aborts + 4  # aborted, not run to the end


def test_non_streaming_disconnect_frees_blocks(server):
    wait_idle(server.url)
    aborts = _aborts(server.url)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=0.15) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post("/v1/completions", json=LONG)
    t_closed = time.monotonic()
    _assert_idle_within_2s(server.url, t_closed)
    assert _aborts(server.url) == aborts + 4


def test_server_healthy_after_disconnects(server):
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


def test_sigterm_shuts_down_cleanly(tiny_model_dir, tmp_path):
    """In-flight requests end with a result or an error event; nothing hangs."""
    proc = ServerProcess(tiny_model_dir, tmp_path / "server.log", "--shutdown-timeout", "0.3")
    events: list[str] = []
    done = threading.Event()

    def stream() -> None:
        body = {**LONG, "max_tokens": 480, "n": 32, "stream": True}
        try:
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
        finally:
            done.set()

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events, proc.log()
    t0 = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout=20)
    assert done.wait(10), "the streaming client hung after SIGTERM"
    t.join()
    assert time.monotonic() - t0 < 10
    # uvicorn re-raises the signal after its graceful shutdown, so SIGTERM is the exit status.
    assert code in (0, -signal.SIGTERM), proc.log()
    assert "Traceback" not in proc.log()
    assert events[-1] == "data: [DONE]", events[-3:]
    finished = sum(1 for e in events if '"finish_reason": "' in e)
    errors = [e for e in events if '"error"' in e]
    assert finished == 32 or (errors and "shut down" in errors[0]), events[-3:]
