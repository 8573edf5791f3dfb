"""A real `kvserve serve` process on a free loopback port, serving the shared tiny random-weight
Llama (tests/conftest.py builds it with its byte-level BPE tokenizer and chat template)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-0123456789"
MODEL_NAME = "tiny-llama"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "kvserve", *(["--log-level", os.environ["KVSERVE_TEST_LOG_LEVEL"]]
                                              if os.environ.get("KVSERVE_TEST_LOG_LEVEL") else []), "serve", "--model", str(model), "--port", str(self.port),
            "--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL_NAME,
            "--uvicorn-log-level", "warning", *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "KVSERVE_API_KEY": "",
               **(env or {})}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(timeout=120)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    folder, _ = tiny_model_factory("llama")
    return folder


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """One server per test module, started with an API key that every request must carry."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(tiny_model_dir, log, "--api-key", API_KEY, "--max-request-body-mb", "1")
    yield proc
    proc.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


_METRIC_RE = re.compile(r"^(kvserve:[a-z_]+)(?:\{[^}]*\})? ([-+0-9.eEinfNa]+)$")


def read_metrics(url: str) -> dict[str, float]:
    """Unlabelled view of /metrics: name -> value (last sample wins; fine for gauges)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_idle(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        idle = (m["kvserve:num_requests_running"] == 0 and m["kvserve:num_requests_waiting"] == 0
                and m["kvserve:kv_cache_blocks_used"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
