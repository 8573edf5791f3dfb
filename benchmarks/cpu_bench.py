"""kvserve vs HF transformers (and llama.cpp when installed) on the built-in SmolLM2, on CPU.

The engines, peers and machine record live in `kvserve.bench` (`kvserve bench throughput |
latency` is the general command); this script keeps issue 2's fixed workload.

Workloads (issue 2):
  throughput  N requests, prompt lengths U[64, 512], outputs U[32, 256], random token ids,
              ignore_eos, fixed seed -> total output tok/s.
  decode      batch-1 greedy decode of 128 new tokens after a 32-token prompt -> tok/s
              (best of 3 runs, different prompts).
  prefill     one 512-token prompt -> prompt tok/s (time to first token; best of 3, different
              prompts, prefix cache reset).

HF transformers runs `generate` on left-padded batches in the same dtype; as in vLLM's `hf`
throughput backend, a batch decodes to its longest requested output and is credited only the
requested tokens. llama.cpp (llama-cpp-python, Q4_1 as shipped) runs the same requests one at
a time (it has no continuous batching in that API).

    python benchmarks/cpu_bench.py --dtypes bfloat16,float32 --peers hf,llamacpp
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from kvserve.bench.machine import describe, machine_info
from kvserve.bench.offline import KvserveRunner
from kvserve.bench.peers import HFPeer, LlamaCppPeer, guarded
from kvserve.bench.workloads import BenchRequest


def machine() -> str:
    return describe(machine_info())


def workload(n: int, seed: int, vocab: int = 10000) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [
        BenchRequest([rng.randrange(100, vocab) for _ in range(rng.randint(64, 512))], rng.randint(32, 256))
        for _ in range(n)
    ]


REPEATS = 3  # prefill and decode: best of this many runs (the first in a process pays one-off costs)


def measure(engine, reqs: list[BenchRequest], decode_tokens: int, prefill_len: int, throughput) -> dict:
    """The three numbers for one engine (kvserve or a peer from kvserve.bench.peers)."""
    prefill = [prefill_len / engine.prefill_s([100 + (j * 7 + r) % 9000 for j in range(prefill_len)])
               for r in range(REPEATS)]
    decode = [1e3 / engine.decode_ms_per_token([list(range(200 + r, 232 + r))], decode_tokens + 1)
              for r in range(REPEATS)]
    res = {"prefill_tok_s": max(prefill), "decode_tok_s": max(decode),
           "prefill_runs": [round(x, 1) for x in prefill], "decode_runs": [round(x, 1) for x in decode]}
    t = throughput()
    res["throughput_tok_s"], res["throughput_s"] = t["output_tok_s"], t["duration_s"]
    return res


def bench_kvserve(dtype: str, reqs, decode_tokens: int, prefill_len: int) -> dict:
    runner = KvserveRunner("smollm2", dtype=dtype, device="cpu")
    runner.run(workload(1, -1)[:1])  # warm-up

    def throughput() -> dict:
        runner.reset_prefix_cache()
        return runner.run(reqs)

    return measure(runner, reqs, decode_tokens, prefill_len, throughput)


def bench_hf(dtype: str, reqs, decode_tokens: int, prefill_len: int, batch_size: int) -> dict:
    hf = HFPeer("smollm2", dtype, "cpu")
    return measure(hf, reqs, decode_tokens, prefill_len, lambda: hf.throughput(reqs, batch_size))


def bench_llamacpp(reqs, decode_tokens: int, prefill_len: int) -> dict:
    peer = LlamaCppPeer("smollm2", n_ctx=2048)
    return measure(peer, reqs, decode_tokens, prefill_len, lambda: peer.throughput(reqs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--peers", default="hf,llamacpp", help="comma list of hf, llamacpp (empty for none)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append results as JSON lines to this file")
    args = ap.parse_args()

    reqs = workload(args.num_requests, args.seed)
    print(f"machine: {machine()}")
    print(f"settings: {vars(args)}; prompt tokens {sum(len(r.prompt) for r in reqs)}, "
          f"output tokens {sum(r.output_len for r in reqs)}")
    rows = []
    peers = [p for p in args.peers.split(",") if p]
    for dtype in args.dtypes.split(","):
        rows.append(("kvserve", dtype, bench_kvserve(dtype, reqs, args.decode_tokens, args.prefill_len)))
        print(rows[-1], flush=True)
        if "hf" in peers:
            r = guarded("hf-transformers", lambda: bench_hf(dtype, reqs, args.decode_tokens, args.prefill_len, args.hf_batch_size))
            rows.append(("hf-transformers", dtype, r))  # a peer failing is reported, not fatal
            print(rows[-1], flush=True)
    if "llamacpp" in peers:
        rows.append(("llama.cpp", "Q4_1", guarded("llama.cpp", lambda: bench_llamacpp(reqs, args.decode_tokens, args.prefill_len))))
        print(rows[-1], flush=True)

    print()
    print(f"{'engine':<16} {'dtype':<9} {'throughput tok/s':>17} {'decode b=1 tok/s':>17} {'prefill tok/s':>14}")
    for name, dtype, r in rows:
        if "error" in r:
            print(f"{name:<16} {dtype:<9} {'error: ' + r['error']}")
            continue
        print(f"{name:<16} {dtype:<9} {r['throughput_tok_s']:>17.1f} {r['decode_tok_s']:>17.1f} {r['prefill_tok_s']:>14.1f}")
    for dtype in args.dtypes.split(","):
        ours = next((r for n, d, r in rows if n == "kvserve" and d == dtype), None)
        hf = next((r for n, d, r in rows if n == "hf-transformers" and d == dtype), None)
        if ours and hf and "error" not in hf:
            print(f"{dtype}: kvserve / HF throughput = {ours['throughput_tok_s'] / hf['throughput_tok_s']:.2f}x, "
                  f"decode = {ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            for name, dtype, r in rows:
                f.write(json.dumps({"engine": name, "dtype": dtype, **r, "machine": machine(), "time": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
