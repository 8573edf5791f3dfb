"""kvserve vs llama.cpp on the built-in Gemma 3 270M Q4_K_M GGUF (`--model gemma3-270m`), CPU.

Short sizes for a shared machine (each engine in its own subprocess, `--threads` threads):
  decode      one 32-token prompt, `--new` greedy tokens (EOS ignored): decode tok/s =
              (tokens - 1) / (time after the first token)
  throughput  `--requests` requests, 32..128-token prompts, 16..64 new tokens (seeded), greedy:
              output tok/s over the whole run (kvserve: continuous batching; llama.cpp: its
              `llama_batch` API, one sequence per request)

    python benchmarks/gemma3_cpu_bench.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time


def _requests(n: int, seed: int = 0):
    from kvserve.bench.workloads import BenchRequest

    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(1000, 200000) for _ in range(rng.randint(32, 128))], rng.randint(16, 64))
            for _ in range(n)]


def _kvserve(args) -> dict:
    import torch

    from kvserve import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM("gemma3-270m", device="cpu", max_model_len=1024)
    prompt = {"prompt_token_ids": _requests(1, 1)[0].prompt[:32]}
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
    t1 = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True), use_tqdm=False)
    t2 = time.perf_counter()
    decode = (args.new - 1) / max(1e-9, (t2 - t1) - (t1 - t0))
    reqs = _requests(args.requests)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": r.prompt} for r in reqs],
                 [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs], use_tqdm=False)
    dt = time.perf_counter() - t0
    return {"decode_tok_s": decode, "throughput_tok_s": sum(r.output_len for r in reqs) / dt}


def _llamacpp(args) -> dict:
    from kvserve.bench.peers import LlamaCppPeer

    peer = LlamaCppPeer("gemma3-270m", n_ctx=4096, n_threads=args.threads)
    prompt = _requests(1, 1)[0].prompt[:32]
    peer._run(prompt, 4)
    first, rest = peer._run(prompt, args.new)
    reqs = _requests(args.requests)
    tp = peer.throughput_batched(reqs)
    return {"decode_tok_s": (args.new - 1) / rest, "throughput_tok_s": tp["output_tok_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        print(json.dumps((_kvserve if args.engine == "kvserve" else _llamacpp)(args)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = {}
    for engine in ("kvserve", "llama.cpp"):
        cmd = [sys.executable, __file__, "--engine", engine, "--threads", str(args.threads), "--new", str(args.new),
               "--requests", str(args.requests)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[engine] = json.loads(out)
        print(engine, results[engine], "load", open("/proc/loadavg").read().split()[0], flush=True)
    for key in ("decode_tok_s", "throughput_tok_s"):
        print(f"{key}: kvserve / llama.cpp = {results['kvserve'][key] / results['llama.cpp'][key]:.2f}x")


if __name__ == "__main__":
    main()
