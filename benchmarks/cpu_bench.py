"""kvserve vs HF transformers (and llama.cpp when installed) on the built-in SmolLM2, on CPU.

Workloads (issue 2):
  throughput  N requests, prompt lengths U[64, 512], outputs U[32, 256], random token ids,
              ignore_eos, fixed seed -> total output tok/s.
  decode      batch-1 greedy decode of 128 new tokens after a short prompt -> tok/s.
  prefill     one 512-token prompt -> prompt tok/s (time to first token).

HF transformers runs `generate` on left-padded batches in the same dtype; as in vLLM's `hf`
throughput backend, a batch decodes to its longest requested output and is credited only the
requested tokens. llama.cpp (llama-cpp-python, Q4_1 as shipped) runs the same requests one at
a time (it has no continuous batching in that API).

    python benchmarks/cpu_bench.py --dtypes bfloat16,float32 --peers hf,llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def workload(n: int, seed: int, vocab: int = 10000) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, vocab) for _ in range(rng.randint(64, 512))], rng.randint(32, 256))
        for _ in range(n)
    ]


# -- kvserve -----------------------------------------------------------------------------------
def bench_kvserve(dtype: str, reqs, decode_tokens: int, prefill_len: int) -> dict:
    from kvserve import LLM, SamplingParams

    llm = LLM("smollm2", dtype=dtype, device="cpu")
    res = {}
    # Warm-up
    llm.generate({"prompt_token_ids": list(range(100, 164))}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    prompt = {"prompt_token_ids": list(range(100, 100 + prefill_len))}
    llm.engine.scheduler.kv.reset_prefix_cache()
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
    res["prefill_tok_s"] = prefill_len / (time.perf_counter() - t0)

    t_first = None
    t0 = time.perf_counter()
    n = 0
    for out in llm.generate_stream({"prompt_token_ids": list(range(200, 232))}, SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)):
        if t_first is None:
            t_first = time.perf_counter()
        n = len(out.outputs[0].token_ids)
    res["decode_tok_s"] = (n - 1) / (time.perf_counter() - t_first)

    llm.engine.scheduler.kv.reset_prefix_cache()
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    assert total == sum(o for _, o in reqs)
    res["throughput_tok_s"] = total / dt
    res["throughput_s"] = dt
    return res


# -- HF transformers ---------------------------------------------------------------------------
def bench_hf(dtype: str, reqs, decode_tokens: int, prefill_len: int, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    from kvserve.loader.resolve import smollm2_path

    path = smollm2_path()
    tdtype = getattr(torch, dtype)
    # transformers keeps GGUF weights quantized (computing through fp32 kernels); for a dense
    # bf16/fp32 baseline, copy the dequantized weights into a plain model of the same config.
    packed = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(packed.config, dtype=tdtype)
    model.load_state_dict({k: v.to(tdtype) for k, v in packed.state_dict().items()}, strict=False)
    model.tie_weights()
    model = model.eval()
    del packed
    res = {}

    def gen(batch: list[list[int]], new: int):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)

    gen([list(range(100, 164))], 8)
    t0 = time.perf_counter()
    gen([list(range(100, 100 + prefill_len))], 1)
    res["prefill_tok_s"] = prefill_len / (time.perf_counter() - t0)
    p = list(range(200, 232))
    t0 = time.perf_counter()
    gen([p], 1)
    t1 = time.perf_counter()
    gen([p], decode_tokens + 1)
    t2 = time.perf_counter()
    res["decode_tok_s"] = decode_tokens / ((t2 - t1) - (t1 - t0))

    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][0]))
    t0 = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        gen([reqs[i][0] for i in idx], max(reqs[i][1] for i in idx))
    dt = time.perf_counter() - t0
    res["throughput_tok_s"] = sum(o for _, o in reqs) / dt
    res["throughput_s"] = dt
    return res


# -- llama.cpp ---------------------------------------------------------------------------------
def bench_llamacpp(reqs, decode_tokens: int, prefill_len: int) -> dict:
    from llama_cpp import Llama

    from kvserve.loader.resolve import smollm2_path

    llm = Llama(str(smollm2_path()), n_ctx=2048, n_threads=os.cpu_count(), flash_attn=True, verbose=False, logits_all=False)
    res = {}

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n >= new:
                break
        return t_first - t0, time.perf_counter() - t_first

    run(list(range(100, 164)), 4)
    ttft, _ = run(list(range(100, 100 + prefill_len)), 1)
    res["prefill_tok_s"] = prefill_len / ttft
    _, dec = run(list(range(200, 232)), decode_tokens + 1)
    res["decode_tok_s"] = decode_tokens / dec
    t0 = time.perf_counter()
    for prompt, out in reqs:
        run(prompt, out)
    dt = time.perf_counter() - t0
    res["throughput_tok_s"] = sum(o for _, o in reqs) / dt
    res["throughput_s"] = dt
    return res


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
    print(f"settings: {vars(args)}; prompt tokens {sum(len(p) for p, _ in reqs)}, output tokens {sum(o for _, o in reqs)}")
    rows = []
    peers = [p for p in args.peers.split(",") if p]
    for dtype in args.dtypes.split(","):
        rows.append(("kvserve", dtype, bench_kvserve(dtype, reqs, args.decode_tokens, args.prefill_len)))
        print(rows[-1], flush=True)
        if "hf" in peers:
            try:
                rows.append(("hf-transformers", dtype, bench_hf(dtype, reqs, args.decode_tokens, args.prefill_len, args.hf_batch_size)))
            except Exception as e:  # a peer failing is reported, not fatal
                rows.append(("hf-transformers", dtype, {"error": f"{type(e).__name__}: {e}"}))
            print(rows[-1], flush=True)
    if "llamacpp" in peers:
        try:
            rows.append(("llama.cpp", "Q4_1", bench_llamacpp(reqs, args.decode_tokens, args.prefill_len)))
        except ImportError:
            rows.append(("llama.cpp", "Q4_1", {"error": "llama-cpp-python not installed"}))
        except Exception as e:
            rows.append(("llama.cpp", "Q4_1", {"error": f"{type(e).__name__}: {e}"}))
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
