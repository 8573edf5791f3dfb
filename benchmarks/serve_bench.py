"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible server.

(The client, metrics and workload code live in `kvserve.bench`; `kvserve bench serve` is the
general command, with p90, goodput, request rates and reports. This script keeps its own
`--compare-offline` check.)

Reports, per concurrency level: TTFT, TPOT = (E2E - TTFT) / (output tokens - 1), ITL (time
between streamed chunks) and E2E latency as mean / p50 / p99, plus output tok/s over the run.

Requests are random token-id prompts (`/v1/completions` accepts token ids on kvserve and vLLM)
with `ignore_eos`, greedy, fixed seeds, so every run and every server does the same work; each
repeat and each concurrency level gets a fresh request set, so none hits the prefix cache of another.

    # start kvserve itself (CPU, SmolLM2) and sweep concurrency
    python benchmarks/serve_bench.py --model smollm2 --device cpu --concurrency 1,8,32
    # any running OpenAI-compatible server
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --model-name my-model
    # issue 4's check: server at concurrency 32 vs offline LLM.generate on the same requests
    python benchmarks/serve_bench.py --model smollm2 --device cpu --compare-offline

The offline run uses `max_num_seqs` = the concurrency, so both sides decode batches of the
same size; the two never run at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx

from kvserve.bench.machine import describe, machine_info
from kvserve.bench.serve import Result
from kvserve.bench.serve import run_load as _run_load
from kvserve.bench.serve import summarize as _summarize
from kvserve.bench.workloads import BenchRequest


def machine() -> str:
    m = machine_info()
    return f"{describe(m)}, load avg {m['load_avg_at_start']:.2f} at start"


def make_requests(n: int, input_len: int, output_len: int, ratio: float, vocab: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))))

    return [BenchRequest([rng.randrange(100, vocab) for _ in range(length(input_len))], length(output_len))
            for _ in range(n)]


async def run_load(base_url: str, model: str, reqs: list[BenchRequest], concurrency: int,
                   api_key: str | None) -> tuple[list[Result], float]:
    results, duration, _ = await _run_load(base_url, model, reqs, concurrency=concurrency, api_key=api_key)
    return results, duration


def summarize(results: list[Result], duration: float) -> dict:
    s = _summarize(results, duration, slo_ttft_ms=float("inf"), slo_tpot_ms=float("inf"))
    s.pop("samples", None)
    return s


def print_summary(label: str, s: dict) -> None:
    print(f"\n== {label}: {s['requests']} requests, {s['failed']} failed, {s['duration_s']:.2f} s")
    if "output_tok_s" not in s:
        return
    print(f"   output tokens {s['output_tokens']}, output throughput {s['output_tok_s']:.1f} tok/s")
    print(f"   {'':8} {'mean':>10} {'p50':>10} {'p99':>10}  (ms)")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        if name in s:
            v = s[name]
            print(f"   {name[:-3].upper():8} {v['mean']:10.1f} {v['p50']:10.1f} {v['p99']:10.1f}")


# -- our own server ---------------------------------------------------------------------------------
class LocalServer:
    def __init__(self, args: argparse.Namespace) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kvserve", "serve", "--port", str(port), "--uvicorn-log-level", "warning",
               "--served-model-name", args.model_name, *engine_cli_args(args)]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in 600 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def engine_cli_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--max-num-seqs", str(args.max_num_seqs)]
    if args.max_model_len:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.kv_cache_memory_gib:
        out += ["--kv-cache-memory-gib", str(args.kv_cache_memory_gib)]
    return out


def engine_kwargs(args: argparse.Namespace, max_num_seqs: int) -> dict:
    kw = dict(dtype=args.dtype, device=args.device, max_num_seqs=max_num_seqs, max_model_len=args.max_model_len)
    if args.kv_cache_memory_gib:
        kw["kv_cache_memory"] = int(args.kv_cache_memory_gib * (1 << 30))
    return kw


class Offline:
    """`LLM.generate` in this process (loaded once, idle between runs)."""

    def __init__(self, args: argparse.Namespace, warmup, max_num_seqs: int) -> None:
        from kvserve import LLM, SamplingParams

        self.sp = SamplingParams
        self.llm = LLM(args.model, **engine_kwargs(args, max_num_seqs))
        self.run(warmup)

    def run(self, reqs) -> dict:
        prompts = [{"prompt_token_ids": r.prompt} for r in reqs]
        params = [self.sp(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"duration_s": dt, "output_tokens": tokens, "output_tok_s": tokens / dt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="benchmark this running server (default: start kvserve)")
    p.add_argument("--model-name", default="bench", help="'model' field sent in requests")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", default="smollm2", help="model for the kvserve server / offline run")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=256, help="server's max_num_seqs")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-gib", type=float, default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in mean x [1-r, 1+r]")
    p.add_argument("--vocab", type=int, default=10000, help="random prompt ids are drawn from [100, vocab)")
    p.add_argument("--concurrency", default="32", help="comma-separated concurrency levels")
    p.add_argument("--compare-offline", action="store_true",
                   help="also run offline LLM.generate (max_num_seqs = first concurrency) and compare throughput")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --compare-offline: alternate offline and server runs this many times, each on a fresh "
                        "request set (shared CPUs are noisy; the best of each side is compared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results to this file")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    def request_set(i: int):  # a fresh set per repeat: no run may hit the prefix cache of another
        return make_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.vocab,
                             args.seed + 1000 * i)

    warmup = request_set(-1)[:2]

    print(f"machine: {machine()}")
    print(f"settings: {args.num_prompts} requests, input {args.input_len} / output {args.output_len} tokens "
          f"(range ratio {args.range_ratio}), random ids, ignore_eos, greedy, concurrency {levels}")
    server_desc = args.url or f"kvserve serve {' '.join(engine_cli_args(args))}"
    print(f"server: {server_desc}")
    report: dict = {"machine": machine(), "settings": vars(args), "server": {}}

    if args.compare_offline and args.url:
        p.error("--compare-offline starts its own server; leave out --url")
    offline = Offline(args, warmup, max_num_seqs=levels[0]) if args.compare_offline else None
    server = None if args.url else LocalServer(args)
    base = args.url or server.url
    report["offline_runs"], report["server_runs"] = [], []
    try:
        asyncio.run(run_load(base, args.model_name, warmup, 2, args.api_key))
        for rep in range(args.repeats if offline else 1):
            reqs = request_set(rep)
            if offline is not None:
                off = offline.run(reqs)
                report["offline_runs"].append(off)
                print(f"\n== offline LLM.generate (max_num_seqs={levels[0]}), run {rep + 1}: {off['output_tokens']} "
                      f"tokens in {off['duration_s']:.2f} s = {off['output_tok_s']:.1f} tok/s")
            for j, c in enumerate(levels if rep == 0 else levels[:1]):
                if j:
                    reqs = request_set(100 + j)
                results, duration = asyncio.run(run_load(base, args.model_name, reqs, c, args.api_key))
                s = summarize(results, duration)
                report["server"].setdefault(c, s)
                if c == levels[0]:
                    report["server_runs"].append(s)
                print_summary(f"server, concurrency {c}, run {rep + 1}", s)
                failed = [r.error for r in results if not r.ok]
                if failed:
                    print(f"   first error: {failed[0]}")
    finally:
        if server is not None:
            server.stop()

    if offline is not None:
        best_off = max(r["output_tok_s"] for r in report["offline_runs"])
        best_srv = max((r.get("output_tok_s", 0.0) for r in report["server_runs"]), default=0.0)
        ratio = best_srv / best_off
        verdict = "PASS" if ratio >= 0.85 else "FAIL"
        report["server_vs_offline"] = ratio
        print(f"\nbest of {args.repeats}: offline {best_off:.1f} tok/s, server (concurrency {levels[0]}) {best_srv:.1f} tok/s")
        print(f"server / offline throughput: {ratio:.3f} ({verdict}: must be >= 0.85)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
