"""Start-up of `kvserve generate` on the built-in model, phase by phase, each run a fresh process.

    python benchmarks/startup.py                 # 3 runs, the built-in model, default dtype
    python benchmarks/startup.py --runs 5 --peer llamacpp --json-out startup.jsonl

Phases (seconds, the median over runs; every run starts a new interpreter, so nothing is warm
but the OS page cache):

    import      interpreter start -> `kvserve.entrypoints.llm` imported (torch included)
    load        weights (memory-mapped GGUF blocks), tokenizer, kernel repacking
    kv_cache    the KV cache and the runner's buffers
    first_step  the prompt (chat template applied, as `kvserve generate` does) -> first token
    ttft        interpreter start -> first token: what a user waits for
    cli         wall time of the real `kvserve generate PROMPT --max-tokens 1`

and the peak RSS (MiB) of the measuring process. `--peer llamacpp` runs llama-cpp-python on the
same GGUF file with the same prompt and context in a fresh process too (load, first token, peak
RSS). Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "What is the capital of France?"

_CHILD = r"""
import json, resource, sys, time
t0 = float(sys.argv[1])
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
from kvserve.entrypoints.llm import LLM
from kvserve.core.sampling_params import SamplingParams
t_import = time.time(); rss_import = rss()
kwargs = json.loads(sys.argv[3])
kwargs = {k: v for k, v in kwargs.items() if v is not None}
llm = LLM(sys.argv[2], max_num_seqs=1, **kwargs)
t_engine = time.time(); rss_engine = rss()
tok = llm.get_tokenizer()
prompt = llm.chat_prompt([{"role": "user", "content": sys.argv[4]}]) if tok.chat_template else sys.argv[4]
for out in llm.generate_stream(prompt, SamplingParams(max_tokens=1, temperature=0)):
    if out.outputs[0].token_ids:
        break
t_first = time.time()
import torch
print(json.dumps({
    "import": t_import - t0, "first_step": t_first - t_engine,
    # (older kvserve had no per-phase record: its whole engine build counts as load)
    **getattr(llm.engine, "startup_s", {"load": t_engine - t_import, "kv_cache": float("nan")}),
    "ttft": t_first - t0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_after_import_mib": rss_import, "rss_after_load_mib": rss_engine,
    "threads": torch.get_num_threads(), "dtype": str(llm.engine.loaded.dtype).removeprefix("torch."),
    "context": llm.engine.max_model_len, "kv_blocks": llm.engine.cache_config.num_blocks,
}))
"""

_PEER = r"""
import json, resource, sys, time
t0 = float(sys.argv[1])
from llama_cpp import Llama
t_import = time.time()
llm = Llama(model_path=sys.argv[2], n_ctx=int(sys.argv[3]), verbose=False)
t_load = time.time()
msgs = [{"role": "user", "content": sys.argv[4]}]
for chunk in llm.create_chat_completion(msgs, max_tokens=1, temperature=0, stream=True):
    break
t_first = time.time()
print(json.dumps({"import": t_import - t0, "load": t_load - t_import, "first_step": t_first - t_load,
                  "ttft": t_first - t0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(code: str, *args: str) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(t0), *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(model: str, extra: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvserve", "generate", PROMPT, "--model", model, "--max-tokens", "1",
                           *extra], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer", choices=["llamacpp"], default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from kvserve.bench.machine import describe, machine_info

    kwargs = {"dtype": args.dtype, "threads": args.threads}
    extra = ["--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
    print(f"# {describe(machine_info())}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    runs = []
    for i in range(args.runs):
        r = run_child(_CHILD, args.model, json.dumps(kwargs), PROMPT)
        r["cli"] = run_cli(args.model, extra)
        runs.append(r)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
              file=sys.stderr)
    keys = ["import", "load", "kv_cache", "first_step", "ttft", "cli", "peak_rss_mib"]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    rows = [{"engine": "kvserve", **med, "threads": runs[0]["threads"], "dtype": runs[0]["dtype"],
             "context": runs[0]["context"]}]
    if args.peer == "llamacpp":
        from kvserve.loader.resolve import resolve_model

        path = str(resolve_model(args.model).path)
        peer = [run_child(_PEER, path, str(runs[0]["context"]), PROMPT) for _ in range(args.runs)]
        rows.append({"engine": "llama.cpp", **{k: statistics.median(r[k] for r in peer) for k in peer[0]}})
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    print(f"\n{'engine':<10} " + " ".join(f"{k:>12}" for k in keys))
    for row in rows:
        print(f"{row['engine']:<10} " + " ".join(f"{row[k]:>12.2f}" if k in row else f"{'-':>12}" for k in keys))
    print(f"# seconds (median of {args.runs} fresh processes) and MiB; kvserve: {rows[0]['dtype']}, "
          f"{rows[0]['threads']} threads, context {rows[0]['context']}")
    if args.json_out:
        with open(args.json_out, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "startup", "time": time.time(), **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
