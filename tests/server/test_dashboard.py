"""`/dashboard` in a real headless Chromium, driven through the DevTools protocol: while requests
run the block grid shows blocks in use, afterwards every block is free (some holding cached
prefixes). A screenshot taken while requests run is saved to tests/artifacts/dashboard.png."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import httpx
import pytest

from kvserve.core.request import RequestStatus
from kvserve.entrypoints.server.dashboard import CACHED, FREE, _aggregate, engine_snapshot
from tests.server.conftest import API_KEY, ServerProcess, wait_idle

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The shared prefix spans two full blocks, so later requests hit the prefix cache.
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def test_aggregate_shows_majority_holder_and_fill() -> None:
    state = [FREE, 0, 0, 1, CACHED, FREE, FREE, FREE, 1]
    cells, fill = _aggregate(state, 4)
    assert cells == [0, CACHED, 1]  # request 0 holds most of cell 0; cell 1 only caches
    assert fill == "709"  # in-use fraction in ninths, rounded up


def _scheduler(num_blocks: int, max_num_seqs: int = 2):
    from kvserve.core.config import CacheConfig, SchedulerConfig
    from kvserve.core.scheduler import Scheduler

    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_model_len=64),
                     CacheConfig(block_size=4), num_blocks)


def _add(sched, rid: str, prompt: list[int]) -> None:
    from kvserve.core.request import Request
    from kvserve.core.sampling_params import SamplingParams

    sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=4, ignore_eos=True), max_tokens=4))


def test_snapshot_marks_owners_shared_and_cached_blocks() -> None:
    sched = _scheduler(64)
    shared = list(range(100, 108))  # two full blocks both requests share
    _add(sched, "a", shared + [1, 2, 3])
    _add(sched, "b", shared + [4, 5, 6])
    _add(sched, "c", [7, 8, 9])  # max_num_seqs=2: waits
    sched.schedule()
    snap = engine_snapshot(SimpleNamespace(scheduler=sched))
    assert snap["blocks_per_cell"] == 1 and len(snap["cells"]) == 64 and snap["fill"] is None
    assert snap["owners"] == ["a", "b"] and [r["id"] for r in snap["running"]] == ["a", "b"]
    assert [r["id"] for r in snap["waiting"]] == ["c"] and snap["num_waiting"] == 1
    assert snap["blocks_used"] == 4 == sum(c >= 0 for c in snap["cells"])  # 2 shared + 1 tail each
    assert snap["blocks_shared"] == 2 and len(snap["shared_cells"]) == 2
    assert all(snap["cells"][i] == 0 for i in snap["shared_cells"])  # drawn in the first holder's colour
    sched.finish_requests(["a", "b", "c"], RequestStatus.FINISHED_ABORTED)
    snap = engine_snapshot(SimpleNamespace(scheduler=sched))
    assert snap["blocks_used"] == 0 and snap["owners"] == [] and snap["running"] == []
    assert snap["blocks_cached_free"] == 2 == snap["cells"].count(CACHED)
    assert snap["blocks_free"] == 62 == snap["cells"].count(FREE)


def test_snapshot_aggregates_big_pools() -> None:
    sched = _scheduler(10_000)
    _add(sched, "a", list(range(40)))
    sched.schedule()
    snap = engine_snapshot(SimpleNamespace(scheduler=sched), max_cells=4096)
    assert snap["blocks_per_cell"] == 3 and len(snap["cells"]) == 3334 == len(snap["fill"])
    assert snap["blocks_used"] == 10  # 40 tokens in blocks of 4
    assert snap["cells"][:4] == [0, 0, 0, 0] and snap["fill"][:4] == "9993"


class DevTools:
    """The smallest DevTools-protocol client the test needs: call a method, wait for its reply."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client is not installed")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, tmp_path_factory):
    """A server with an API key and a small pool (about 8 x 512 tokens = 256 blocks), so the grid is
    one cell per block."""
    log = tmp_path_factory.mktemp("dashboard") / "server.log"
    proc = ServerProcess(tiny_model_dir, log, "--api-key", API_KEY, "--max-num-seqs", "8", "--max-model-len", "512")
    yield proc
    proc.stop()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.1)


GRID_JS = """(() => {
  const g = document.getElementById('grid');
  return {cells: g.querySelectorAll('.cell').length, used: g.querySelectorAll('.cell.used').length,
          cached: g.querySelectorAll('.cell.cached').length,
          running_rows: document.querySelectorAll('#running-rows tr').length,
          status: document.getElementById('status').className,
          running: document.getElementById('running').textContent};
})()"""


def test_dashboard_shows_blocks_live(small_server, browser) -> None:
    url = small_server.url
    # Outside /v1, like /metrics: no API key needed.
    page = httpx.get(url + "/dashboard", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    state = httpx.get(url + "/dashboard/state", timeout=10).json()
    num_blocks = state["num_blocks"]
    assert 256 <= num_blocks < 300 and state["blocks_per_cell"] == 1 and state["blocks_used"] == 0

    stop = threading.Event()
    errors: list[BaseException] = []

    def load(worker: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            for i in itertools.count():
                if stop.is_set():
                    return
                body = {"prompt": f"{PROMPT}request {worker}.{i}", "max_tokens": 300, "ignore_eos": True,
                        "temperature": 0}
                try:
                    c.post("/v1/completions", json=body).raise_for_status()
                except BaseException as e:  # reported by the test
                    errors.append(e)
                    return

    workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
    browser.call("Page.enable")
    browser.call("Page.navigate", url=url + "/dashboard")
    for t in workers:
        t.start()
    try:
        busy = wait_for(lambda: (s := browser.eval(GRID_JS)) and s["used"] > 0 and s["running_rows"] > 0 and s,
                        30, "the grid to show blocks in use")
        assert busy["cells"] == num_blocks and busy["status"] == "live"
        time.sleep(0.6)  # let another poll land so the screenshot shows several requests
        ARTIFACTS.mkdir(exist_ok=True)
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path = ARTIFACTS / "dashboard.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"\ndashboard screenshot: {path}")
    finally:
        stop.set()
        for t in workers:
            t.join(60)
    assert not errors, errors

    assert wait_idle(url, timeout=10)["kvserve:kv_cache_blocks_used"] == 0
    idle = wait_for(lambda: (s := browser.eval(GRID_JS)) and s["used"] == 0 and s["running"] == "0" and s,
                    10, "every block of the grid to be free")
    assert idle["cells"] == num_blocks and idle["running_rows"] == 0
    assert idle["cached"] > 0  # the prompts' full blocks stay cached after their requests end
    final = httpx.get(url + "/dashboard/state", timeout=10).json()
    assert final["blocks_used"] == 0 and final["prefix_hits"] > 0 and final["generation_tokens_total"] >= 300


def test_dashboard_aggregates_a_big_pool(server, browser, http) -> None:
    """The shared module server keeps the default max_num_seqs (256): thousands of blocks, drawn
    as at most 4096 cells, and the page says how many blocks a cell stands for."""
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).raise_for_status()
    state = httpx.get(server.url + "/dashboard/state", timeout=10).json()
    assert state["num_blocks"] > 4096 and state["blocks_per_cell"] >= 2
    assert len(state["cells"]) == len(state["fill"]) <= 4096
    browser.call("Page.navigate", url=server.url + "/dashboard")
    js = """(() => ({cells: document.querySelectorAll('#grid .cell').length,
                    cached: document.querySelectorAll('#grid .cell.cached').length,
                    note: document.getElementById('grid-note').textContent}))()"""
    shown = wait_for(lambda: (s := browser.eval(js)) and s["cells"] > 0 and s, 20, "the grid")
    assert shown["cells"] == len(state["cells"]) and shown["cached"] > 0
    assert f"each cell is {state['blocks_per_cell']} consecutive blocks" in shown["note"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    (ARTIFACTS / "dashboard-aggregated.png").write_bytes(base64.b64decode(shot["data"]))
