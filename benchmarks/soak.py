"""Soak test: many concurrent clients against `kvserve serve` for a long time, with everything a
real deployment sees mixed in — streamed and non-streamed, completions and chat, clients that
give up part-way, and a few invalid requests.

Reports requests completed, errors by status, p50 / p99 latency, KV blocks in use at the end
(must be 0 once idle), the server's RSS at start and end, and whether any request was lost
(no answer within `--request-timeout`) or answered twice (two finishes for one choice, data
after `[DONE]`, or a response id seen twice). Exits 1 if any of those checks fails or any
request got a 5xx.

    # the spec's run: 64 clients for 10 minutes, starting kvserve itself (CPU, SmolLM2)
    python benchmarks/soak.py --model smollm2 --device cpu --clients 64 --duration 600
    # against a running server (RSS only with --server-pid)
    python benchmarks/soak.py --url http://127.0.0.1:8000 --api-key "$KEY" --clients 64 --duration 600

The mix (per request, drawn from a seeded RNG): 50% completions / 50% chat, half of each
streamed; 10% are cancelled by the client after 0.05-1.5 s (the connection is closed); 4% are
invalid (temperature 5, Content-Type text/plain, an unknown model, 17 stop strings) and must
get a 4xx. Prompts are short random word sequences; `max_tokens` 4-32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

WORDS = ("river stone light garden window music paper silver morning cloud forest letter engine city "
         "winter market bridge candle ocean story").split()
INVALID = ("temperature", "content_type", "model", "stop")


@dataclass
class Tally:
    completed: Counter = field(default_factory=Counter)  # kind -> count
    statuses: Counter = field(default_factory=Counter)  # HTTP status of non-cancelled requests
    cancelled: int = 0
    invalid_ok: int = 0  # invalid requests that got a 4xx
    invalid_bad: list = field(default_factory=list)  # invalid requests that did not
    latencies: list = field(default_factory=list)  # seconds, completed valid requests
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    stream_errors: list = field(default_factory=list)  # error events inside 200 streams
    ids: set = field(default_factory=set)


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def read_metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("kvserve:") and " " in line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            try:
                out[name] = float(line.rsplit(" ", 1)[1])  # the gauges read here have one series each
            except ValueError:
                pass
    return out


def wait_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        if (m.get("kvserve:num_requests_running", 0) == 0 and m.get("kvserve:num_requests_waiting", 0) == 0
                and m.get("kvserve:kv_cache_blocks_used", 0) == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def make_request(rng: random.Random, model: str) -> dict:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    body: dict = {"model": model, "max_tokens": rng.randint(4, 32), "temperature": rng.choice([0.0, 0.7, 1.0]),
                  "seed": rng.randrange(1 << 30), "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    r = rng.random()
    invalid = rng.choice(INVALID) if r < 0.04 else None
    cancel_after = rng.uniform(0.05, 1.5) if 0.04 <= r < 0.14 else None
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "kind":
            f"{'chat' if chat else 'completions'}{'-stream' if stream else ''}", "invalid": invalid,
            "cancel_after": cancel_after}


async def one_request(client: httpx.AsyncClient, spec: dict, tally: Tally, timeout: float) -> None:
    body, headers = dict(spec["body"]), {}
    invalid = spec["invalid"]
    if invalid == "temperature":
        body["temperature"] = 5
    elif invalid == "model":
        body["model"] = "no-such-model"
    elif invalid == "stop":
        body["stop"] = [f"s{i}" for i in range(17)]
    content = json.dumps(body).encode()
    headers["Content-Type"] = "text/plain" if invalid == "content_type" else "application/json"
    t0 = time.monotonic()

    async def run() -> None:
        if body["stream"]:
            async with client.stream("POST", spec["path"], content=content, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    record_status(r.status_code, r.content)
                    return
                finishes: Counter = Counter()
                done = False
                stream_id = None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if done:
                        tally.duplicated.append(f"data after [DONE] in {spec['kind']}")
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        tally.stream_errors.append(event["error"])
                        continue
                    for choice in event.get("choices", ()):
                        if choice.get("finish_reason") is not None:
                            finishes[choice["index"]] += 1
                    if stream_id is None and event.get("id"):
                        stream_id = event["id"]
                        if ("stream", stream_id) in tally.ids:
                            tally.duplicated.append(f"stream id {stream_id} seen in two streams")
                        tally.ids.add(("stream", stream_id))
                if not done:
                    tally.lost.append(f"{spec['kind']}: stream ended without [DONE]")
                if any(v > 1 for v in finishes.values()):
                    tally.duplicated.append(f"{spec['kind']}: a choice finished twice")
                record_status(200, None)
        else:
            r = await client.post(spec["path"], content=content, headers=headers)
            record_status(r.status_code, r.content)
            if r.status_code == 200:
                rid = r.json()["id"]
                if ("plain", rid) in tally.ids:
                    tally.duplicated.append(f"response id {rid} seen twice")
                tally.ids.add(("plain", rid))

    def record_status(status: int, payload: bytes | None) -> None:
        if invalid is not None:
            if 400 <= status < 500:
                tally.invalid_ok += 1
            else:
                tally.invalid_bad.append((invalid, status))
            tally.statuses[status] += 1
            return
        tally.statuses[status] += 1
        if status == 200:
            tally.completed[spec["kind"]] += 1
            tally.latencies.append(time.monotonic() - t0)

    if spec["cancel_after"] is not None and invalid is None:
        try:
            await asyncio.wait_for(run(), spec["cancel_after"])
        except asyncio.TimeoutError:
            tally.cancelled += 1
        except httpx.HTTPError as e:
            tally.lost.append(f"{spec['kind']}: {type(e).__name__}: {e}")
        return
    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        tally.lost.append(f"{spec['kind']}: no answer within {timeout:g} s")
    except httpx.HTTPError as e:
        tally.lost.append(f"{spec['kind']}: {type(e).__name__}: {e}")


async def client_loop(i: int, url: str, api_key: str | None, model: str, deadline: float, seed: int,
                      tally: Tally, timeout: float) -> None:
    rng = random.Random(seed * 1000 + i)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout + 5, limits=limits) as client:
        while time.monotonic() < deadline:
            await one_request(client, make_request(rng, model), tally, timeout)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class OwnServer:
    def __init__(self, args: argparse.Namespace) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kvserve", "serve", "--model", args.model, "--port", str(port),
               "--device", args.device, "--uvicorn-log-level", "warning", *args.server_arg]
        env = {**os.environ, "KVSERVE_API_KEY": ""}
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not become healthy in 600 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start kvserve with --model)")
    p.add_argument("--model", default="smollm2", help="model to serve when starting the server (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-arg", action="append", default=[], help="extra `kvserve serve` argument (repeatable)")
    p.add_argument("--model-name", default=None, help="`model` field to send (default: --model)")
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"))
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="a request without an answer after this many seconds counts as lost (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write the report as JSON here too")
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients must be >= 1 and --duration > 0")

    server = None if args.url else OwnServer(args)
    url = args.url or server.url
    pid = args.server_pid if args.url else server.proc.pid
    model = args.model_name or args.model
    try:
        # one request first, so RSS at start is that of a warmed-up server
        httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}, timeout=120)
        rss_start = rss_kib(pid)
        tally = Tally()
        t0 = time.monotonic()
        deadline = t0 + args.duration

        async def run_all() -> None:
            await asyncio.gather(*(client_loop(i, url, args.api_key, model, deadline, args.seed, tally,
                                               args.request_timeout) for i in range(args.clients)))

        asyncio.run(run_all())
        wall = time.monotonic() - t0
        end = wait_idle(url, timeout=30)
        rss_end = rss_kib(pid)
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        if server is not None:
            server.stop()

    five_xx = sum(v for k, v in tally.statuses.items() if k >= 500)
    blocks = end.get("kvserve:kv_cache_blocks_used", float("nan"))
    report = {
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
        "requests_completed": sum(tally.completed.values()), "completed_by_kind": dict(tally.completed),
        "cancelled_by_client": tally.cancelled,
        "invalid_sent": tally.invalid_ok + len(tally.invalid_bad), "invalid_got_4xx": tally.invalid_ok,
        "invalid_not_4xx": tally.invalid_bad[:20],
        "status_counts": {str(k): v for k, v in sorted(tally.statuses.items())},
        "stream_error_events": len(tally.stream_errors), "stream_error_samples": tally.stream_errors[:5],
        "latency_p50_s": round(percentile(tally.latencies, 50), 3),
        "latency_p99_s": round(percentile(tally.latencies, 99), 3),
        "kv_blocks_used_at_end": blocks,
        "requests_running_at_end": end.get("kvserve:num_requests_running"),
        "requests_waiting_at_end": end.get("kvserve:num_requests_waiting"),
        "rss_start_mib": None if rss_start is None else round(rss_start / 1024, 1),
        "rss_end_mib": None if rss_end is None else round(rss_end / 1024, 1),
        "lost": len(tally.lost), "lost_samples": tally.lost[:10],
        "answered_twice": len(tally.duplicated), "answered_twice_samples": tally.duplicated[:10],
        "health_at_end": health,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    ok = (blocks == 0 and not tally.lost and not tally.duplicated and not tally.invalid_bad and five_xx == 0
          and not tally.stream_errors and health == 200)
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
